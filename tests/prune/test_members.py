"""ensemblekit.prune.members: greedy member selection under a cost budget."""

import keras
import numpy as np
import pytest

import ensemblekit as ek
from ensemblekit.prune import members
from ensemblekit.costs import model_costs
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
    costs = model_costs(models, "params")
    kept = members(models, xv, yv, budget=0.3)
    assert 2 not in kept.indices  # the big member alone exceeds 30% of the parameters
    assert 3 not in kept.indices  # the untrained member only hurts
    assert kept.used <= 0.3 and kept.used == pytest.approx(costs[kept.indices].sum() / costs.sum())
    assert sum(kept.weights) == pytest.approx(1.0)
    singles = [ek.evaluate(models[i], xv, yv)["nll"] for i in (0, 1)]
    assert kept.score <= min(singles) + 1e-9
    assert kept.model.count_params() < sum(m.count_params() for m in models)


def test_full_budget_can_keep_everything_useful_and_takes_an_ensemble_model(trained_members):
    models, (xv, yv) = trained_members
    kept = members(ek.ensemble(models), xv, yv, budget=1.0)
    assert 3 not in kept.indices and kept.score <= kept.full_score
    probs = kept.model.predict(xv, verbose=0)
    assert probs.shape == (len(xv), 3) and np.allclose(probs.sum(axis=1), 1.0, atol=1e-5)


def test_custom_costs_steer_the_selection(trained_members):
    models, (xv, yv) = trained_members
    kept = members(models, xv, yv, budget=0.25, cost=[10.0, 10.0, 1.0, 1.0])
    assert kept.indices == [2] or set(kept.indices) <= {2, 3}


def test_bad_budgets_and_costs_get_clear_errors(trained_members):
    models, (xv, yv) = trained_members
    for bad in (0, 1.5, -0.2):
        with pytest.raises(ValueError, match=r"budget must be a fraction .* in \(0, 1\]"):
            members(models, xv, yv, budget=bad)
    with pytest.raises(ValueError, match="cheapest member"):
        members(models, xv, yv, budget=0.01)
    with pytest.raises(ValueError, match="Unknown cost"):
        members(models, xv, yv, cost="flops")
    with pytest.raises(ValueError, match="4 positive numbers"):
        members(models, xv, yv, cost=[1.0, 2.0])
    with pytest.raises(ValueError, match="nested member models"):
        members(models[0], xv, yv)
