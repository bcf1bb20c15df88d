"""ensemblekit.costs: parameters, MACs, latency and the one meaning of a budget."""

import re

import keras
import numpy as np
import pytest

import ensemblekit as ek
from ensemblekit.costs import (
    budget_limit,
    check_budget,
    count_params,
    layer_macs,
    macs,
    model_costs,
)


def _conv_dense(seed=0):
    """Conv1D(4, 3, same) on (10, 3) -> Flatten -> Dense(5): 360 + 200 MACs, 40 + 205 parameters."""
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input((10, 3)), keras.layers.Conv1D(4, 3, padding="same"),
                             keras.layers.Flatten(), keras.layers.Dense(5)])


def _dense(units=5):
    return keras.Sequential([keras.Input((10, 3)), keras.layers.Flatten(), keras.layers.Dense(units)])


def test_macs_and_params_of_a_small_model_counted_by_hand():
    model = _conv_dense()
    assert [layer_macs(layer) for layer in model.layers] == [10 * 3 * 3 * 4, 0, 40 * 5]
    assert macs(model) == 560
    assert count_params(model) == (245, 245 - 9)  # biases start at zero: 4 + 5 of them
    model.layers[0].kernel.assign(np.zeros((3, 3, 4), "float32"))
    assert count_params(model) == (245, 245 - 9 - 36)


def test_macs_of_grouped_convolutions_recurrent_layers_and_nested_members():
    inputs = keras.Input((10, 4))
    grouped = keras.layers.Conv1D(6, 3, groups=2)
    grouped(inputs)
    assert layer_macs(grouped) == 8 * 3 * (4 // 2) * 6
    lstm = keras.Sequential([keras.Input((6, 2)), keras.layers.LSTM(3)])
    assert macs(lstm) == 6 * 4 * (2 + 3) * 3
    ensemble = ek.ensemble([_conv_dense(0), _conv_dense(1)])
    assert macs(ensemble) == 2 * 560


def test_model_costs_params_macs_latency_and_user_numbers():
    models = [_conv_dense(), _dense(7)]
    assert model_costs(models, "params").tolist() == [245.0, 30 * 7 + 7.0]
    assert model_costs(models, "macs").tolist() == [560.0, 210.0]
    own = model_costs(models, [2, 0.5])
    assert own.dtype == np.float64 and own.tolist() == [2.0, 0.5]
    seconds = model_costs(models, "latency")  # smoke test: timing values are machine-dependent
    assert seconds.shape == (2,) and np.all(seconds > 0)


@pytest.mark.parametrize("bad", [[1.0], [1.0, 0.0], [1.0, -2.0], [1.0, float("nan")], [[1.0, 2.0]]])
def test_model_costs_rejects_bad_user_numbers(bad):
    with pytest.raises(ValueError, match=r"cost must be one of \('params', 'macs', 'latency'\) or 2 positive"):
        model_costs([_dense(), _dense()], bad)


def test_model_costs_rejects_unknown_cost_names():
    with pytest.raises(ValueError, match="Unknown cost 'flops'; expected one of 'params', 'macs', 'latency'"):
        model_costs([_dense()], "flops")


def test_check_budget_accepts_positive_numbers_and_none():
    assert check_budget(None) is None
    assert check_budget(2) == 2.0 and isinstance(check_budget(2), float)
    assert check_budget(np.float32(0.5)) == 0.5
    assert check_budget(1e6) == 1e6  # more than all members is allowed: everything fits


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), float("inf"), True, "1.0", [1.0]])
def test_check_budget_names_the_parameter_and_the_bad_value(bad):
    with pytest.raises(ValueError, match=(
            r"^budget must be None or a positive number of mean member costs \(1\.0 = one member's cost, "
            rf"K = all K members\), got {re.escape(repr(bad))}\.$")):
        check_budget(bad)
    with pytest.raises(ValueError, match=r"^max_cost must be None or a positive number"):
        check_budget(bad, param="max_cost")


def test_budget_limit_is_budget_times_the_mean_member_cost():
    assert budget_limit(1.0, [1, 1, 4]) == 2.0
    assert budget_limit(2.0, [1, 1, 4]) == 4.0  # the 4-cost member alone, or both 1-cost members
    assert budget_limit(3, np.array([99.0, 99.0, 1155.0])) == pytest.approx(99 + 99 + 1155)
