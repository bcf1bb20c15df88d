"""optimize_weights, select and calibrate on members of different quality."""

import keras
import numpy as np
import pytest

import ensemblekit as ek
from ensemblekit import metrics
from ensemblekit.compose.weights import TASK_METRICS, greedy_selection, metric_loss, task_loss
from tests.conftest import make_mlp, train_mlp


@pytest.fixture(scope="module")
def good_and_bad(toy_data):
    """Two trained members and one untrained (bad) member."""
    x, y = toy_data
    trained = [train_mlp(seed, x[:120], y[:120], epochs=20, learning_rate=1e-2) for seed in range(2)]
    return trained + [make_mlp(7)]  # the third has random weights


def test_optimize_weights_beats_uniform_and_downweights_bad_member(good_and_bad, toy_data):
    x, y = toy_data
    w = ek.optimize_weights(good_and_bad, x[120:], y[120:])
    assert w.shape == (3,) and np.all(w >= 0) and np.isclose(w.sum(), 1.0)
    assert w[2] < min(w[0], w[1])
    uniform = ek.ensemble(good_and_bad).predict(x[120:], verbose=0)
    weighted = ek.ensemble(good_and_bad, "weighted", weights=w).predict(x[120:], verbose=0)
    assert metrics.nll(weighted, y[120:]) <= metrics.nll(uniform, y[120:]) + 1e-9


def test_optimize_weights_accuracy_metric_and_errors(good_and_bad, toy_data):
    x, y = toy_data
    w = ek.optimize_weights(good_and_bad, x[120:], y[120:], metric="accuracy")
    assert np.isclose(w.sum(), 1.0)
    with pytest.raises(ValueError, match="Unknown metric 'auc'"):
        ek.optimize_weights(good_and_bad, x, y, metric="auc")
    with pytest.raises(ValueError, match="optimize_weights: y has 5 rows but x has 200"):
        ek.optimize_weights(good_and_bad, x, y[:5])


def test_select_is_greedy_with_replacement_and_skips_bad_member(good_and_bad, toy_data):
    x, y = toy_data
    chosen = ek.select(good_and_bad, x[120:], y[120:], size=6)
    assert 1 <= len(chosen) <= 6
    assert 2 not in chosen
    probs = np.stack([metrics.predict_probs(m, x[120:]) for m in good_and_bad])
    best_single = min(metrics.nll(p, y[120:]) for p in probs)
    selected = probs[chosen].mean(axis=0)
    assert metrics.nll(selected, y[120:]) <= best_single + 1e-9
    assert chosen[0] == int(np.argmin([metrics.nll(p, y[120:]) for p in probs]))
    with pytest.raises(ValueError, match="size must be a positive integer"):
        ek.select(good_and_bad, x, y, size=0)


def test_select_is_greedy_selection_without_a_limit(good_and_bad, toy_data):
    x, y = toy_data
    probs = np.stack([metrics.predict_probs(m, x[120:]) for m in good_and_bad], axis=1)
    selection = greedy_selection(probs, y[120:], metric_loss("nll"), size=6)
    assert ek.select(good_and_bad, x[120:], y[120:], size=6) == selection.chosen
    assert selection.counts.tolist() == np.bincount(selection.chosen, minlength=3).tolist()
    assert selection.score == pytest.approx(metrics.nll(probs[:, selection.chosen].mean(axis=1), y[120:]))


def _three_members():
    """Members 0 and 1 fair, member 2 near perfect, on two samples of labels [0, 1]."""
    probs = np.array([[[0.7, 0.3], [0.55, 0.45], [0.99, 0.01]],
                      [[0.4, 0.6], [0.2, 0.8], [0.01, 0.99]]])
    return probs, np.array([0, 1])


def test_greedy_selection_pays_each_member_once_and_respects_the_limit():
    probs, y = _three_members()
    nll = metric_loss("nll")
    assert np.flatnonzero(greedy_selection(probs, y, nll).counts).tolist() == [2]
    for limit in (2.0, 3.9):  # the best member (cost 4) never fits; both fair ones do (repeats are free)
        cheap = greedy_selection(probs, y, nll, size=8, costs=[1, 1, 4], limit=limit)
        assert 2 not in cheap.chosen and set(cheap.chosen) == {0, 1} and len(cheap.chosen) > 2
        assert cheap.score == pytest.approx(nll(probs[:, cheap.chosen].mean(axis=1), y))
    assert greedy_selection(probs, y, nll, costs=[1, 1, 4], limit=4.0).chosen[0] == 2
    alone = greedy_selection(probs, y, nll, costs=[3, 3, 4], limit=4.0)  # 2 first, then nothing else fits
    assert set(alone.chosen) == {2}


