"""Shared data and members of the advisor's tests (tests/advise)."""

import json

import numpy as np
import pytest

from ensemblekit.advise import split_indices
from tests.conftest import save_all, train_mlp


def rows_by_name(advice):
    """``{candidate name: row}`` of an advice."""
    return {row["name"]: row for row in advice.rows}


def score_half(data):
    """``(x, y)``'s score half, as advise splits validation data (seed 0)."""
    x, y = data
    _, score = split_indices(len(x), seed=0)
    return x[score], y[score]


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


def advise_cli(members, x_val, y_val, tmp_path, task):
    """``ensemblekit advise`` on ``members`` saved as ``.keras`` files, quiet, with ``--task task``:
    the JSON it writes (its exit status is checked)."""
    from ensemblekit.cli import main

    paths = save_all(members, tmp_path)
    np.savez(tmp_path / "val.npz", x_val=x_val, y_val=y_val)
    args = ["advise", *map(str, paths), "--data", str(tmp_path / "val.npz"), "--task", task, "-q",
            "--json", str(tmp_path / "advice.json")]
    assert main(args) == 0
    return json.loads((tmp_path / "advice.json").read_text())
