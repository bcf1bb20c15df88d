"""``ek.advise`` on multilabel members (digits: odd?, > 4?, divisible by 3?): every metric the macro mean
of per-label binary metrics, ranked by the mean per-label binary NLL, checked against numpy."""


import keras
import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

import ensemblekit as ek
from ensemblekit import metrics
from ensemblekit.advise import CANDIDATES, TASK_ROW_KEYS, TOLERANCE
from ensemblekit.compose.layers import PlattScaling
from ensemblekit.merge import loss_barrier
from tests.advise.conftest import advise_cli, rows_by_name, score_half

LABELS = 3
METRIC_KEYS = ("accuracy", "auroc", "nll", "brier", "ece")


def _digits():
    """Digits (pixels / 16) with three labels per image, shuffled; 1000 to train, 400 held out."""
    from sklearn.datasets import load_digits

    x, digit = load_digits(return_X_y=True)
    y = np.stack([digit % 2 == 1, digit > 4, digit % 3 == 0], axis=1).astype("float32")
    order = np.random.default_rng(0).permutation(len(x))
    x, y = (x[order] / 16.0).astype("float32"), y[order]
    return (x[:1000], y[:1000]), (x[1000:1400], y[1000:1400])


def _logit_mlp(seed, x, y):
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([keras.Input((x.shape[1],)), keras.layers.Dense(16, "relu"),
                              keras.layers.Dense(LABELS)], name=f"labels_{seed}")
    model.compile(keras.optimizers.Adam(1e-2), keras.losses.BinaryCrossentropy(from_logits=True))
    model.fit(x, y, epochs=5, batch_size=64, verbose=0)
    return model


@pytest.fixture(scope="module")
def multilabel():
    """Three MLPs with three logits each (task="multilabel" says what they are), advice at budget 2."""
    (xt, yt), (xv, yv) = _digits()
    members = [_logit_mlp(seed, xt, yt) for seed in range(3)]
    advice = ek.advise(members, xv, yv, budget=2.0, task="multilabel", train_data=(xt, yt), verbose=0)
    return members, (xv, yv), advice


def _sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def _logits(model, x):
    return np.asarray(model(x, training=False), dtype="float64")


def _reference(p, y):
    """The macro metrics in plain numpy (and sklearn's macro AUROC)."""
    p = np.clip(p, 1e-12, 1 - 1e-12)
    return {"nll": float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p))),
            "accuracy": float(np.mean((p > 0.5) == y)),
            "brier": float(np.mean((p - y) ** 2)),
            "auroc": float(roc_auc_score(y, p, average="macro"))}


def _assert_row(row, p, y):
    expected = _reference(p, y)
    for key, value in expected.items():
        assert row[key] == pytest.approx(value, abs=1e-6), (row["name"], key)
    # ECE per label by ek.evaluate's own multilabel function (metrics.multilabel_metrics), averaged.
    assert row["ece"] == pytest.approx(metrics.multilabel_metrics(p, y)["ece"], abs=1e-6)


def test_rows_are_macro_binary_metrics_of_the_members_predictions(multilabel):
    members, data, advice = multilabel
    x_score, y_score = score_half(data)
    rows = rows_by_name(advice)
    assert advice.task == "multilabel" and advice.metric == "nll"
    assert [row["name"] for row in advice.rows] == list(CANDIDATES)
    assert all(list(row) == list(TASK_ROW_KEYS["multilabel"]) for row in advice.rows)
    logits = np.stack([_logits(m, x_score) for m in members], axis=1)  # (n, K, labels)
    best = int(rows["best_member"]["note"].split()[1])
    _assert_row(rows["best_member"], _sigmoid(logits[:, best]), y_score)
    _assert_row(rows["ensemble"], _sigmoid(logits.mean(axis=1)), y_score)
    assert rows["ensemble"]["note"] == "sigmoid of each label's mean logit"
    for name in ("packed", "weighted", "greedy", "pruned_subset", "aligned_soup", "soup"):
        assert rows[name]["nll"] is not None, name
    assert rows["packed"]["nll"] == pytest.approx(rows["ensemble"]["nll"], abs=1e-5)
    # The mean per-label binary NLL of the logit mean is below the members' mean NLL on this data.
    member_nll = [_reference(_sigmoid(logits[:, k]), y_score)["nll"] for k in range(3)]
    assert rows["ensemble"]["nll"] < np.mean(member_nll)
    assert rows["distilled_student"]["note"] == ("skipped: ek.distill takes multiclass, binary, regression "
                                                 "teachers; these members are multilabel")
    assert "3 labels" in str(advice) and "macro means" in str(advice)


def test_calibration_is_one_platt_scaling_shared_by_the_labels(multilabel):
    members, data, advice = multilabel
    x_score, y_score = score_half(data)
    calibrated = advice.models["ensemble_calibrated"]
    platt = calibrated.layers[-1]
    assert isinstance(platt, PlattScaling) and platt.slope > 0
    mean_logit = np.mean([_logits(m, x_score) for m in members], axis=0)
    expected = _sigmoid(platt.slope * mean_logit + platt.bias)
    np.testing.assert_allclose(np.asarray(calibrated(x_score)), expected, atol=1e-5)
    row = rows_by_name(advice)["ensemble_calibrated"]
    assert row["note"].startswith("ensemble, Platt scaling shared by the labels (slope ")
    _assert_row(row, expected, y_score)


