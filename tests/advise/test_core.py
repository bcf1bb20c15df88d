"""ensemblekit.advise.core: ``ek.advise``, the merge-or-ensemble advisor, built on the compositions registry."""

import json

import keras
import numpy as np
import pytest

import ensemblekit as ek
from ensemblekit import compositions
from ensemblekit.advise import CANDIDATES, MERGES, ROW_KEYS, TOLERANCE, split_indices
from tests.advise.conftest import rows_by_name, toy
from tests.conftest import bn_model_and_copy, train_mlp

ENSEMBLE_KINDS = ("ensemble", "ensemble_calibrated", "weighted", "greedy", "packed", "pruned_subset")


@pytest.fixture(scope="module")
def independent(data, members):
    """Three MLPs from different initialisations, and their advice with no budget."""
    _, (xv, yv) = data
    return members, ek.advise(members, xv, yv, budget=None, verbose=0)


@pytest.fixture(scope="module")
def fine_tunes(data):
    """A converged base MLP, three fine-tunes of it on 150-sample subsets, their advice at budget 1.0.

    Scored on 2000 fresh samples, so that 0.5 accuracy point is 5 samples of the score half.
    """
    (x, y), _ = data
    x_val, y_val = toy(2000, 2)
    base = train_mlp(10, x, y, epochs=20, learning_rate=1e-2)
    models = []
    for seed in range(3):
        model = keras.models.clone_model(base)
        model.set_weights(base.get_weights())
        model.compile(keras.optimizers.Adam(1e-2), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        keras.utils.set_random_seed(100 + seed)
        subset = np.random.default_rng(seed).choice(len(x), 150, replace=False)
        model.fit(x[subset], y[subset], epochs=5, verbose=0)
        models.append(model)
    return base, models, ek.advise(models, x_val, y_val, budget=1.0, base=base, verbose=0)


def test_split_is_deterministic_disjoint_and_complete():
    fit, score = split_indices(101, seed=3)
    again_fit, again_score = split_indices(101, seed=3)
    np.testing.assert_array_equal(fit, again_fit)
    np.testing.assert_array_equal(score, again_score)
    assert len(fit) == 50 and len(score) == 51
    assert sorted([*fit, *score]) == list(range(101))
    assert not np.array_equal(split_indices(101, seed=4)[0], fit)
    with pytest.raises(ValueError, match="advise: x has 3 samples; advise needs at least 4"):
        split_indices(3)


def test_metrics_are_on_the_score_half_and_fitting_on_the_fit_half(data, independent):
    _, (xv, yv) = data
    models, advice = independent
    fit, score = split_indices(len(xv), seed=0)
    assert (advice.fit_size, advice.score_size) == (len(fit), len(score))
    rows = rows_by_name(advice)
    for name in ("ensemble", "ensemble_calibrated", "aligned_soup"):
        by_hand = ek.evaluate(advice.models[name], xv[score], yv[score])
        for key in ("accuracy", "nll", "brier", "ece"):
            assert rows[name][key] == pytest.approx(by_hand[key], abs=1e-5), (name, key)
    calibrated = ek.calibrate(advice.models["ensemble"], xv[fit], yv[fit])
    assert advice.models["ensemble_calibrated"].layers[-1].temperature == pytest.approx(
        calibrated.layers[-1].temperature, rel=1e-4)
    best = int(np.argmin([ek.evaluate(m, xv[fit], yv[fit])["nll"] for m in models]))
    assert advice.models["best_member"] is models[best]
    assert rows["packed"]["nll"] == pytest.approx(rows["ensemble"]["nll"], abs=1e-5)


def test_barrier_of_copies_is_zero_with_batchnorm_reset(data, capsys):
    (x, y), (xv, yv) = data
    model, copy = bn_model_and_copy(x, y)
    advice = ek.advise([model, copy], xv, yv, verbose=0)
    assert capsys.readouterr().out == ""
    assert set(advice.barriers) == {"0-1"}
    for entry in advice.barriers.values():
        assert entry["t"] == [0.0, 0.25, 0.5, 0.75, 1.0]
        assert abs(entry["barrier"]) < 1e-6 and abs(entry["aligned_barrier"]) < 1e-6
        assert max(entry["path_nll"]) - min(entry["path_nll"]) < 1e-6
    assert "BatchNorm statistics reset on the fit half" in rows_by_name(advice)["soup"]["note"]


def test_fine_tunes_of_one_base_recommend_a_merge_under_budget_one(fine_tunes, independent):
    _, _, advice = fine_tunes
    rows = rows_by_name(advice)
    chosen = rows[advice.recommendation]
    assert chosen["cost_ratio"] <= 1.0
    assert advice.recommendation in MERGES or (
        rows["soup"]["accuracy"] >= chosen["accuracy"] - TOLERANCE["accuracy"])
    # Fine-tunes of one base share a basin: their soup recovers the ensemble at a third of the cost.
    assert rows["soup"]["nll"] == pytest.approx(rows["ensemble"]["nll"], rel=TOLERANCE["nll"])
    assert rows["ties"]["nll"] is not None and "TIES" in rows["ties"]["note"]
    assert rows["ensemble"]["within_budget"] is False and rows["ensemble"]["cost_ratio"] == pytest.approx(3.0)
    tuned = max(e["barrier"] for e in advice.barriers.values())
    scattered = max(e["barrier"] for e in independent[1].barriers.values())
    assert tuned < scattered
    assert f"{tuned:.3f} nats" in advice.reason


def test_independent_members_ensemble_beats_soup_and_alignment_lowers_the_barrier(independent):
    _, advice = independent
    rows = rows_by_name(advice)
    assert min(rows[name]["nll"] for name in ENSEMBLE_KINDS if rows[name]["nll"] is not None) \
        <= rows["soup"]["nll"]
    assert rows["soup"]["nll"] > rows["ensemble"]["nll"] * (1 + TOLERANCE["nll"])  # no shared basin
    for entry in advice.barriers.values():
        assert entry["aligned_barrier"] < entry["barrier"]
    assert rows["pruned_subset"]["note"] == "skipped: no budget given"
    assert rows["ties"]["note"].startswith("skipped: needs base=")
    assert all(row["within_budget"] for row in advice.rows if row["nll"] is not None)


def test_budget_one_never_recommends_a_costlier_candidate(fine_tunes, data):
    _, models, advice = fine_tunes
    for row in advice.rows:
        if row["cost_ratio"] is not None:
            assert row["within_budget"] == (row["cost_ratio"] <= 1.0)
    assert rows_by_name(advice)[advice.recommendation]["cost_ratio"] <= 1.0
    _, (xv, yv) = data
    tight = ek.advise(models, xv, yv, budget=0.5, verbose=0)
    assert tight.recommendation is None and "no candidate fits" in tight.reason
    assert rows_by_name(tight)["pruned_subset"]["note"].startswith("skipped: budget=")


def test_different_architectures_skip_merges_with_a_reason(data, independent, capsys):
    (x, y), (xv, yv) = data
    models = [independent[0][0], train_mlp(5, x, y, epochs=3, learning_rate=1e-2, hidden=24)]
    advice = ek.advise(models, xv, yv, budget=1.0, verbose=1)
    rows = rows_by_name(advice)
    for name in (*MERGES, "packed"):
        assert rows[name]["nll"] is None
        assert rows[name]["note"].startswith("skipped: members differ in architecture: member 1")
    assert advice.barriers == {} and "weight-space merges skipped" in advice.notes[0]
    assert rows["ensemble"]["nll"] is not None and advice.recommendation is not None
    assert rows[advice.recommendation]["cost_ratio"] <= 1.0
    out = capsys.readouterr().out
    assert "recommendation: " + advice.recommendation in out and "members differ in architecture" in out


def test_bad_inputs_name_the_parameter(data, independent):
    _, (xv, yv) = data
    models, _ = independent
    cases = [
        (ValueError, "advise needs at least 2 members, got 1", dict(models=models[:1])),
        (TypeError, "models must be a list", dict(models=models[0])),
        (ValueError, "advise: y has 399 rows but x has 400", dict(y=yv[:-1])),
        (ValueError, r"advise: x does not fit model .*shapes \(400, 7\)|advise: x does not fit model", dict(x=xv[:, :7])),
        (ValueError, "budget must be None or a positive number", dict(budget=0)),
        (ValueError, "budget must be None or a positive number", dict(budget=-1.0)),
        (ValueError, "budget must be None or a positive number", dict(budget=True)),
        (ValueError, "Unknown cost 'flops'", dict(cost="flops")),
        (ValueError, "Unknown metric 'brier'", dict(metric="brier")),
        (TypeError, "base must be a keras.Model or a path", dict(base=3)),
    ]
    for error, message, change in cases:
        with pytest.raises(error, match=message):
            ek.advise(**{"models": models, "x": xv, "y": yv, "verbose": 0, **change})
    regression = keras.Sequential([keras.Input((8,)), keras.layers.Dense(1)])
    with pytest.raises(ValueError, match="member 0 .* its task cannot be told"):
        ek.advise([regression, regression], xv, yv, verbose=0)
    sigmoid = keras.Sequential([keras.Input((8,)), keras.layers.Dense(1, activation="sigmoid")])
    with pytest.raises(ValueError, match=r"y holds labels in \[0, 2\] but the models have 2 classes"):
        ek.advise([sigmoid, sigmoid], xv, yv, verbose=0)


def test_to_dict_and_table_hold_every_row(independent):
    _, advice = independent
    as_dict = json.loads(json.dumps(advice.to_dict()))
    assert [row["name"] for row in as_dict["rows"]] == [row["name"] for row in advice.rows]
    assert all(set(row) == set(ROW_KEYS) for row in as_dict["rows"])
    assert as_dict["recommendation"] == advice.recommendation and "models" not in as_dict
    assert set(as_dict["barriers"]) == {"0-1", "0-2"}
    table = str(advice)
    for row in advice.rows:
        line = next(line for line in table.splitlines() if line.startswith(row["name"] + " "))
        if row["nll"] is not None:
            assert f"{row['nll']:.4f}" in line and f"{row['accuracy']:.4f}" in line
    assert f"recommendation: {advice.recommendation}" in table and advice.reason in table


@pytest.mark.slow
def test_latency_cost_times_every_candidate(data, independent):
    _, (xv, yv) = data
    advice = ek.advise(independent[0][:2], xv, yv, budget=1.5, cost="latency", verbose=0)
    scored = [row for row in advice.rows if row["nll"] is not None]
    assert len(scored) >= 8 and all(row["latency_ms"] > 0 for row in scored)
    rows = rows_by_name(advice)
    # cost_ratio is latency over one member's (mean) latency, so ratios of rows match ratios of latencies.
    assert rows["ensemble"]["cost_ratio"] / rows["best_member"]["cost_ratio"] == pytest.approx(
        rows["ensemble"]["latency_ms"] / rows["best_member"]["latency_ms"], rel=1e-6)
    assert rows[advice.recommendation]["cost_ratio"] <= 1.5 * 1.1


def test_metric_accuracy_scores_the_same_rows(independent, data):
    _, (xv, yv) = data
    models, by_nll = independent
    by_accuracy = ek.advise(models, xv, yv, metric="accuracy", verbose=0)
    rows = rows_by_name(by_accuracy)
    best = max(r["accuracy"] for r in by_accuracy.rows if r["nll"] is not None)
    assert rows[by_accuracy.recommendation]["accuracy"] > best - TOLERANCE["accuracy"]
    assert rows_by_name(by_nll)["ensemble"]["nll"] == pytest.approx(rows["ensemble"]["nll"])


def test_candidates_are_registry_entries_with_the_registry_kind(independent):
    _, advice = independent
    assert [row["name"] for row in advice.rows] == list(CANDIDATES)
    for row in advice.rows:
        assert row["kind"] == compositions.get(CANDIDATES[row["name"]]).kind, row["name"]
    assert MERGES == ("soup", "aligned_soup", "ties")


def test_barriers_are_merge_loss_barrier_on_the_score_half(data, independent):
    from ensemblekit.merge import align, loss_barrier

    _, (xv, yv) = data
    models, advice = independent
    _, score = split_indices(len(xv), seed=0)
    for k in (1, 2):
        plain = loss_barrier(models[0], models[k], xv[score], yv[score])
        entry = advice.barriers[f"0-{k}"]
        assert entry["barrier"] == pytest.approx(plain.barrier, abs=1e-9)
        assert entry["path_nll"] == pytest.approx(plain.path, abs=1e-9)
    aligned = align(models, reference=0, seed=0)
    matched = loss_barrier(aligned[0], aligned[2], xv[score], yv[score])
    assert advice.barriers["0-2"]["aligned_barrier"] == pytest.approx(matched.barrier, abs=1e-6)


def test_distilled_student_is_a_candidate_with_its_training_cost_stated(data, members):
    (x, y), (x_val, y_val) = data
    without = {row["name"]: row for row in ek.advise(members, x_val, y_val, verbose=0).rows}
    assert without["distilled_student"]["note"].startswith("skipped: needs training inputs")
    advice = ek.advise(members, x_val, y_val, budget=1.0, verbose=0, train_data=(x, y))
    row = rows_by_name(advice)["distilled_student"]
    assert row["cost_ratio"] == 1.0 and row["within_budget"]
    assert "distilled from ensemble_mean" in row["note"] and "training took" in row["note"]
    assert row["params"] == rows_by_name(advice)["best_member"]["params"] and np.isfinite(row["nll"])
    student, best = advice.models["distilled_student"], advice.models["best_member"]
    assert not np.allclose(student.get_weights()[0], best.get_weights()[0])  # trained, on a copy
