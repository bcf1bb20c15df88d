"""ensemblekit.prune.select_members: greedy member selection under a cost budget."""

import re

import keras
import numpy as np
import pytest

import ensemblekit as ek
from ensemblekit.costs import model_costs
from ensemblekit.prune import select_members
from tests.conftest import make_mlp


@pytest.fixture(scope="module")
def trained_members():
    """Two small trained MLPs, one big trained MLP, one untrained (bad) MLP (toy_data's task)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 8)).astype("float32")
    y = (x[:, 0] > 0).astype("int64") + (x[:, 1] > 0.5).astype("int64")
    models = []
    for seed, hidden, epochs in [(0, 8, 20), (1, 8, 20), (2, 96, 20), (3, 8, 0)]:
        model = make_mlp(seed, hidden=hidden, name=f"m{seed}")
        if epochs:
            model.compile(keras.optimizers.Adam(0.02), keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                          jit_compile=False)
            model.fit(x[:120], y[:120], epochs=epochs, batch_size=40, verbose=0)
        models.append(model)
    return models, (x[120:], y[120:])


def test_selection_respects_the_budget_and_drops_the_useless_member(trained_members):
    models, (xv, yv) = trained_members
    costs = model_costs(models, "params")  # 99, 99, 1155, 99: mean 363
    kept = select_members(models, xv, yv, budget=1.2)  # 1.2 x 363 = 435.6 parameters
    assert 2 not in kept.indices  # the big member alone costs 3.2 mean members
    assert 3 not in kept.indices  # the untrained member only hurts
    assert kept.used <= 1.2 and kept.used == pytest.approx(costs[kept.indices].sum() / costs.mean())
    assert kept.budget == 1.2
    assert sum(kept.weights) == pytest.approx(1.0)
    singles = [ek.evaluate(models[i], xv, yv)["nll"] for i in (0, 1)]
    assert kept.score <= min(singles) + 1e-9
    assert kept.model.count_params() < sum(m.count_params() for m in models)


def test_full_budget_can_keep_everything_useful_and_takes_an_ensemble_model(trained_members):
    models, (xv, yv) = trained_members
    kept = select_members(ek.ensemble(models), xv, yv, budget=4.0)  # K = 4: all members fit
    assert 3 not in kept.indices and kept.score <= kept.full_score
    probs = kept.model.predict(xv, verbose=0)
    assert probs.shape == (len(xv), 3) and np.allclose(probs.sum(axis=1), 1.0, atol=1e-5)


def test_budget_counts_mean_member_costs(trained_members):
    models, (xv, yv) = trained_members
    costs = [1.0, 1.0, 4.0]  # mean 2: budget 1.0 allows 2, budget 2.0 allows 4, budget 3.0 allows 6
    one = select_members(models[:3], xv, yv, budget=1.0, cost=costs)
    assert 2 not in one.indices and one.used <= 1.0
    two = select_members(models[:3], xv, yv, budget=2.0, cost=costs)
    assert two.indices == [2] or 2 not in two.indices  # the 4-cost member never with another
    assert two.used <= 2.0
    three = select_members(models[:3], xv, yv, budget=3.0, cost=costs)
    assert 2 in three.indices  # the big trained member is chosen once it fits
    assert three.used == pytest.approx(sum(costs[i] for i in three.indices) / 2.0) and three.used <= 3.0


def test_default_budget_is_half_the_ensemble(trained_members):
    models, (xv, yv) = trained_members
    default = select_members(models, xv, yv)
    half = select_members(models, xv, yv, budget=2.0)
    assert default.budget == 2.0 and default.used <= 2.0
    assert default.indices == half.indices and default.weights == half.weights


def test_custom_costs_steer_the_selection(trained_members):
    models, (xv, yv) = trained_members
    kept = select_members(models, xv, yv, budget=1.0, cost=[10.0, 10.0, 1.0, 1.0])  # mean 5.5: no 10 fits
    assert kept.indices == [2] or set(kept.indices) <= {2, 3}


def test_latency_cost_times_every_member():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(30, 8)).astype("float32"), np.arange(30) % 3
    tiny = [make_mlp(seed, hidden=4, name=f"tiny{seed}") for seed in range(3)]
    kept = select_members(tiny, x, y, cost="latency")
    assert len(kept.cost) == 3 and all(isinstance(c, float) and c > 0 for c in kept.cost)
    assert kept.budget == 1.5 and kept.used <= 1.5 + 1e-9


def test_bad_budgets_and_costs_get_clear_errors(trained_members):
    models, (xv, yv) = trained_members
    for bad in (0, -0.2, float("nan"), float("inf"), True, "half"):
        with pytest.raises(ValueError, match=r"budget must be None or a positive number of mean member costs"):
            select_members(models, xv, yv, budget=bad)
    with pytest.raises(ValueError, match=re.escape(
            "budget=0.01 allows 0.01 x the members' mean cost of 363 parameters = 3.63 parameters, but the "
            "cheapest member, member 0 ('m0'), costs 99 parameters: budget must be at least 0.273.")):
        select_members(models, xv, yv, budget=0.01)
    with pytest.raises(ValueError, match="Unknown cost"):
        select_members(models, xv, yv, cost="flops")
    with pytest.raises(ValueError, match="4 positive numbers"):
        select_members(models, xv, yv, cost=[1.0, 2.0])
    with pytest.raises(ValueError, match="size must be a positive integer, got 0"):
        select_members(models, xv, yv, size=0)
    with pytest.raises(ValueError, match="select_members\\(\\): steps must be a positive integer or None"):
        select_members(models, xv, yv, steps=0)
    with pytest.raises(ValueError, match="nested member models"):
        select_members(models[0], xv, yv)


def _synthetic(task, seed=0):
    """200 samples of 8 features: 0/1 labels (binary) or noisy values (regression); 120 to train, 80 to select."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(200, 8)).astype("float32")
    signal = x[:, 0] + 0.5 * x[:, 1] - 0.5 * x[:, 2] * x[:, 3]
    if task == "binary":
        y = (signal > 0).astype("int64")
    else:
        y = (signal + 0.1 * rng.normal(size=200)).astype("float32")
    return (x[:120], y[:120]), (x[120:], y[120:])