def test_greedy_selection_errors():
    probs, y = _three_members()
    nll = metric_loss("nll")
    with pytest.raises(ValueError, match="size must be a positive integer, got 0"):
        greedy_selection(probs, y, nll, size=0)
    with pytest.raises(ValueError, match="limit needs costs"):
        greedy_selection(probs, y, nll, limit=1.0)
    with pytest.raises(ValueError, match=r"costs has shape \(2,\) but there are 3 members"):
        greedy_selection(probs, y, nll, costs=[1, 1], limit=1.0)
    with pytest.raises(ValueError, match="no member fits limit=0.5: the cheapest costs 1"):
        greedy_selection(probs, y, nll, costs=[1, 1, 4], limit=0.5)


def test_calibrate_lowers_nll_of_overconfident_model_and_keeps_accuracy(toy_data, tmp_path):
    x, y = toy_data
    model = make_mlp(3)
    model.compile(keras.optimizers.Adam(5e-2), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x[:60], y[:60], epochs=60, verbose=0)  # overfits a small set: overconfident
    calibrated = ek.calibrate(model, x[60:130], y[60:130])
    temperature = calibrated.get_layer("temperature_scaling").temperature
    assert temperature > 1.0
    before, after = ek.evaluate(model, x[130:], y[130:]), ek.evaluate(calibrated, x[130:], y[130:])
    assert after["nll"] < before["nll"]
    assert after["accuracy"] == before["accuracy"]
    path = tmp_path / "calibrated.keras"
    calibrated.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), calibrated.predict(x, verbose=0))


# --- tasks other than multiclass (issue "every kind of member") ---

def _task_members(units, activation, count=3):
    members = []
    for seed in range(count):
        keras.utils.set_random_seed(seed)
        members.append(keras.Sequential([keras.Input((4,)), keras.layers.Dense(units, activation=activation)],
                                        name=f"task_member_{seed}"))
    return members


def test_optimize_weights_and_select_for_regression_prefer_the_accurate_member():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 4)).astype("float32")
    members = _task_members(1, None)
    y = members[1].predict(x, verbose=0)[:, 0] + rng.normal(scale=0.01, size=200)
    weights = ek.optimize_weights(members, x, y, task="regression")
    assert weights.argmax() == 1 and weights[1] > 0.9
    chosen = ek.select(members, x, y, task="regression", metric="mae")
    assert set(chosen) == {1}
    with pytest.raises(ValueError, match=r"^Unknown metric 'nll' for regression members; expected one of 'mse', "
                                         r"'rmse', 'mae'\.$"):
        ek.optimize_weights(members, x, y, metric="nll", task="regression")


def test_optimize_weights_for_binary_members_scores_the_positive_class_probability():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(300, 4)).astype("float32")
    members = _task_members(1, "sigmoid")
    y = (members[2].predict(x, verbose=0)[:, 0] > rng.uniform(size=300)).astype(int)
    weights = ek.optimize_weights(members, x, y)
    assert weights.argmax() == 2
    assert ek.select(members, x, y, metric="auroc")[0] == 2  # greedy steps need no smooth metric


def test_optimize_weights_and_select_for_multilabel_members_prefer_the_member_the_labels_follow():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(300, 4)).astype("float32")
    members = _task_members(3, "sigmoid")
    p = members[1].predict(x, verbose=0)
    y = (p > rng.uniform(size=p.shape)).astype("float32")  # each label drawn from member 1's probability
    weights = ek.optimize_weights(members, x, y, task="multilabel")
    assert weights.argmax() == 1 and weights[1] > 0.8
    assert ek.select(members, x, y)[0] == 1
    nll = task_loss("nll", "multilabel")[1]
    stacked = np.stack([m.predict(x, verbose=0) for m in members], axis=1)
    weighted = np.einsum("k,nkl->nl", weights, stacked)
    assert nll(weighted, y) <= nll(stacked.mean(axis=1), y) + 1e-9
    with pytest.raises(ValueError, match=r"y must hold 0/1 targets of shape \(300, 3\)"):
        ek.optimize_weights(members, x, y[:, :2])


def test_task_loss_is_the_one_rule_binary_as_ek_evaluate_multilabel_as_its_macro_means():
    p, y = np.array([0.9, 0.3, 0.6, 0.2]), np.array([1, 0, 0, 1])
    assert task_loss(None, "binary")[0] == "nll" and task_loss(None, "regression")[0] == "mse"
    assert task_loss("brier", "binary")[1](p, y) == pytest.approx(np.mean((p - y) ** 2))  # not the two-class 2x
    assert task_loss("nll", "binary")[1](p, y) == pytest.approx(metrics.nll(np.stack([1 - p, p], 1), y))
    assert task_loss("auroc", "binary")[1](p, y) == -metrics.auroc(p, y)  # higher is better: negated
    labels = np.array([[0.9, 0.2, 0.6], [0.3, 0.7, 0.4], [0.8, 0.6, 0.1], [0.1, 0.4, 0.7]])
    targets = np.array([[1, 0, 1], [0, 1, 0], [1, 0, 0], [0, 1, 1]])
    macro = metrics.multilabel_metrics(labels, targets)  # what ek.evaluate reports for multilabel outputs
    for name in TASK_METRICS["multilabel"]:
        sign = -1 if name in metrics.HIGHER_IS_BETTER else 1
        assert task_loss(name, "multilabel")[1](labels, targets) == pytest.approx(sign * macro[name]), name
    with pytest.raises(ValueError, match=r"^Unknown metric 'mse' for binary members; expected one of 'nll', "
                                         r"'brier', 'accuracy', 'ece', 'auroc'\.$"):
        task_loss("mse", "binary")
    with pytest.raises(ValueError, match=r"^Unknown task 'ranking'; expected one of 'multiclass', "):
        task_loss(None, "ranking")


