"""The grouped layers of ek.pack against the K per-member layers they replace.

Each grouped layer must compute member k's layer on member k's slice (or on the
shared input), give each member's weights back exactly (``member_weights``),
count the members' MACs and rebuild from its config.
"""

import keras
import numpy as np
import pytest

from ensemblekit.costs import layer_macs
from ensemblekit.pack import (
    GroupedConv,
    GroupedDepthwiseConv,
    GroupedScale,
    GroupedSeparableConv,
    MemberConstants,
)

L = keras.layers
K = 3


def called(layer, shape):
    """``layer`` called on a ``keras.Input(shape)`` (built, with an output shape for MAC counting)."""
    inputs = keras.Input(shape)
    keras.Model(inputs, layer(inputs))
    return layer


def members(make, shape, seed=0):
    """K member layers from ``make()``, called on inputs of ``shape``, with random weights."""
    rng = np.random.default_rng(seed)
    layers = [called(make(), shape) for _ in range(K)]
    for layer in layers:
        layer.set_weights([rng.normal(size=w.shape).astype("float32") for w in layer.get_weights()])
    return layers


def per_member(layers, x, shared):
    """What the K members compute, stacked on the member axis."""
    if shared:
        outputs = [layer(x) for layer in layers]
    else:
        outputs = [layer(x[..., k, :]) for k, layer in enumerate(layers)]
    return np.stack([keras.ops.convert_to_numpy(o) for o in outputs], axis=-2)


def packed(grouped, layers, shape):
    called(grouped, shape)
    grouped.set_member_weights([layer.get_weights() for layer in layers])
    return grouped


def check(grouped, layers, x, shared, atol=1e-5):
    """Equal outputs, exact member weights, members' MACs, config round trip."""
    expected = per_member(layers, x, shared)
    output = keras.ops.convert_to_numpy(grouped(x))
    np.testing.assert_allclose(output, expected, atol=atol, rtol=1e-5)
    for index, layer in enumerate(layers):
        back = grouped.member_weights(index)
        assert len(back) == len(layer.get_weights())
        for a, b in zip(back, layer.get_weights(), strict=True):
            np.testing.assert_array_equal(a, b)
    assert grouped.macs_per_sample() == sum(layer_macs(layer) for layer in layers)
    clone = type(grouped).from_config(grouped.get_config())
    clone(x)
    clone.set_weights(grouped.get_weights())
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(clone(x)), output)


def data(shape, seed=1):
    return np.random.default_rng(seed).normal(size=(2, *shape)).astype("float32")


@pytest.mark.parametrize("rank", [1, 2])
@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("options", [
    dict(kernel_size=3, padding="same"),
    dict(kernel_size=3, strides=2, depth_multiplier=2, activation="relu"),
    dict(kernel_size=2, dilation_rate=2, use_bias=False),
])
def test_grouped_depthwise_equals_its_members(rank, shared, options):
    spatial, channels = (9,) * rank, 4
    depthwise = L.DepthwiseConv1D if rank == 1 else L.DepthwiseConv2D
    layers = members(lambda: depthwise(**options), (*spatial, channels))
    shape = (*spatial, channels) if shared else (*spatial, K, channels)
    grouped = packed(GroupedDepthwiseConv(rank, num_members=K, shared_input=shared, **options), layers, shape)
    assert tuple(grouped.kernel.shape)[-2:] == (K * channels, options.get("depth_multiplier", 1))
    check(grouped, layers, data(shape), shared)


@pytest.mark.parametrize("rank", [1, 2])
@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("lowering", ["grouped", "loop"])
@pytest.mark.parametrize("options", [
    dict(kernel_size=3, padding="same"),
    dict(kernel_size=3, strides=2, depth_multiplier=2, activation="relu", use_bias=False),
])
def test_grouped_separable_equals_its_members(rank, shared, lowering, options):
    spatial, channels, filters = (9,) * rank, 4, 5
    separable = L.SeparableConv1D if rank == 1 else L.SeparableConv2D
    layers = members(lambda: separable(filters, **options), (*spatial, channels))
    shape = (*spatial, channels) if shared else (*spatial, K, channels)
    grouped = GroupedSeparableConv(rank, filters, num_members=K, shared_input=shared, lowering=lowering,
                                   **options)
    check(packed(grouped, layers, shape), layers, data(shape), shared, atol=1e-4)


