"""ek.pack with depth_multiplier > 1: DepthwiseConv and SeparableConv whose output c*M+m reads input c.

The channel graph keeps such a layer's channels whole (it cannot prune or
permute through it), but ``GroupedDepthwiseConv`` computes K members' layers
exactly: member k's ``c*M`` outputs stay contiguous in the ``(..., K*c*M)`` view.
"""

import keras
import numpy as np
import pytest

from ensemblekit.compose import ensemble
from ensemblekit.pack import GroupedDepthwiseConv, GroupedSeparableConv, pack, unpack

L = keras.layers


def _member(seed, rank):
    keras.utils.set_random_seed(seed)
    shape, conv, depthwise, separable, pool = (
        ((12, 12, 3), L.Conv2D, L.DepthwiseConv2D, L.SeparableConv2D, L.GlobalAveragePooling2D) if rank == 2
        else ((12, 3), L.Conv1D, L.DepthwiseConv1D, L.SeparableConv1D, L.GlobalAveragePooling1D))
    inputs = keras.Input(shape)
    h = depthwise(3, depth_multiplier=2, activation="relu", name="dw_on_input")(inputs)  # the shared input
    h = conv(4, 1, name="conv")(h)
    h = depthwise(3, depth_multiplier=3, padding="same", name="dw_x3")(h)
    h = L.BatchNormalization(name="bn")(h)
    h = separable(5, 3, depth_multiplier=2, activation="relu", name="sep_x2")(h)
    rng = np.random.default_rng(seed)
    model = keras.Model(inputs, L.Dense(3, activation="softmax")(pool()(h)), name=f"m{rank}d_{seed}")
    bn = model.get_layer("bn")
    bn.moving_mean.assign(rng.normal(0, 0.2, 12).astype("float32"))
    bn.moving_variance.assign(rng.uniform(0.5, 1.5, 12).astype("float32"))
    return model


@pytest.mark.parametrize("rank", [1, 2])
def test_pack_with_depth_multiplier_equals_ensemble_and_unpacks_exactly(rank, tmp_path):
    members = [_member(seed, rank) for seed in (0, 1, 2)]
    x = np.random.default_rng(0).normal(size=(4, *members[0].input_shape[1:])).astype("float32")
    packed = pack(members)
    probs = [m.predict(x, verbose=0) for m in members]
    assert np.abs(probs[0] - probs[1]).max() > 1e-3
    np.testing.assert_allclose(packed.predict(x, verbose=0), ensemble(members).predict(x, verbose=0),
                               atol=1e-5, rtol=0)
    multipliers = sorted(layer.depth_multiplier for layer in packed.layers
                         if isinstance(layer, GroupedDepthwiseConv))
    assert multipliers == [2, 2, 3]  # the separable one is a GroupedSeparableConv (a GroupedDepthwiseConv)
    assert any(isinstance(layer, GroupedSeparableConv) for layer in packed.layers)
    for original, back in zip(members, unpack(packed), strict=True):
        for a, b in zip(original.get_weights(), back.get_weights(), strict=True):
            np.testing.assert_array_equal(a, b)
    path = tmp_path / "packed.keras"
    packed.save(path)
    np.testing.assert_array_equal(keras.saving.load_model(path).predict(x, verbose=0),
                                  packed.predict(x, verbose=0))
