"""ek.stack: meta-learner in the graph, fold logic, save/load, errors."""

import keras
import numpy as np
import pytest
from scipy import special

import ensemblekit as ek
from tests.conftest import train_mlp


@pytest.fixture(scope="module")
def members(toy_data):
    x, y = toy_data
    return [train_mlp(seed, x[:100], y[:100], epochs=3) for seed in range(3)]


def test_logistic_head_starts_at_geometric_mean(members, toy_data):
    x, y = toy_data
    # cv folds of 2 samples and zero epochs: the untrained head is the geometric-mean ensemble.
    model = ek.stack(members, x[100:], y[100:], epochs=0, cv=2)
    geometric = ek.ensemble(members, "geometric").predict(x, verbose=0)
    np.testing.assert_allclose(model.predict(x, verbose=0), geometric, atol=1e-5)


def test_stack_graph_save_load_and_meta_features(members, toy_data, tmp_path):
    x, y = toy_data
    model = ek.stack(members, x[100:], y[100:], meta="mlp", cv=3, epochs=5)
    meta = model.get_layer("meta")
    assert meta.input_shape == (None, 9) if hasattr(meta, "input_shape") else True
    logp = np.concatenate(
        [special.log_softmax(m.predict(x, verbose=0), axis=1) for m in members], axis=1)
    np.testing.assert_allclose(model.predict(x, verbose=0), meta.predict(logp, verbose=0), atol=1e-5)
    path = tmp_path / "stack.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), model.predict(x, verbose=0))


def test_passthrough_adds_raw_input(members, toy_data):
    x, y = toy_data
    model = ek.stack(members, x[100:], y[100:], passthrough=True, cv=2, epochs=2)
    assert model.get_layer("meta").inputs[0].shape[-1] == 9 + 8


def test_custom_meta_model_is_cloned(members, toy_data):
    x, y = toy_data
    custom = keras.Sequential([keras.Input((9,)), keras.layers.Dense(3, activation="softmax")])
    before = [w.copy() for w in custom.get_weights()]
    model = ek.stack(members, x[100:], y[100:], meta=custom, cv=2, epochs=3)
    assert model.predict(x[:4], verbose=0).shape == (4, 3)
    for a, b in zip(before, custom.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_refit_members_trains_copies_per_fold(members, toy_data):
    x, y = toy_data
    originals = [m.get_weights() for m in members]
    model = ek.stack(members, x[:80], y[:80], cv=2, epochs=1, refit_members=True, member_epochs=1)
    nested = [layer for layer in model.layers if isinstance(layer, keras.Model) and layer.name != "meta"]
    assert len(nested) == 3
    for member, weights in zip(members, originals):  # the given members are not modified
        for a, b in zip(weights, member.get_weights()):
            np.testing.assert_array_equal(a, b)


def test_stack_errors(members, toy_data):
    x, y = toy_data
    with pytest.raises(ValueError, match="Unknown meta 'forest'"):
        ek.stack(members, x, y, meta="forest")
    with pytest.raises(ValueError, match="cv must be an integer between 2"):
        ek.stack(members, x, y, cv=1)
    with pytest.raises(ValueError, match="stack: y has 10 rows but x has 200"):
        ek.stack(members, x, y[:10])
    with pytest.raises(ValueError, match=r"labels in \[7, 7\] but the models have 3 classes"):
        ek.stack(members, x, np.full(200, 7))


@pytest.mark.parametrize("task,units,activation", [("binary", 1, "sigmoid"), ("regression", 2, None)])
def test_stack_binary_and_regression_members(task, units, activation, tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(120, 4)).astype("float32")
    members = []
    for seed in range(3):
        keras.utils.set_random_seed(seed)
        members.append(keras.Sequential([keras.Input((4,)), keras.layers.Dense(units, activation=activation)],
                                        name=f"{task}_{seed}"))
    outputs = np.stack([m.predict(x, verbose=0) for m in members], axis=1)
    y = (outputs[:, 0, 0] > 0.5).astype(int) if task == "binary" else outputs[:, 2] + 0.01 * rng.normal(size=(120, 2))
    model = ek.stack(members, x, y, cv=3, epochs=40, task=task if activation is None else None, verbose=0)
    pred = model.predict(x, verbose=0)
    assert pred.shape == (120, units)
    if task == "binary":  # the labels follow member 0: the meta-learner weights it most
        kernel = model.get_layer("meta").layers[-1].get_weights()[0][:, 0]
        assert np.argmax(kernel) == 0 and kernel[0] > 1 / 3
        assert ((pred[:, 0] > 0.5) == y).mean() >= 0.75
        assert ((pred >= 0) & (pred <= 1)).all()
    else:  # the meta-learner moves toward member 2, which the targets follow
        mean_error = np.mean((outputs.mean(axis=1) - y) ** 2)
        assert np.mean((pred - y) ** 2) < mean_error
    path = tmp_path / "stack.keras"
    model.save(path)
    np.testing.assert_allclose(keras.saving.load_model(path, safe_mode=True).predict(x, verbose=0), pred, atol=1e-6)
    with pytest.raises(ValueError, match="refit_members=True .* not " + task):
        ek.stack(members, x, y, cv=2, refit_members=True, task=task, verbose=0)