@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("lowering", ["grouped", "loop"])
@pytest.mark.parametrize("groups,filters", [(2, 6), (4, 4)])  # (4, 4): ConvNeXt's depthwise Conv2D
def test_grouped_conv_with_groups_equals_its_members(shared, lowering, groups, filters):
    layers = members(lambda: L.Conv2D(filters, 3, padding="same", groups=groups), (6, 6, 4))
    shape = (6, 6, 4) if shared else (6, 6, K, 4)
    grouped = GroupedConv(2, filters, 3, num_members=K, padding="same", groups=groups,
                          shared_input=shared, lowering=lowering)
    check(packed(grouped, layers, shape), layers, data(shape), shared, atol=1e-4)


@pytest.mark.parametrize("lowering", ["grouped", "loop", "auto"])
def test_pointwise_grouped_conv_runs_as_grouped_dense(lowering):
    layers = members(lambda: L.Conv2D(5, 1, activation="relu"), (6, 6, 4))
    grouped = GroupedConv(2, 5, 1, num_members=K, activation="relu", lowering=lowering)
    check(packed(grouped, layers, (6, 6, K, 4)), layers, data((6, 6, K, 4)), False)
    assert grouped.pointwise and not GroupedConv(2, 5, 1, num_members=K, strides=2).pointwise


@pytest.mark.parametrize("shared", [False, True])
def test_grouped_scale_equals_convnext_layer_scale(shared):
    from keras.src.applications.convnext import LayerScale

    layers = members(lambda: LayerScale(1e-6, 5), (4, 5))
    shape = (4, 5) if shared else (4, K, 5)
    check(packed(GroupedScale(num_members=K, shared_input=shared), layers, shape), layers, data(shape), shared)


def normalizations(seed=0):
    """K Normalization layers adapted to different data (different mean and variance weights)."""
    rng = np.random.default_rng(seed)
    layers = []
    for k in range(K):
        layer = L.Normalization(axis=-1)
        layer.adapt(rng.normal(10.0 * k, 1.0 + k, size=(64, 3)).astype("float32"))
        layers.append(called(layer, (3,)))
    return layers


@pytest.mark.parametrize("shared", [False, True])
def test_member_constants_equal_their_members(shared):
    copies = [L.Normalization.from_config(layer.get_config()) for layer in normalizations()]
    layers = normalizations()
    shape = (3,) if shared else (K, 3)
    grouped = packed(MemberConstants(copies, shared_input=shared), layers, shape)
    x = data(shape)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(grouped(x)), per_member(layers, x, shared),
                               atol=1e-5, rtol=1e-6)
    for index, layer in enumerate(layers):
        for a, b in zip(grouped.member_weights(index), layer.get_weights(), strict=True):
            np.testing.assert_array_equal(a, b)
    rescalings = [L.Rescaling(scale, offset=-1.0) for scale in (1.0, 0.5, 0.25)]
    expected = np.stack([x * scale - 1.0 for scale in (1.0, 0.5, 0.25)], axis=-2) if shared else (
        x * np.array([1.0, 0.5, 0.25])[:, None] - 1.0)
    output = MemberConstants(rescalings, shared_input=shared)(x)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(output), expected, atol=1e-6)


def test_member_constants_save_and_load_in_safe_mode(tmp_path):
    inputs = keras.Input((3,))
    copies = [L.Normalization.from_config(layer.get_config()) for layer in normalizations()]
    layer = MemberConstants(copies, shared_input=True)
    model = keras.Model(inputs, layer(inputs))
    layer.set_member_weights([n.get_weights() for n in normalizations()])
    x = data((3,))
    model.save(tmp_path / "constants.keras")
    loaded = keras.saving.load_model(tmp_path / "constants.keras")
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(loaded(x)),
                                  keras.ops.convert_to_numpy(model(x)))


def test_grouped_layers_reject_inputs_without_the_member_axis():
    with pytest.raises(ValueError, match=r"expects input \(batch, ..., 3, channels\)"):
        GroupedDepthwiseConv(2, 3, num_members=K)(np.zeros((1, 5, 5, 2, 4), "float32"))
    with pytest.raises(ValueError, match="groups=3 must divide the input channels"):
        GroupedConv(2, 6, 3, num_members=K, groups=3)(np.zeros((1, 5, 5, K, 4), "float32"))
