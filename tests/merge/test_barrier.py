"""ensemblekit.merge.barrier: the loss barrier on the linear path between two models."""

import keras
import numpy as np
import pytest

from ensemblekit import metrics
from ensemblekit.merge import align, loss_barrier, merge
from tests.conftest import bn_model_and_copy, make_mlp, train_mlp


@pytest.fixture(scope="module")
def digits():
    from ensemblekit.datasets import load_digits

    return load_digits(seed=0)


@pytest.fixture(scope="module")
def digit_members(digits):
    """Two MLPs trained independently (different seeds) on scikit-learn's digits."""
    (x, y), _ = digits
    return [train_mlp(seed, x, y, epochs=15, learning_rate=3e-3, input_shape=(8, 8, 1), classes=10, hidden=32)
            for seed in (0, 1)]


def _nll(model, x, y):
    return metrics.nll(metrics.as_probs(np.asarray(model(x, training=False)), model), y)


def test_a_model_against_itself_has_barrier_zero(toy_data):
    x, y = toy_data
    model = train_mlp(0, x, y, epochs=3, learning_rate=1e-2)
    result = loss_barrier(model, model, x, y)
    assert abs(result.barrier) < 1e-6
    assert result.t == (0.0, 0.25, 0.5, 0.75, 1.0) and len(result.path) == 5
    assert max(result.path) - min(result.path) < 1e-6
    assert result.path[0] == pytest.approx(_nll(model, x, y), abs=1e-6)


def test_independent_members_on_digits_have_a_positive_barrier_that_alignment_lowers(digits, digit_members):
    _, (x_test, y_test) = digits
    first, second = digit_members
    plain = loss_barrier(first, second, x_test, y_test)
    assert plain.barrier > 0.1  # measured 0.44 nats (0.05 after align): two basins
    assert plain.path[0] == pytest.approx(_nll(first, x_test, y_test), abs=1e-6)
    assert plain.path[-1] == pytest.approx(_nll(second, x_test, y_test), abs=1e-6)
    # the definition, point by point
    for t, loss in zip(plain.t, plain.path):
        middle = merge([first, second], "linear", weights=[1 - t, t])
        assert loss == pytest.approx(_nll(middle, x_test, y_test), abs=1e-6), t
    expected = max(loss - ((1 - t) * plain.path[0] + t * plain.path[-1]) for t, loss in zip(plain.t, plain.path))
    assert plain.barrier == pytest.approx(expected, abs=1e-12)
    aligned = align([first, second], reference=0)
    assert loss_barrier(*aligned, x_test, y_test).barrier < plain.barrier


def test_batchnorm_copies_with_reset_have_barrier_zero_and_every_point_is_reset(toy_data):
    x, y = toy_data
    model, copy = bn_model_and_copy(x, y)
    result = loss_barrier(model, copy, x, y, reset_bn_data=x)
    assert abs(result.barrier) < 1e-6
    # Endpoints are reset too: their NLL is the reset model's, not the member's running statistics'.
    from ensemblekit.merge import reset_bn

    reset = keras.models.clone_model(model)
    reset.set_weights(model.get_weights())
    assert result.path[0] == pytest.approx(_nll(reset_bn(reset, x), x, y), abs=1e-6)


def test_custom_points_and_one_hot_labels(toy_data):
    x, y = toy_data
    a, b = make_mlp(0), make_mlp(1)
    result = loss_barrier(a, b, x, np.eye(3)[y], points=[0, 0.5, 1])
    assert result.t == (0.0, 0.5, 1.0) and len(result.path) == 3
    assert result.barrier == pytest.approx(loss_barrier(a, b, x, y, points=(0, 0.5, 1)).barrier, abs=1e-12)


@pytest.mark.parametrize("points", [(0, 1), (0.25, 0.5, 1), (0, 0.5, 0.5, 1), (0, 0.7, 0.3, 1), (0, 0.5, 2)])
def test_bad_points_are_one_line_errors(points, toy_data):
    x, y = toy_data
    with pytest.raises(ValueError, match=r"points must rise strictly from 0 to 1 with at least one point between"):
        loss_barrier(make_mlp(0), make_mlp(1), x, y, points=points)
    with pytest.raises(TypeError, match="points must be a sequence of numbers"):
        loss_barrier(make_mlp(0), make_mlp(1), x, y, points="abc")
    with pytest.raises(ValueError, match="loss_barrier: y has 199 rows but x has 200"):
        loss_barrier(make_mlp(0), make_mlp(1), x, y[:-1])


def _regression_data(n=200, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 8)).astype("float32")
    return x, (np.sin(x[:, 0]) + 0.5 * x[:, 1] ** 2).astype("float32")


def _fit(seed, x, y, activation, loss, hidden=16):
    keras.utils.set_random_seed(seed)
    layers = [keras.layers.Dense(hidden, "relu")] if hidden else []
    model = keras.Sequential([keras.Input((x.shape[1],)), *layers, keras.layers.Dense(1, activation=activation)])
    model.compile(keras.optimizers.Adam(1e-2), loss)
    model.fit(x, y, epochs=20, verbose=0)
    return model


def test_regression_barrier_is_in_mse_zero_for_linear_models_positive_for_mlps():
    x, y = _regression_data()
    a, b = (_fit(seed, x, y, None, "mse") for seed in (0, 1))
    result = loss_barrier(a, b, x, y, task="regression")
    prediction = np.asarray(a(x, training=False))[:, 0]
    assert result.path[0] == pytest.approx(float(np.mean((prediction - y) ** 2)), rel=1e-5)
    assert result.barrier > 0  # independent hidden units: averaging them breaks the function
    # A linear model's output is linear in its weights, so the MSE along the path is convex: no barrier.
    lin_a, lin_b = (_fit(seed, x, y, None, "mse", hidden=0) for seed in (0, 1))
    assert loss_barrier(lin_a, lin_b, x, y, task="regression").barrier == pytest.approx(0.0, abs=1e-9)


def test_binary_barrier_is_binary_cross_entropy_and_alignment_lowers_it():
    x, y = _regression_data()
    labels = (y > np.median(y)).astype("int64")
    a, b = (_fit(seed, x, labels, "sigmoid", "binary_crossentropy") for seed in (0, 1))
    result = loss_barrier(a, b, x, labels)  # one sigmoid unit: detected as binary
    p = np.asarray(b(x, training=False))[:, 0]
    assert result.path[-1] == pytest.approx(metrics.binary_nll(p, labels), abs=1e-6)
    assert loss_barrier(a, a, x, labels).barrier == pytest.approx(0.0, abs=1e-9)
    aligned = align([a, b], reference=0, seed=0, verbose=0)
    assert loss_barrier(aligned[0], aligned[1], x, labels).barrier < result.barrier


def test_a_linear_one_unit_output_needs_task():
    x, y = _regression_data(20)
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(1)])
    with pytest.raises(ValueError, match="its task cannot be told"):
        loss_barrier(model, model, x, y)
    multilabel = keras.Sequential([keras.Input((8,)), keras.layers.Dense(3, "sigmoid")])
    targets = (x[:, :3] > 0).astype("float32")  # several sigmoid units: the mean per-label cross-entropy
    p = np.asarray(multilabel(x), "float64")
    expected = -np.mean(targets * np.log(p) + (1 - targets) * np.log(1 - p))
    assert loss_barrier(multilabel, multilabel, x, targets).path[0] == pytest.approx(expected, abs=1e-6)
