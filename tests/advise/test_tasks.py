"""``ek.advise`` on binary (breast cancer) and regression (diabetes) members: the task's metrics,
calibration and loss barrier, ranked by the task's primary metric."""


import keras
import numpy as np
import pytest

import ensemblekit as ek
from ensemblekit import metrics
from ensemblekit.advise import CANDIDATES, TASK_ROW_KEYS, TOLERANCE
from ensemblekit.compose.layers import PlattScaling
from ensemblekit.merge import loss_barrier
from tests.advise.conftest import advise_cli, rows_by_name, score_half


def _standardised(x, y, seed=0):
    order = np.random.default_rng(seed).permutation(len(x))
    x = x[order].astype("float32")
    x = (x - x.mean(axis=0)) / x.std(axis=0)
    return x, y[order]


def _mlp(seed, inputs, activation):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input((inputs,)), keras.layers.Dense(16, "relu"),
                             keras.layers.Dense(1, activation=activation)])


@pytest.fixture(scope="module")
def binary():
    """Three sigmoid MLPs on breast cancer (300 train / 269 held-out) and their advice, no budget."""
    from sklearn.datasets import load_breast_cancer

    x, y = _standardised(*load_breast_cancer(return_X_y=True))
    (xt, yt), (xv, yv) = (x[:300], y[:300]), (x[300:], y[300:])
    members = []
    for seed in range(3):
        model = _mlp(seed, x.shape[1], "sigmoid")
        model.compile(keras.optimizers.Adam(1e-2), "binary_crossentropy")
        model.fit(xt, yt, epochs=10, verbose=0)
        members.append(model)
    return members, (xv, yv), ek.advise(members, xv, yv, verbose=0)


@pytest.fixture(scope="module")
def regression():
    """Three linear-output MLPs on diabetes (standardised target; 300 train / 142 held-out), advice at budget 1."""
    from sklearn.datasets import load_diabetes

    x, y = _standardised(*load_diabetes(return_X_y=True))
    y = ((y - y.mean()) / y.std()).astype("float32")
    (xt, yt), (xv, yv) = (x[:300], y[:300]), (x[300:], y[300:])
    members = []
    for seed in range(3):
        model = _mlp(seed, x.shape[1], None)
        model.compile(keras.optimizers.Adam(1e-2), "mse")
        model.fit(xt, yt, epochs=30, verbose=0)
        members.append(model)
    advice = ek.advise(members, xv, yv, budget=1.0, task="regression", verbose=0)
    return members, (xt, yt), (xv, yv), advice


def test_binary_rows_are_the_binary_metrics_of_ek_evaluate(binary):
    members, data, advice = binary
    x_score, y_score = score_half(data)
    rows = rows_by_name(advice)
    assert advice.task == "binary" and advice.metric == "nll"
    assert [row["name"] for row in advice.rows] == list(CANDIDATES)
    assert all(list(row) == list(TASK_ROW_KEYS["binary"]) for row in advice.rows)
    best = rows["best_member"]
    expected = ek.evaluate(members[int(best["note"].split()[1])], x_score, y_score)
    for key in ("accuracy", "auroc", "nll", "brier", "ece"):
        assert best[key] == pytest.approx(expected[key], abs=1e-6), key
    # Averaging members' logits is never worse than the worst member's NLL on this data.
    member_nll = [ek.evaluate(m, x_score, y_score)["nll"] for m in members]
    assert rows["ensemble"]["nll"] < max(member_nll)
    assert 0.9 < rows["ensemble"]["accuracy"] <= 1.0


def test_binary_calibration_is_platt_scaling_and_keeps_the_ranking(binary):
    _, _, advice = binary
    rows = rows_by_name(advice)
    calibrated = advice.models["ensemble_calibrated"]
    assert isinstance(calibrated.layers[-1], PlattScaling) and calibrated.layers[-1].slope > 0
    assert rows["ensemble_calibrated"]["note"].startswith("ensemble, Platt scaling (slope ")
    # A positive slope is monotone: the ranking, hence AUROC, is the ensemble's.
    assert rows["ensemble_calibrated"]["auroc"] == pytest.approx(rows["ensemble"]["auroc"], abs=1e-9)


def test_binary_barrier_is_binary_cross_entropy_on_the_score_half(binary):
    members, data, advice = binary
    x_score, y_score = score_half(data)
    for k in (1, 2):
        entry = advice.barriers[f"0-{k}"]
        plain = loss_barrier(members[0], members[k], x_score, y_score, task="binary")
        assert entry["barrier"] == pytest.approx(plain.barrier, abs=1e-9)
        assert entry["path_nll"] == pytest.approx(plain.path, abs=1e-9)
        assert entry["path_nll"][0] == pytest.approx(ek.evaluate(members[0], x_score, y_score)["nll"], abs=1e-6)
        assert entry["path_nll"][-1] == pytest.approx(ek.evaluate(members[k], x_score, y_score)["nll"], abs=1e-6)
    assert "binary cross-entropy" in str(advice)


def test_binary_recommendation_is_the_best_nll_within_tolerance(binary):
    _, _, advice = binary
    scored = [row for row in advice.rows if row["nll"] is not None]
    best = min(row["nll"] for row in scored)
    chosen = rows_by_name(advice)[advice.recommendation]
    assert chosen["nll"] <= best * (1 + TOLERANCE["nll"])
    assert f"NLL {chosen['nll']:.4f}" in advice.reason and "nats" in advice.reason
    table = str(advice)
    assert table.splitlines()[2].split()[:6] == ["candidate", "accuracy", "AUROC", "NLL", "Brier", "ECE"]


