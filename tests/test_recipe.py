"""The keras.io transfer-learning recipe, end to end, with the data never held as NumPy images.

An image folder (digits rendered to PNG in class subfolders) read by
``keras.utils.image_dataset_from_directory``; three members fine-tuned from one
MobileNetV2 base (``weights=None``: no download), nested the keras.io way;
``ek.advise(models, val_ds)``; ``ek.evaluate(best, test_ds)``.
"""

import keras
import numpy as np
import pytest

import ensemblekit as ek
from ensemblekit import _data

pytestmark = [pytest.mark.slow, pytest.mark.skipif(keras.backend.backend() != "tensorflow",
                                                   reason="image_dataset_from_directory needs tf.data")]
CLASSES, SIZE = 4, 32


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    from sklearn.datasets import load_digits

    digits = load_digits()
    root = tmp_path_factory.mktemp("digits")
    for split, (start, stop) in {"train": (0, 40), "val": (40, 64), "test": (64, 88)}.items():
        for label in range(CLASSES):
            folder = root / split / f"digit_{label}"
            folder.mkdir(parents=True)
            for index, row in enumerate(np.flatnonzero(digits.target == label)[start:stop]):
                image = np.kron(digits.images[row] * 15, np.ones((4, 4)))  # 8x8 in [0, 16] -> 32x32
                image = np.repeat(image[..., None], 3, axis=-1).astype("uint8")
                keras.utils.save_img(folder / f"{index:03d}.png", image, scale=False)
    return root


def _dataset(folder, shuffle):
    return keras.utils.image_dataset_from_directory(folder, image_size=(SIZE, SIZE), batch_size=16,
                                                    shuffle=shuffle, seed=0, verbose=False)


def _pretrained_base(train_ds):
    """A MobileNetV2 base trained here in seconds (ImageNet weights cannot be downloaded; a base with
    fresh BatchNorm statistics gives every image nearly the same features when frozen)."""
    keras.utils.set_random_seed(0)
    base = keras.applications.MobileNetV2(input_shape=(SIZE, SIZE, 3), alpha=0.35, include_top=False,
                                          weights=None)
    inputs = keras.Input((SIZE, SIZE, 3))
    x = keras.layers.GlobalAveragePooling2D()(base(keras.layers.Rescaling(1 / 127.5, offset=-1)(inputs)))
    model = keras.Model(inputs, keras.layers.Dense(CLASSES)(x))
    model.compile(keras.optimizers.Adam(3e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(train_ds, epochs=4, verbose=0)
    # MobileNetV2's BatchNorm momentum (0.999) leaves the moving statistics near their start after 40
    # steps: ek.reset_bn sets them to the statistics of the training images.
    ek.reset_bn(model, train_ds.unbatch().batch(CLASSES * 40))  # one batch: one pass per layer
    return base.get_weights()


def _fine_tuned(base_weights, train_ds, seed):
    """The keras.io recipe: a frozen base in a new model, a new head trained, then the base unfrozen
    and fine-tuned at a low learning rate."""
    keras.utils.set_random_seed(seed)
    base = keras.applications.MobileNetV2(input_shape=(SIZE, SIZE, 3), alpha=0.35, include_top=False,
                                          weights=None)
    base.set_weights(base_weights)
    base.trainable = False
    inputs = keras.Input((SIZE, SIZE, 3))
    x = keras.layers.Rescaling(1 / 127.5, offset=-1)(inputs)
    x = base(x, training=False)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dropout(0.2)(x)
    model = keras.Model(inputs, keras.layers.Dense(CLASSES)(x), name=f"member_{seed}")
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    model.compile(keras.optimizers.Adam(1e-2), loss, metrics=["accuracy"])
    model.fit(train_ds, epochs=2, verbose=0)
    base.trainable = True
    model.compile(keras.optimizers.Adam(1e-4), loss, metrics=["accuracy"])
    model.fit(train_ds, epochs=1, verbose=0)
    return model


def test_keras_io_transfer_learning_recipe(folders, monkeypatch):
    train_ds, val_ds, test_ds = (_dataset(folders / "train", True), _dataset(folders / "val", True),
                                 _dataset(folders / "test", False))
    assert train_ds.class_names == [f"digit_{k}" for k in range(CLASSES)]
    base_weights = _pretrained_base(train_ds)
    members = [_fine_tuned(base_weights, train_ds, seed) for seed in range(3)]

    stored = []
    append = _data.InputStore.append
    monkeypatch.setattr(_data.InputStore, "append", lambda self, batch: (stored.append(len(batch)),
                                                                         append(self, batch))[1])
    advice = ek.advise(members, val_ds, verbose=0)  # val_ds reshuffles on every pass
    assert sum(stored) == CLASSES * 24  # the one pass wrote the images to disk, batch by batch
    assert max(stored) == 16
    rows = {row["name"]: row for row in advice.rows}
    for name in ("best_member", "soup", "ensemble", "ensemble_calibrated", "weighted", "greedy", "packed"):
        assert rows[name]["nll"] is not None, (name, rows[name]["note"])
    assert "BatchNorm statistics reset on the fit half" in rows["soup"]["note"]  # nested in the base
    assert advice.barriers["0-1"]["barrier"] is not None
    assert advice.recommendation in advice.models

    best = advice.models[advice.recommendation]
    scores = ek.evaluate(best, test_ds)
    images = np.concatenate([x for x, _ in test_ds.as_numpy_iterator()])  # the test's own check
    labels = np.concatenate([y for _, y in test_ds.as_numpy_iterator()])
    expected = float(np.mean(best.predict(images, verbose=0).argmax(axis=-1) == labels))
    assert scores["accuracy"] == pytest.approx(expected, abs=1e-9)
    assert scores["accuracy"] > 1.5 / CLASSES, scores  # fine-tuned members beat chance (0.25) by far
