"""benchmarks/tasks.py on a tiny configuration: variance scaling, and a smoke run of every task."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tasks():
    """``benchmarks.tasks`` loaded from its file (the repository root need not be on sys.path)."""
    spec = importlib.util.spec_from_file_location("benchmarks_tasks", ROOT / "benchmarks" / "tasks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_split_is_a_disjoint_60_20_20_partition_standardised_on_train(tasks):
    x = np.arange(200, dtype="float64").reshape(100, 2) * [1.0, 10.0]
    data = tasks.split(x, np.arange(100), seed=3)
    rows = [ys for _, ys in data.values()]
    assert [len(r) for r in rows] == [60, 20, 20]
    assert sorted(np.concatenate(rows).tolist()) == list(range(100))
    np.testing.assert_allclose(data["train"][0].mean(0), 0.0, atol=1e-6)
    np.testing.assert_allclose(data["train"][0].std(0), 1.0, atol=1e-6)
    np.testing.assert_array_equal(tasks.split(x, np.arange(100), standardise=False)["test"][0],
                                  x[tasks.split(x, np.arange(100))["test"][1]])


@pytest.mark.slow  # three tasks, 2 members, 2 epochs (~15 s on 2 cores)
def test_smoke_tiny_run_of_every_task(tasks, tmp_path):
    result = tasks.run(quick=True, seed=1, members=2, epochs=2)
    assert sorted(result["tasks"]) == ["breast_cancer", "diabetes", "digits_ood"]
    for name in ("breast_cancer", "digits_ood"):
        # the NLL of a mean of probabilities is at most the members' mean NLL (Jensen),
        # whatever the training did
        nll = result["tasks"][name]["nll"]
        assert nll["ensemble"] <= nll["mean member"] + 1e-6, name
    assert all(isinstance(met, bool) for part in result["tasks"].values() for met in part["goals"].values())
    ood = result["tasks"]["digits_ood"]["rows"][-1]["ood"]
    assert sorted(ood) == ["entropy", "max_prob", "mutual_information"]
    regression = result["tasks"]["diabetes"]
    assert [row["name"].split(" (")[0] for row in regression["rows"]][-3:] == ["ensemble"] * 3
    scaled, unscaled = regression["rows"][-1], regression["rows"][-2]
    assert scaled["rmse"] == unscaled["rmse"] and regression["variance_scale"] > 0
    paths = tasks.write_json_and_markdown(result, tasks.to_markdown(result), tmp_path, "tasks")
    assert json.loads(paths[0].read_text()) == json.loads(json.dumps(result))
    markdown = paths[1].read_text()
    for row in result["tasks"]["breast_cancer"]["rows"]:
        assert f"| {row['name']} | {row['accuracy']:.4f} | {row['auroc']:.4f} |" in markdown


def test_gaussian_members_train_on_the_nll_and_share_layers_with_their_trainer(tasks):
    mean_and_variance = np.array([[0.5, 2.0], [-1.0, 0.25]], "float32")
    y = np.array([[1.5], [-1.0]], "float32")
    reference = np.mean(0.5 * (np.log([2.0, 0.25]) + np.array([1.0, 0.0]) / [2.0, 0.25]))
    assert float(tasks.gaussian_nll(y, mean_and_variance)) == pytest.approx(reference, rel=1e-6)
    training, member = tasks.gaussian_mlp(3, seed=0, hidden=(4,))
    x = np.random.default_rng(0).normal(size=(5, 3)).astype("float32")
    out = member.predict(x, verbose=0)
    np.testing.assert_allclose(training.predict(x, verbose=0), np.concatenate(
        [out["prediction"], out["variance"]], axis=1), atol=1e-6)
    assert (out["variance"] > 0).all()
