"""Shared fixtures: small real datasets and tiny members trained in seconds."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(scope="session")
def mnist1d():
    """``((x_train, y_train), (x_test, y_test))``, x of shape (n, 40, 1)."""
    from ensemblekit.datasets import load_mnist1d

    return load_mnist1d()


def make_mlp(seed, input_shape=(8,), classes=3, hidden=16, softmax=False, name=None):
    """A tiny MLP classifier with deterministic initial weights."""
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input(input_shape),
            keras.layers.Flatten(),
            keras.layers.Dense(hidden, activation="relu", name="hidden"),
            keras.layers.Dense(classes, activation="softmax" if softmax else None, name="out"),
        ],
        name=name,
    )


def train_mlp(seed, x, y, epochs, learning_rate=1e-3, **kwargs):
    """``make_mlp(seed, **kwargs)`` trained on ``(x, y)`` with Adam on logits."""
    model = make_mlp(seed, **kwargs)
    model.compile(keras.optimizers.Adam(learning_rate),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, epochs=epochs, verbose=0)
    return model


def bn_model_and_copy(x, y):
    """A small BatchNorm MLP trained 2 epochs on ``(x, y)``, and an exact copy (barrier checks)."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((x.shape[1],)), keras.layers.Dense(16),
                              keras.layers.BatchNormalization(), keras.layers.ReLU(), keras.layers.Dense(3)])
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, epochs=2, verbose=0)
    copy = keras.models.clone_model(model)
    copy.set_weights(model.get_weights())
    return model, copy


def save_all(models, folder, stem="m"):
    """Save each model to ``folder/<stem><i>.keras``; return the paths."""
    paths = [folder / f"{stem}{i}.keras" for i in range(len(models))]
    for model, path in zip(models, paths, strict=True):
        model.save(path)
    return paths


@pytest.fixture(scope="session")
def toy_data():
    """200 samples of 8 features, 3 classes, learnable."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 8)).astype("float32")
    y = (x[:, 0] > 0).astype("int64") + (x[:, 1] > 0.5).astype("int64")
    return x, y
