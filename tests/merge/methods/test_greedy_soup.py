import keras
import numpy as np
import pytest

from ensemblekit.merge import merge
from tests.conftest import make_mlp


def _trained(seed, x, y, epochs, start=None):
    model = make_mlp(seed)
    if start is not None:
        model.set_weights(start.get_weights())
    model.compile(keras.optimizers.Adam(0.02), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    keras.utils.set_random_seed(seed)
    model.fit(x, y, epochs=epochs, batch_size=32, verbose=0)
    return model


def test_greedy_soup_not_worse_than_best_member_on_validation(toy_data):
    x, y = toy_data
    base = _trained(0, x, y, 2)
    members = [_trained(s, x, y, 3, start=base) for s in range(1, 4)] + [make_mlp(9)]  # one untrained
    merged, report = merge(members, "greedy_soup", validation_data=(x, y), return_report=True)
    acc = lambda m: np.mean(m.predict(x, verbose=0).argmax(1) == y)  # noqa: E731
    assert acc(merged) >= max(acc(m) for m in members)
    assert 3 not in report.ingredients  # the untrained member is never added
    assert report.method == "greedy_soup" and not report.streamed
    assert not hasattr(merged, "merge_ingredients_")


def test_greedy_soup_needs_validation_data():
    with pytest.raises(ValueError, match="needs validation_data="):
        merge([make_mlp(0), make_mlp(1)], "greedy_soup")


def test_greedy_soup_reads_a_dataset_of_x_y_and_refuses_a_one_shot_generator():
    members = [keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)]) for _ in range(3)]
    x = np.random.default_rng(0).normal(size=(40, 4)).astype("float32")
    y = np.arange(40) % 3

    class Data(keras.utils.PyDataset):
        def __len__(self):
            return 2

        def __getitem__(self, index):
            return x[20 * index:20 * index + 20], y[20 * index:20 * index + 20]

    _, from_arrays = merge(members, "greedy_soup", validation_data=(x, y), return_report=True)
    _, from_dataset = merge(members, "greedy_soup", validation_data=Data(), return_report=True)
    assert from_dataset.ingredients == from_arrays.ingredients

    def once():
        yield x, y

    with pytest.raises(ValueError, match="validation_data is a one-shot Python generator"):
        merge(members, "greedy_soup", validation_data=once())
