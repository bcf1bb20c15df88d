"""ensemblekit.prune.report: parameters, nonzeros, MACs, zipped size, latency, accuracy delta."""

import keras
import numpy as np
import pytest

import ensemblekit as ek
from ensemblekit.costs import count_params, layer_macs, macs
from ensemblekit.prune import channels, magnitude, report, strip
from ensemblekit.prune.report import zipped_size
from tests.conftest import make_mlp


def test_macs_are_counted_per_layer_type():
    inputs = keras.Input((10, 10, 3))
    conv = keras.layers.Conv2D(4, 3, padding="valid")
    depthwise = keras.layers.DepthwiseConv2D(3, padding="same")
    separable = keras.layers.SeparableConv2D(6, 3, padding="same")
    dense = keras.layers.Dense(5)
    h = separable(depthwise(conv(inputs)))
    model = keras.Model(inputs, dense(keras.layers.Flatten()(h)))
    assert layer_macs(conv) == 8 * 8 * 9 * 3 * 4
    assert layer_macs(depthwise) == 8 * 8 * 9 * 4
    assert layer_macs(separable) == 8 * 8 * 9 * 4 + 8 * 8 * 4 * 6
    assert layer_macs(dense) == 8 * 8 * 6 * 5
    assert macs(model) == sum(layer_macs(layer) for layer in (conv, depthwise, separable, dense))
    assert macs(ek.ensemble([make_mlp(0), make_mlp(1)])) == 2 * (8 * 16 + 16 * 3)


@pytest.mark.parametrize("layer_type, gates", [("SimpleRNN", 1), ("GRU", 3), ("LSTM", 4)])
def test_recurrent_macs_count_every_gate_and_timestep(layer_type, gates):
    model = keras.Sequential([keras.Input((7, 5)), getattr(keras.layers, layer_type)(6), keras.layers.Dense(3)])
    assert macs(model) == 7 * gates * (5 + 6) * 6 + 6 * 3


def test_count_params_and_zipped_size_see_the_zeros():
    model = make_mlp(0, hidden=256)
    pruned = strip(magnitude(model, 0.9))
    params, nonzeros = count_params(model)
    pruned_params, pruned_nonzeros = count_params(pruned)
    assert params == pruned_params == model.count_params()
    assert pruned_nonzeros < 0.2 * nonzeros
    assert zipped_size(pruned) < 0.5 * zipped_size(model)


def test_report_compares_models_and_states_that_zeros_keep_macs():
    model = make_mlp(0, hidden=64)
    x = np.random.default_rng(0).normal(size=(50, 8)).astype("float32")
    y = np.arange(50) % 3
    sparse = report(model, strip(magnitude(model, 0.8)), x, y, batch_sizes=(1, 4), repeats=3)
    assert sparse["ratios"]["macs"] == 1.0 and sparse["ratios"]["params"] == 1.0
    assert sparse["ratios"]["nonzeros"] > 3
    assert sparse["after"]["sparsity"] > 0.7
    assert sparse["after"]["latency_b1_s"] > 0 and "latency_b4_speedup" in sparse["ratios"]
    assert sparse["accuracy_delta"] == pytest.approx(sparse["after"]["accuracy"] - sparse["before"]["accuracy"])
    structural = report(model, channels(model, 0.5), batch_sizes=(1,), repeats=2)
    assert structural["ratios"]["macs"] == pytest.approx((8 * 64 + 64 * 3) / (8 * 32 + 32 * 3))
    assert "accuracy_delta" not in structural
    assert "do not speed up dense kernels" in " ".join(report.__doc__.split())