def test_regression_rows_rank_by_rmse_with_mae_and_no_classification_metrics(regression):
    members, _, data, advice = regression
    x_score, y_score = score_half(data)
    rows = rows_by_name(advice)
    assert advice.task == "regression" and advice.metric == "rmse"
    assert all(list(row) == list(TASK_ROW_KEYS["regression"]) for row in advice.rows)
    best = rows["best_member"]
    expected = ek.evaluate(members[int(best["note"].split()[1])], x_score, y_score, task="regression")
    assert (best["rmse"], best["mae"]) == pytest.approx((expected["rmse"], expected["mae"]), abs=1e-6)
    # MSE is convex: the mean of the members' values is no worse than their mean squared error.
    member_mse = [ek.evaluate(m, x_score, y_score, task="regression")["rmse"] ** 2 for m in members]
    assert rows["ensemble"]["rmse"] ** 2 <= np.mean(member_mse) + 1e-9
    assert rows["packed"]["rmse"] == pytest.approx(rows["ensemble"]["rmse"], abs=1e-5)
    # Within budget 1.0, the choice is within 1% of the best RMSE that fits, and costs one member.
    fitting = [row["rmse"] for row in advice.rows if row["rmse"] is not None and row["within_budget"]]
    chosen = rows[advice.recommendation]
    assert chosen["cost_ratio"] <= 1.0 and chosen["rmse"] <= min(fitting) * (1 + TOLERANCE["rmse"])
    assert f"RMSE {chosen['rmse']:.4f}" in advice.reason


def test_regression_calibration_is_variance_scaling_of_the_members_spread(regression):
    _, _, data, advice = regression
    x_score, y_score = score_half(data)
    rows = rows_by_name(advice)
    calibrated = rows["ensemble_calibrated"]
    assert calibrated["rmse"] == pytest.approx(rows["ensemble"]["rmse"], abs=1e-6)
    assert "variance scaling" in calibrated["note"]
    out = advice.models["ensemble_calibrated"](x_score)
    mean, std = (np.asarray(keras.ops.convert_to_numpy(out[k]), "float64") for k in ("prediction", "std"))
    assert calibrated["nll"] == pytest.approx(metrics.gaussian_nll(mean, std, y_score), abs=1e-6)
    assert calibrated["coverage"] == pytest.approx(metrics.coverage(mean, std, y_score), abs=1e-9)
    # Only a candidate with a std has a Gaussian NLL and coverage.
    assert all(row["nll"] is None for row in advice.rows if row["name"] != "ensemble_calibrated")


def test_regression_barrier_is_mse_and_alignment_lowers_it(regression):
    members, _, data, advice = regression
    x_score, y_score = score_half(data)
    for k in (1, 2):
        entry = advice.barriers[f"0-{k}"]
        assert "path_nll" not in entry
        plain = loss_barrier(members[0], members[k], x_score, y_score, task="regression")
        assert entry["path_mse"] == pytest.approx(plain.path, abs=1e-9)
        rmse_k = ek.evaluate(members[k], x_score, y_score, task="regression")["rmse"]
        assert entry["path_mse"][-1] == pytest.approx(rmse_k ** 2, rel=1e-5)
        assert entry["aligned_barrier"] <= entry["barrier"] + 1e-9
    assert "score-half MSE" in str(advice) and " MSE (" in advice.reason


def test_regression_metric_mae_and_wrong_metrics(regression):
    members, _, (xv, yv), by_rmse = regression
    by_mae = ek.advise(members[:2], xv, yv, metric="mae", task="regression", verbose=0)
    assert by_mae.metric == "mae" and "MAE " in by_mae.reason
    with pytest.raises(ValueError, match="metric 'nll' does not apply to regression members; expected one of "
                                         "'rmse', 'mae'"):
        ek.advise(members, xv, yv, metric="nll", task="regression", verbose=0)
    with pytest.raises(ValueError, match="metric 'rmse' does not apply to multiclass members"):
        softmax = [keras.Sequential([keras.Input((3,)), keras.layers.Dense(3, "softmax")]) for _ in range(2)]
        ek.advise(softmax, np.zeros((8, 3)), np.zeros(8, int), metric="rmse", verbose=0)


def test_regression_distilled_student_trains_on_the_ensemble_values(regression):
    members, (xt, yt), (xv, yv), _ = regression
    advice = ek.advise(members[:2], xv, yv, budget=1.0, task="regression", train_data=(xt, yt), verbose=0)
    row = rows_by_name(advice)["distilled_student"]
    assert row["cost_ratio"] == 1.0 and np.isfinite(row["rmse"]) and "T=" not in row["note"]
    assert "labels and targets" in row["note"]


def test_cli_task_regression_writes_rmse_rows(tmp_path, capsys, regression):
    members, _, (xv, yv), _ = regression
    written = advise_cli(members[:2], xv, yv, tmp_path, "regression")
    assert written["task"] == "regression" and written["metric"] == "rmse"
    assert set(written["rows"][0]) == set(TASK_ROW_KEYS["regression"])
    assert "RMSE" in capsys.readouterr().out
