"""ek.distill reads tf.data and PyDataset (labelled or not), the teacher on every batch."""

import keras
import numpy as np
import pytest

import ensemblekit as ek

RNG = np.random.default_rng(0)
X = RNG.normal(size=(96, 4)).astype("float32")
Y = RNG.integers(0, 3, size=96)


class Labelled(keras.utils.PyDataset):
    def __init__(self, labels=True):
        super().__init__()
        self.labels = labels

    def __len__(self):
        return 3

    def __getitem__(self, index):
        rows = slice(32 * index, 32 * index + 32)
        return (X[rows], Y[rows]) if self.labels else (X[rows],)


def members():
    result = []
    for seed in range(2):
        keras.utils.set_random_seed(seed)
        result.append(keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)]))
    return result


@pytest.mark.parametrize("labels", [True, False])
def test_distill_trains_on_a_pydataset(labels):
    teacher = members()
    student, report = ek.distill(teacher, teacher[0], Labelled(labels), epochs=2, verbose=0)
    assert not report.teacher_cached and "dataset" in report.cache_reason
    assert report.alpha == (0.5 if labels else 0.0)
    assert len(report.history["loss"]) == 2 and np.isfinite(report.history["loss"]).all()
    assert student.output_shape == (None, 3)


@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="tf.data needs TensorFlow")
def test_distill_trains_on_tf_data_and_validates_on_one():
    import tensorflow as tf

    data = tf.data.Dataset.from_tensor_slices((X, Y)).shuffle(96).batch(32)
    teacher = members()
    _, report = ek.distill(teacher, teacher[0], data, validation_data=data, epochs=2, verbose=0)
    assert "val_loss" in report.history


def test_distill_refuses_what_a_dataset_cannot_do():
    teacher = members()

    def generator():
        yield X, Y

    with pytest.raises(ValueError, match="distill: x is a one-shot Python generator"):
        ek.distill(teacher, teacher[0], generator(), epochs=1, verbose=0)
    with pytest.raises(ValueError, match="distill: y= was given, but x is a dataset"):
        ek.distill(teacher, teacher[0], Labelled(), Y, epochs=1, verbose=0)
    with pytest.raises(ValueError, match="distill: augment= applies to arrays"):
        ek.distill(teacher, teacher[0], Labelled(), augment=keras.layers.GaussianNoise(0.1), epochs=1,
                   verbose=0)
    with pytest.raises(ValueError, match="distill: cache_teacher=True needs x as arrays"):
        ek.distill(teacher, teacher[0], Labelled(), cache_teacher=True, epochs=1, verbose=0)