def test_barrier_is_the_mean_per_label_cross_entropy_on_the_path(multilabel):
    members, data, advice = multilabel
    x_score, y_score = score_half(data)
    for k in (1, 2):
        entry = advice.barriers[f"0-{k}"]
        plain = loss_barrier(members[0], members[k], x_score, y_score, task="multilabel")
        assert entry["barrier"] == pytest.approx(plain.barrier, abs=1e-9)
        assert entry["aligned_barrier"] <= entry["barrier"] + 1e-9
        halfway = ek.merge([members[0], members[k]], "linear", weights=[0.5, 0.5])
        ends = [_reference(_sigmoid(_logits(m, x_score)), y_score)["nll"] for m in (members[0], halfway, members[k])]
        assert [entry["path_nll"][i] for i in (0, 2, 4)] == pytest.approx(ends, abs=1e-6)
    assert "binary cross-entropy averaged over labels" in str(advice)


def test_recommendation_is_the_cheapest_within_one_percent_of_the_best_nll(multilabel):
    _, _, advice = multilabel
    fitting = [row for row in advice.rows if row["nll"] is not None and row["within_budget"]]
    best = min(row["nll"] for row in fitting)
    chosen = rows_by_name(advice)[advice.recommendation]
    assert chosen["within_budget"] and chosen["nll"] <= best * (1 + TOLERANCE["nll"])
    close = [row for row in fitting if row["nll"] <= best * (1 + TOLERANCE["nll"])]
    assert chosen["cost_ratio"] == min(row["cost_ratio"] for row in close)
    assert f"NLL {chosen['nll']:.4f}" in advice.reason
    assert str(advice).splitlines()[2].split()[:6] == ["candidate", "accuracy", "AUROC", "NLL", "Brier", "ECE"]


def test_recommended_and_composed_models_save_load_and_score_as_their_rows(multilabel, tmp_path):
    _, data, advice = multilabel
    x_score, y_score = score_half(data)
    rows = rows_by_name(advice)
    for name in dict.fromkeys([advice.recommendation, "ensemble_calibrated", "packed", "weighted"]):
        path = tmp_path / f"{name}.keras"
        advice.models[name].save(path)
        loaded = keras.saving.load_model(path, safe_mode=True)
        scores = ek.evaluate(loaded, x_score, y_score, task="multilabel")
        for key in METRIC_KEYS:
            assert scores[key] == pytest.approx(rows[name][key], abs=1e-5), (name, key)


def test_metric_auroc_ranks_by_macro_auroc_and_wrong_metrics_are_errors(multilabel):
    members, (xv, yv), _ = multilabel
    by_auroc = ek.advise(members[:2], xv, yv, metric="auroc", task="multilabel", verbose=0)
    scored = [row["auroc"] for row in by_auroc.rows if row["auroc"] is not None]
    chosen = rows_by_name(by_auroc)[by_auroc.recommendation]
    assert by_auroc.metric == "auroc" and chosen["auroc"] >= max(scored) - TOLERANCE["auroc"]
    assert f"AUROC {chosen['auroc']:.4f}" in by_auroc.reason
    with pytest.raises(ValueError, match=r"^metric 'rmse' does not apply to multilabel members; expected one of "
                                         r"'nll', 'accuracy', 'auroc'\.$"):
        ek.advise(members, xv, yv, metric="rmse", task="multilabel", verbose=0)
    with pytest.raises(ValueError, match=r"^Unknown metric 'f1'; expected one of "):
        ek.advise(members, xv, yv, metric="f1", task="multilabel", verbose=0)
    constant = yv.copy()
    constant[:, 2] = 0
    with pytest.raises(ValueError, match=r"^metric 'auroc' needs both classes of every label in the score half; "
                                         r"label 2 is 0 in all 200 score-half samples"):
        ek.advise(members, xv, constant, metric="auroc", task="multilabel", verbose=0)
    with pytest.raises(ValueError, match=r"y must hold 0/1 targets of shape \(400, 3\)"):
        ek.advise(members, xv, yv[:, :2], task="multilabel", verbose=0)


def test_sigmoid_members_are_detected_and_score_as_their_logit_twins(multilabel):
    members, (xv, yv), advice = multilabel
    twins = []
    for member in members:
        twin = keras.Sequential([keras.Input((xv.shape[1],)), keras.layers.Dense(16, "relu"),
                                 keras.layers.Dense(LABELS, "sigmoid")], name=f"{member.name}_sigmoid")
        twin.set_weights(member.get_weights())
        twins.append(twin)
    detected = ek.advise(twins, xv, yv, budget=2.0, verbose=0)  # several sigmoid units: multilabel
    assert detected.task == "multilabel"
    for name in ("best_member", "ensemble", "ensemble_calibrated", "weighted", "soup"):
        for key in ("nll", "accuracy", "auroc"):
            assert rows_by_name(detected)[name][key] == pytest.approx(rows_by_name(advice)[name][key], abs=1e-5), (name, key)


def test_cli_task_multilabel_writes_macro_rows(tmp_path, capsys, multilabel):
    members, (xv, yv), _ = multilabel
    written = advise_cli(members[:2], xv, yv, tmp_path, "multilabel")
    assert written["task"] == "multilabel" and written["metric"] == "nll"
    assert set(written["rows"][0]) == set(TASK_ROW_KEYS["multilabel"])
    assert written["rows"][0]["auroc"] is not None
    out = capsys.readouterr().out
    assert "ek.advise: multilabel members" in out and f"recommendation: {written['recommendation']}" in out