def _task_members(task):
    """Two small trained MLPs, one big trained MLP, one small MLP trained on flipped targets (a bad
    member); one output unit each."""
    (x, y), validation = _synthetic(task)
    flipped = 1 - y if task == "binary" else -y
    loss = "binary_crossentropy" if task == "binary" else "mse"
    models = []
    for seed, hidden, targets in [(0, 8, y), (1, 8, y), (2, 96, y), (3, 8, flipped)]:
        model = make_mlp(seed, classes=1, hidden=hidden, name=f"{task[0]}{seed}")
        if task == "binary":  # the MLP's logits, then a sigmoid
            model = keras.Sequential([model, keras.layers.Activation("sigmoid")], name=f"{task[0]}{seed}")
        model.compile(keras.optimizers.Adam(0.02), loss, jit_compile=False)
        model.fit(x, targets, epochs=12, batch_size=40, verbose=0)
        models.append(model)
    return models, validation


@pytest.fixture(scope="module")
def binary_members():
    return _task_members("binary")


@pytest.fixture(scope="module")
def regression_members():
    return _task_members("regression")


def _weighted_mean(models, kept, x, logits=False):
    """The numpy reference: the kept members' predictions ``(n,)`` averaged with the selection's weights."""
    outputs = [np.asarray(models[i].predict(x, verbose=0), dtype="float64")[:, 0] for i in kept.indices]
    if logits:
        outputs = [1.0 / (1.0 + np.exp(-out)) for out in outputs]
    return sum(w * out for w, out in zip(kept.weights, outputs))


def _bernoulli_nll(p, y):
    p = np.clip(p, 1e-7, 1 - 1e-7)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def test_binary_members_are_detected_and_scored_on_the_positive_class(binary_members):
    models, (xv, yv) = binary_members
    kept = select_members(models, xv, yv, budget=1.2)
    assert (kept.task, kept.metric) == ("binary", "nll")
    assert 2 not in kept.indices and 3 not in kept.indices  # too big for the budget; flipped
    assert kept.used <= 1.2 and sum(kept.weights) == pytest.approx(1.0)
    p = _weighted_mean(models, kept, xv)
    assert kept.score == pytest.approx(_bernoulli_nll(p, yv), rel=1e-4)
    np.testing.assert_allclose(kept.model.predict(xv, verbose=0)[:, 0], p, atol=1e-5)  # one unit, like the members
    everything = np.mean([np.asarray(m.predict(xv, verbose=0), "float64")[:, 0] for m in models], axis=0)
    assert kept.full_score == pytest.approx(_bernoulli_nll(everything, yv), rel=1e-4)
    accuracy = select_members(models, xv, yv, budget=1.2, metric="accuracy")
    assert accuracy.metric == "accuracy" and 0.5 < accuracy.score <= 1.0  # the value, higher is better
    assert accuracy.score == pytest.approx(np.mean((_weighted_mean(models, accuracy, xv) > 0.5) == yv))
    assert accuracy.full_score == pytest.approx(np.mean((everything > 0.5) == yv))


