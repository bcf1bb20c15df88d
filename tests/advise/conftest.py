"""Shared data and members of the advisor's tests (tests/advise)."""

import numpy as np
import pytest

from tests.conftest import train_mlp


def toy(n, seed):
    """``toy_data``'s labelling rule (3 classes from two thresholds) on ``n`` fresh samples."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 8)).astype("float32")
    return x, (x[:, 0] > 0).astype("int64") + (x[:, 1] > 0.5).astype("int64")


@pytest.fixture(scope="module")
def data():
    return toy(400, 0), toy(400, 1)


@pytest.fixture(scope="module")
def members(data):
    """Three MLPs from different initialisations."""
    (x, y), _ = data
    return [train_mlp(seed, x, y, epochs=5, learning_rate=1e-2) for seed in range(3)]