def test_calibrate_binary_is_platt_scaling(tmp_path):
    rng = np.random.default_rng(2)
    x = rng.normal(size=(400, 4)).astype("float32")
    model = _task_members(1, None, count=1)[0]
    z = model.predict(x, verbose=0)[:, 0]
    y = (rng.uniform(size=400) < 1 / (1 + np.exp(-(0.5 * z - 0.3)))).astype(int)
    calibrated = ek.calibrate(model, x, y, task="binary", output_kind="logits")
    layer = calibrated.layers[-1]
    assert abs(layer.slope - 0.5) < 0.25 and abs(layer.bias + 0.3) < 0.3
    p = calibrated.predict(x, verbose=0)[:, 0]
    np.testing.assert_allclose(p, 1 / (1 + np.exp(-(layer.slope * z + layer.bias))), atol=1e-5)
    path = tmp_path / "platt.keras"
    calibrated.save(path)
    np.testing.assert_array_equal(keras.saving.load_model(path, safe_mode=True).predict(x, verbose=0)[:, 0], p)


def test_calibrate_multilabel_per_label_fits_each_labels_own_platt_scaling(tmp_path):
    from ensemblekit.compose.layers import PlattScaling
    from ensemblekit.compose.weights import fit_platt

    rng = np.random.default_rng(4)
    x = rng.normal(size=(1500, 4)).astype("float32")
    model = _task_members(3, None, count=1)[0]  # three logits
    z = model.predict(x, verbose=0)
    truth = np.array([[0.5, -0.3], [2.0, 0.5], [1.0, 0.0]])  # each label's own (slope, bias)
    y = (rng.uniform(size=z.shape) < 1 / (1 + np.exp(-(z * truth[:, 0] + truth[:, 1])))).astype("float32")
    shared = ek.calibrate(model, x[:1000], y[:1000], task="multilabel", output_kind="logits")
    per_label = ek.calibrate(model, x[:1000], y[:1000], task="multilabel", output_kind="logits", per_label=True)
    layer = per_label.get_layer("platt_scaling")
    assert isinstance(shared.get_layer("platt_scaling").slope, float) and len(layer.slope) == 3
    for label in range(3):  # the fit of each column alone, and near the truth
        assert (layer.slope[label], layer.bias[label]) == pytest.approx(fit_platt(z[:1000, label], y[:1000, label]))
        assert abs(layer.slope[label] - truth[label, 0]) < 0.3 and abs(layer.bias[label] - truth[label, 1]) < 0.3
    p = per_label.predict(x, verbose=0)
    np.testing.assert_allclose(p, 1 / (1 + np.exp(-(z * np.array(layer.slope) + np.array(layer.bias)))), atol=1e-5)
    held = [metrics.multilabel_metrics(m.predict(x[1000:], verbose=0), y[1000:])["nll"] for m in (shared, per_label)]
    assert held[1] < held[0]  # labels miscalibrated in different ways: one (a, b) cannot fix all three
    path = tmp_path / "per_label.keras"
    per_label.save(path)
    np.testing.assert_array_equal(keras.saving.load_model(path, safe_mode=True).predict(x, verbose=0), p)
    assert PlattScaling.from_config(layer.get_config()).slope == layer.slope
    with pytest.raises(ValueError, match="per_label=True applies to binary and multilabel models"):
        ek.calibrate(_task_members(3, "softmax", count=1)[0], x, np.arange(len(x)) % 3, per_label=True)


def test_calibrate_regression_scales_the_std_to_cover():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(2000, 4)).astype("float32")
    members = _task_members(1, None, count=4)
    ens = ek.ensemble(members, task="regression", uncertainty=True)
    out = ens.predict(x, verbose=0)
    y = out["prediction"][:, 0] + rng.normal(size=2000) * 3.0 * out["std"][:, 0]
    calibrated = ek.calibrate(ens, x[:1000], y[:1000])
    assert 2.5 < calibrated.get_layer("std_scaling").scale < 3.5
    held = calibrated.predict(x[1000:], verbose=0)
    covered = np.abs(y[1000:] - held["prediction"][:, 0]) <= 1.96 * held["std"][:, 0]
    assert abs(covered.mean() - 0.95) < 0.03
    with pytest.raises(ValueError, match="outputs values only"):
        ek.calibrate(members[0], x, y, task="regression")
