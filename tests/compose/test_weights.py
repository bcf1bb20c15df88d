"""optimize_weights, select and calibrate on members of different quality."""

import keras
import numpy as np
import pytest

import ensemblekit as ek
from ensemblekit import metrics
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
    with pytest.raises(ValueError, match="y_val has 5 labels but x has 200"):
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