def test_binary_logit_members_need_task_binary_and_give_probabilities(binary_members):
    sigmoid_members, (xv, yv) = binary_members
    models = [member.layers[0] for member in sigmoid_members]  # the trained MLPs, logits out
    with pytest.raises(ValueError, match="pass task='binary'"):
        select_members(models, xv, yv)
    kept = select_members(models, xv, yv, budget=3.0, task="binary", metric="brier")
    assert kept.task == "binary" and 3 not in kept.indices and kept.used <= 3.0
    p = _weighted_mean(models, kept, xv, logits=True)
    assert kept.score == pytest.approx(np.mean((p - yv) ** 2), rel=1e-4)  # binary Brier, as ek.evaluate's
    if len(kept.indices) > 1:
        np.testing.assert_allclose(kept.model.predict(xv, verbose=0)[:, 0], p, atol=1e-5)


def test_regression_selection_scores_the_weighted_mean_of_values(regression_members):
    models, (xv, yv) = regression_members
    costs = model_costs(models, "params")
    kept = select_members(models, xv, yv, budget=1.2, task="regression")
    assert (kept.task, kept.metric) == ("regression", "mse")
    assert 2 not in kept.indices and 3 not in kept.indices
    assert kept.used <= 1.2 and kept.used == pytest.approx(costs[kept.indices].sum() / costs.mean())
    values = _weighted_mean(models, kept, xv)
    assert kept.score == pytest.approx(np.mean((values - yv) ** 2), rel=1e-5)
    np.testing.assert_allclose(np.asarray(kept.model.predict(xv, verbose=0))[:, 0], values, rtol=1e-5, atol=1e-5)
    assert kept.score < kept.full_score  # the flipped member hurts the plain mean
    rmse = select_members(models, xv, yv, budget=1.2, task="regression", metric="rmse")
    assert rmse.indices == kept.indices and rmse.score == pytest.approx(np.sqrt(kept.score), rel=1e-6)
    mae = select_members(models, xv, yv, budget=1.2, task="regression", metric="mae")
    assert mae.score == pytest.approx(np.mean(np.abs(_weighted_mean(models, mae, xv) - yv)), rel=1e-5)


def test_task_mismatches_get_errors_naming_the_metric_and_the_task(binary_members, regression_members):
    binary, (xb, yb) = binary_members
    regressors, (xr, yr) = regression_members
    with pytest.raises(ValueError, match=r"^Unknown metric 'mse' for binary members; expected one of 'nll', "):
        select_members(binary, xb, yb, metric="mse")
    with pytest.raises(ValueError, match=r"^Unknown metric 'nll' for regression members; expected one of 'mse', "
                                         r"'rmse', 'mae'\.$"):
        select_members(regressors, xr, yr, task="regression", metric="nll")
    with pytest.raises(ValueError, match=r"^Unknown metric 'rmse' for multiclass members"):
        select_members(make_three_class(), xb, yb % 3, metric="rmse")
    with pytest.raises(ValueError, match="task 'multiclass' "):
        select_members(regressors, xr, yr, task="multiclass")
    with pytest.raises(ValueError, match="^y must hold integer class labels"):
        select_members(binary, xb, yr)  # values are not 0/1 labels
    multilabel = [keras.Sequential([keras.Input((8,)), keras.layers.Dense(3, activation="sigmoid")])
                  for _ in range(2)]
    with pytest.raises(ValueError, match=r"^Unknown metric 'mse' for multilabel members; expected one of 'nll', "):
        select_members(multilabel, xb, np.stack([yb] * 3, axis=1), metric="mse")


def test_multilabel_selection_scores_the_mean_per_label_nll(binary_members):
    _, (xv, yv) = binary_members
    targets = np.stack([yv, 1 - yv, (xv[:, 0] > 0).astype("int64")], axis=1)
    models = []
    for seed in range(3):
        keras.utils.set_random_seed(seed)
        models.append(keras.Sequential([keras.Input((xv.shape[1],)), keras.layers.Dense(3, activation="sigmoid")],
                                       name=f"labels_{seed}"))
    kept = select_members(models, xv, targets, budget=2.0)
    assert (kept.task, kept.metric) == ("multilabel", "nll") and len(kept.indices) <= 2
    outputs = [np.asarray(models[i].predict(xv, verbose=0), "float64") for i in kept.indices]
    p = sum(w * out for w, out in zip(kept.weights, outputs))
    assert kept.score == pytest.approx(_bernoulli_nll(p, targets), rel=1e-4)  # every label's NLL, averaged
    np.testing.assert_allclose(np.asarray(kept.model.predict(xv, verbose=0)), p, atol=1e-5)


def make_three_class():
    return [make_mlp(seed, hidden=4, name=f"c{seed}") for seed in range(2)]
