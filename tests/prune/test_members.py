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
    with pytest.raises(ValueError, match="steps must be a positive integer, got 0"):
        select_members(models, xv, yv, steps=0)
    with pytest.raises(ValueError, match="nested member models"):
        select_members(models[0], xv, yv)
