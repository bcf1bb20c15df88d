"""benchmarks/tasks.py on a tiny configuration: folds, per-row NLL, side-by-side training, a smoke run."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from ensemblekit import metrics

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tasks():
    """``benchmarks.tasks`` loaded from its file (the repository root need not be on sys.path)."""
    spec = importlib.util.spec_from_file_location("benchmarks_tasks", ROOT / "benchmarks" / "tasks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("stratified", [True, False])
def test_folds_partition_the_rows_with_a_disjoint_inner_validation_split(tasks, stratified):
    y = np.r_[np.zeros(70, "int64"), np.ones(30, "int64")]
    splits = tasks.folds(y, 5, seed=3, stratified=stratified)
    held_out = np.concatenate([test for _, _, test in splits])
    assert sorted(held_out.tolist()) == list(range(100))
    for train, val, test in splits:
        assert len(set(train) | set(val) | set(test)) == len(train) + len(val) + len(test) == 100
        assert len(val) == 16 and len(test) == 20
        if stratified:
            assert y[test].sum() == 6 and abs(y[val].mean() - 0.3) < 0.05
    assert [t.tolist() for _, _, t in splits] == [t.tolist() for _, _, t in tasks.folds(y, 5, 3, stratified)]


def test_standardise_uses_the_training_rows_statistics(tasks):
    x = np.arange(200, dtype="float64").reshape(100, 2) * [1.0, 10.0]
    train, other = tasks.standardise(x[:60], x[60:])
    np.testing.assert_allclose(train.mean(0), 0.0, atol=1e-5)
    np.testing.assert_allclose(train.std(0), 1.0, atol=1e-5)
    np.testing.assert_allclose(other, (x[60:] - x[:60].mean(0)) / x[:60].std(0), rtol=1e-5)


def test_row_nll_averages_to_ensemblekit_metrics_and_paired_intervals(tasks):
    rng = np.random.default_rng(0)
    p, y = rng.uniform(size=50), rng.integers(0, 2, 50)
    assert tasks.row_nll(p, y, "binary").mean() == pytest.approx(metrics.binary_nll(p, y))
    probs, labels = rng.dirichlet(np.ones(4), size=50), rng.integers(0, 4, 50)
    assert tasks.row_nll(probs, labels, "multiclass").mean() == pytest.approx(metrics.nll(probs, labels))
    mean, std, values = rng.normal(size=50), rng.uniform(0.5, 2, 50), rng.normal(size=50)
    assert tasks.row_nll(mean, values, "regression", std).mean() == pytest.approx(
        metrics.gaussian_nll(mean, std, values))
    a = np.r_[1.0, 2.0, 3.0, 4.0]
    result = tasks.paired(a, a - 1.0)
    assert result == {"difference": 1.0, "ci95": [1.0, 1.0]}
    low, high = tasks.paired(a, np.r_[0.0, 2.0, 2.0, 4.0])["ci95"]
    assert low < 0.5 < high


def test_gaussian_members_share_layers_with_their_trainer(tasks):
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


def test_side_by_side_training_keeps_each_members_best_validation_epoch(tasks):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(240, 4)).astype("float32")
    y = (x[:, :1] + 0.5 * rng.normal(size=(240, 1)) > 0).astype("float32")
    members = [tasks.mlp(4, 1, "sigmoid", seed, hidden=(8,)) for seed in (0, 1)]
    before = [metrics.binary_nll(m.predict(x[200:], verbose=0), y[200:]) for m in members]
    initial = [m.get_weights()[0].copy() for m in members]
    best = tasks.train_side_by_side(members, "binary", (x[:200], y[:200]), (x[200:], y[200:]), 6, seed=0)
    assert len(best) == 2 and all(1 <= epoch <= 6 for epoch in best)
    after = [metrics.binary_nll(m.predict(x[200:], verbose=0), y[200:]) for m in members]
    assert all(a < b for a, b in zip(after, before, strict=True))  # the kept epoch beats the initial weights
    assert not np.allclose(members[0].get_weights()[0], initial[0])
    assert not np.allclose(members[0].get_weights()[0], members[1].get_weights()[0])


@pytest.mark.slow  # four tasks, 2 members, 2 folds, 2 epochs (~25 s on 2 cores)
def test_smoke_tiny_run_of_every_task(tasks, tmp_path):
    result = tasks.run(quick=True, seed=1, members=2, epochs=2, k=2)
    assert sorted(result["tasks"]) == ["breast_cancer", "diabetes", "mnist1d_cnn_ood", "mnist1d_ood"]
    for name, part in result["tasks"].items():
        nll = part["nll"]
        assert np.isfinite([nll["ensemble"], nll["best member (oracle)"], *nll["members"]]).all(), name
        assert nll["best member (oracle)"] == min(nll["members"]), name
        goals = part["goals"]
        assert goals["ensemble NLL < best member NLL (oracle)"] == (nll["ensemble"] < nll["best member (oracle)"])
        assert goals["ensemble NLL < member chosen on validation"] == (
            nll["ensemble"] < nll["member chosen on validation"])
        assert all(isinstance(met, bool) for met in goals.values())
    for name in ("breast_cancer", "mnist1d_ood", "mnist1d_cnn_ood"):
        part = result["tasks"][name]
        rows = {row["name"]: row for row in part["rows"]}
        # the NLL of a mean of probabilities is at most the members' mean NLL (Jensen), row by row
        assert rows["ensemble (mean)"]["nll"] <= part["nll"]["mean member"] + 1e-6, name
        # the ensemble of the goals is, fold by fold, the method with the lower validation NLL
        assert len(part["method_chosen_on_validation"]) == part["folds"] == 2, name
        if len(set(part["method_chosen_on_validation"])) == 1:
            method = part["method_chosen_on_validation"][0]
            assert part["nll"]["ensemble"] == pytest.approx(rows[f"ensemble ({method})"]["nll"]), name
        assert list(rows)[-1] == "ensemble, method chosen on validation (per fold)", name
    binary = result["tasks"]["breast_cancer"]
    assert binary["samples"] == 569 and len(binary["best_epochs"]) == binary["folds"] == 2
    for name in ("mnist1d_ood", "mnist1d_cnn_ood"):
        ood = result["tasks"][name]
        assert ood["samples"] + ood["out_of_distribution"] == 5000  # every mnist1d row, train and test
        rows = {row["name"]: row for row in ood["rows"]}
        assert sorted(rows["ensemble (mean)"]["ood_auroc"]) == ["entropy", "max_prob", "mutual_information"]
        aurocs = [rows[f"member {i}"]["ood_auroc"]["max_prob"] for i in range(2)]
        assert all(0 <= a <= 1 for a in aurocs)
        chosen_mi = rows["ensemble, method chosen on validation (per fold)"]["ood_auroc"]["mutual_information"]
        assert ood["goals"]["ensemble MI OOD AUROC > member 0's max-prob AUROC"] == (chosen_mi > aurocs[0])
    regression = result["tasks"]["diabetes"]
    assert regression["samples"] == 442 and len(regression["variance_scales"]) == 2
    scaled, unscaled = regression["rows"][-1], regression["rows"][-2]
    assert scaled["rmse"] == unscaled["rmse"] and 0 <= scaled["coverage"] <= 1
    coverage_goal = "coverage within 0.03 of 0.95 after scaling (pooled held-out folds)"
    assert regression["goals"][coverage_goal] == (abs(scaled["coverage"] - 0.95) <= 0.03)
    paths = tasks.write_json_and_markdown(result, tasks.to_markdown(result), tmp_path, "tasks")
    assert json.loads(paths[0].read_text()) == json.loads(json.dumps(result))
    markdown = paths[1].read_text()
    for row in binary["rows"]:
        assert f"| {row['name']} | {row['accuracy']:.4f} | {row['auroc']:.4f} |" in markdown
    for part in result["tasks"].values():
        for goal, met in part["goals"].items():
            assert f"- {goal}: {'met' if met else 'NOT met'}" in markdown
