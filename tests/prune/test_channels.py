"""ensemblekit.prune.channels: dependency groups, slicing, rebuild."""

import keras
import numpy as np
import pytest

import ensemblekit as ek
from ensemblekit._channels import channel_graph
from ensemblekit._graph import weight_refs
from ensemblekit.costs import macs
from ensemblekit.prune import channels
from ensemblekit.prune.channels import _rebuild
from tests.conftest import make_mlp
from tests.prune.conftest import (
    accuracy,
    fine_tune,
    make_residual_cnn,
    randomize_bn,
)

L = keras.layers
LayerScale = keras.src.applications.convnext.LayerScale
StochasticDepth = keras.src.applications.convnext.StochasticDepth
X40 = np.random.default_rng(0).normal(size=(16, 40, 1)).astype("float32")


def group(report, layer_name):
    return next(g for g in report.groups if layer_name in g.layers)


def removed(report, layer_name):
    g = group(report, layer_name)
    return np.setdiff1d(np.arange(g.size), g.indices)


def _zero_reads(model, report, reads):
    """A copy of ``model`` whose ``reads`` (consumer, axis, producer) ignore the removed channels."""
    cut = keras.models.clone_model(model)
    cut.set_weights(model.get_weights())
    for consumer, axis, producer in reads:
        weights = cut.get_layer(consumer).get_weights()
        index = [slice(None)] * weights[0].ndim
        index[axis] = removed(report, producer)
        weights[0][tuple(index)] = 0.0
        cut.get_layer(consumer).set_weights(weights)
    return cut


def test_ratio_zero_returns_identical_outputs():
    model = randomize_bn(make_residual_cnn(width=8))
    same = channels(model, ratio=0.0)
    np.testing.assert_array_equal(same.predict(X40, verbose=0), model.predict(X40, verbose=0))
    assert same.count_params() == model.count_params()


def test_residual_add_couples_channels_and_output_size_never_changes():
    model = randomize_bn(make_residual_cnn(width=8))
    pruned, report = channels(model, ratio=0.5, return_report=True)
    assert pruned.get_layer("conv_a").filters == pruned.get_layer("conv_b").filters == 4
    assert group(report, "conv_a").layers == ["conv_a", "conv_b"]
    assert pruned.get_layer("conv_c").filters == 8 and pruned.get_layer("hidden").units == 8
    assert pruned.get_layer("bn_b").get_weights()[0].shape == (4,)
    assert pruned.output_shape == model.output_shape == (None, 10)
    assert group(report, "logits").reason == "model output"
    assert not hasattr(pruned, "pruned_groups_")
    assert str(report) == report.summary() == (
        "4 channel groups: 3 pruned (40 -> 20 channels), 1 kept whole (model output: 1)")


def test_pruned_model_equals_original_with_removed_channels_cut_from_consumers():
    """Slicing is exact: zeroing what consumers read from removed channels gives the same outputs."""
    model = randomize_bn(make_residual_cnn(width=8))
    pruned, report = channels(model, ratio=0.5, return_report=True)
    # conv_b and conv_c both read the residual group.
    cut = _zero_reads(model, report, [("conv_b", 1, "conv_a"), ("conv_c", 1, "conv_a"), ("logits", 0, "hidden")])
    hidden = cut.get_layer("hidden").get_weights()  # reads conv_c's channels at every flattened position
    positions = cut.get_layer("flatten").output.shape[-1] // 16
    rows = (np.arange(positions)[:, None] * 16 + removed(report, "conv_c")[None, :]).ravel()
    hidden[0][rows, :] = 0.0
    cut.get_layer("hidden").set_weights(hidden)
    np.testing.assert_allclose(pruned.predict(X40, verbose=0), cut.predict(X40, verbose=0), atol=1e-5)


def test_depthwise_and_separable_convolutions_are_sliced_consistently():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 3))
    h = keras.layers.Conv2D(8, 3, padding="same", name="stem")(inputs)
    h = keras.layers.DepthwiseConv2D(3, padding="same", name="dw")(h)
    h = keras.layers.BatchNormalization(name="bn")(h)
    h = keras.layers.SeparableConv2D(8, 3, padding="same", name="sep")(h)
    h = keras.layers.GlobalAveragePooling2D(name="gap")(h)
    model = randomize_bn(keras.Model(inputs, keras.layers.Dense(3, name="out")(h)))
    pruned, report = channels(model, ratio=0.5, return_report=True)
    assert pruned.get_layer("stem").filters == 4 and pruned.get_layer("sep").filters == 4
    cut = _zero_reads(model, report, [("out", 0, "sep")])
    sep = cut.get_layer("sep").get_weights()  # its pointwise kernel reads what survives of the stem
    sep[1][:, :, removed(report, "stem"), :] = 0.0
    cut.get_layer("sep").set_weights(sep)
    x = np.random.default_rng(1).normal(size=(4, 8, 8, 3)).astype("float32")
    np.testing.assert_allclose(pruned.predict(x, verbose=0), cut.predict(x, verbose=0), atol=1e-5)


def test_embedding_features_are_pruned_with_the_layers_that_read_them():
    keras.utils.set_random_seed(0)
    tokens = keras.Input((5,), dtype="int32")
    h = keras.layers.Embedding(12, 8, name="emb")(tokens)
    h = keras.layers.GlobalAveragePooling1D()(keras.layers.Conv1D(6, 3, padding="same", name="conv")(h))
    model = keras.Model(tokens, keras.layers.Dense(3, name="out")(h))
    pruned, report = channels(model, 0.5, return_report=True)
    assert pruned.get_layer("emb").output_dim == 4 and pruned.get_layer("conv").filters == 3
    assert pruned.get_layer("emb").get_weights()[0].shape == (12, 4)
    cut = _zero_reads(model, report, [("conv", 1, "emb"), ("out", 0, "conv")])
    x = np.random.default_rng(0).integers(0, 12, size=(6, 5))
    np.testing.assert_allclose(pruned.predict(x, verbose=0), cut.predict(x, verbose=0), atol=1e-5)


def test_transposed_convolutions_lose_filters_on_their_output_axis():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((5, 5, 2))
    h = keras.layers.Conv2DTranspose(6, 3, strides=2, name="up")(inputs)
    h = keras.layers.ReLU()(keras.layers.BatchNormalization(name="bn")(h))
    h = keras.layers.Conv2DTranspose(4, 3, padding="same", name="up2")(h)
    h = keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(4, 3, name="down")(h))
    model = randomize_bn(keras.Model(inputs, keras.layers.Dense(3, name="out")(h)))
    pruned, report = channels(model, 0.5, return_report=True)
    assert pruned.get_layer("up").get_weights()[0].shape == (3, 3, 3, 2)
    assert pruned.get_layer("up2").get_weights()[0].shape == (3, 3, 2, 3)
    cut = _zero_reads(model, report, [("up2", 3, "up"), ("down", 2, "up2"), ("out", 0, "down")])
    x = np.random.default_rng(1).normal(size=(4, 5, 5, 2)).astype("float32")
    np.testing.assert_allclose(pruned.predict(x, verbose=0), cut.predict(x, verbose=0), atol=1e-5)


def test_concatenate_joins_branch_groups():
    inputs = keras.Input((6,))
    a = keras.layers.Dense(8, name="a")(inputs)
    b = keras.layers.Dense(4, name="b")(inputs)
    h = keras.layers.Concatenate(name="cat")([a, b])
    model = keras.Model(inputs, keras.layers.Dense(3, name="out")(h))
    pruned = channels(model, ratio=0.5)
    assert (pruned.get_layer("a").units, pruned.get_layer("b").units) == (4, 2)
    assert pruned.get_layer("out").get_weights()[0].shape == (6, 3)
    x = np.random.default_rng(0).normal(size=(5, 6)).astype("float32")
    np.testing.assert_array_equal(channels(model, 0.0).predict(x, verbose=0), model.predict(x, verbose=0))


def test_bn_scale_l1_and_taylor_rank_channels():
    model = make_residual_cnn(width=8)
    gamma = np.array([1, 9, 2, 8, 3, 7, 4, 6], dtype="float32")
    for name in ("bn_a", "bn_b"):
        weights = model.get_layer(name).get_weights()
        weights[0] = gamma
        model.get_layer(name).set_weights(weights)
    with pytest.warns(UserWarning, match=r"no BatchNormalization scale on the groups of \['hidden'\]"):
        _, by_gamma = channels(model, 0.5, importance="bn_scale", return_report=True)
    assert group(by_gamma, "conv_a").indices == [1, 3, 5, 7]
    dense = make_mlp(0)
    kernel, bias = dense.get_layer("hidden").get_weights()
    kernel[:, :8] *= 1e-3
    dense.get_layer("hidden").set_weights([kernel, bias])
    for importance in ("l1", "l2"):
        _, report = channels(dense, 0.5, importance=importance, return_report=True)
        assert group(report, "hidden").indices == list(range(8, 16))
    _, taylor = channels(dense, 0.5, importance="taylor", x=np.random.default_rng(0).normal(size=(64, 8)),
                         return_report=True)
    assert group(taylor, "hidden").kept == 8
    assert len(set(group(taylor, "hidden").indices) & set(range(8, 16))) >= 6


def test_round_to_and_global_ranking():
    model = make_mlp(0, hidden=12)
    assert channels(model, 0.5, round_to=8).get_layer("hidden").units == 8
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(8, name="h1"),
                              keras.layers.Dense(8, name="h2"), keras.layers.Dense(3, name="out")])
    kernel, bias = model.get_layer("h1").get_weights()
    kernel[:, :4] *= 1e-3
    model.get_layer("h1").set_weights([kernel, bias])
    model.get_layer("h2").set_weights([np.ones((8, 8), "float32"), np.zeros(8, "float32")])
    ranked = channels(model, 0.25, global_ranking=True)
    assert (ranked.get_layer("h1").units, ranked.get_layer("h2").units) == (4, 8)
    per_group = channels(model, 0.25)
    assert (per_group.get_layer("h1").units, per_group.get_layer("h2").units) == (6, 6)


def test_nested_members_of_an_ensemble_are_each_pruned():
    ensemble = ek.ensemble([make_mlp(0), make_mlp(1, softmax=True)])
    x = np.random.default_rng(0).normal(size=(10, 8)).astype("float32")
    np.testing.assert_allclose(channels(ensemble, 0.0).predict(x, verbose=0), ensemble.predict(x, verbose=0),
                               atol=1e-7)
    pruned, report = channels(ensemble, 0.5, return_report=True)
    hidden = [g for g in report.groups if g.layers == ["hidden"]]
    assert [g.kept for g in hidden] == [8, 8]
    assert pruned.count_params() < ensemble.count_params()
    assert pruned.predict(x, verbose=0).shape == (10, 3)


def test_unsupported_layer_leaves_its_group_whole_with_a_warning_or_raises():
    inputs = keras.Input((8,))
    h = keras.layers.Dense(8, name="h")(inputs)
    h = keras.layers.UnitNormalization(name="unit_norm")(h)
    h = keras.layers.Dense(8, name="h2")(h)
    model = keras.Model(inputs, keras.layers.Dense(3, name="out")(h))
    with pytest.warns(UserWarning, match="left unpruned.*'unit_norm' \\(UnitNormalization\\)"):
        pruned = channels(model, 0.5)
    assert pruned.get_layer("h").units == 8 and pruned.get_layer("h2").units == 4
    with pytest.raises(ValueError, match="'unit_norm' \\(UnitNormalization\\) cannot be pruned or permuted through"):
        channels(model, 0.5, on_unsupported="raise")


def test_bad_input_gets_clear_errors():
    class Subclassed(keras.Model):
        def __init__(self):
            super().__init__(name="sub")
            self.dense = keras.layers.Dense(2)

        def call(self, x):
            return self.dense(x)

    sub = Subclassed()
    sub(np.zeros((1, 4)))
    with pytest.raises(ValueError, match="'sub' .*has no functional graph"):
        channels(sub, 0.5)
    with pytest.raises(ValueError, match=r"ratio must be in \[0, 1\)"):
        channels(make_mlp(0), 1.0)
    with pytest.raises(ValueError, match="needs x"):
        channels(make_mlp(0), 0.5, importance="taylor")
    with pytest.raises(ValueError, match="Unknown importance"):
        channels(make_mlp(0), 0.5, importance="random")


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:channels.*no BatchNormalization scale")
def test_mnist1d_residual_cnn_half_channels_fine_tuned_within_two_points(trained_cnn):
    model, (x, y), (xt, yt) = trained_cnn
    pruned = channels(model, ratio=0.5, importance="bn_scale")
    assert macs(pruned) <= 0.55 * macs(model)
    assert pruned.count_params() <= 0.55 * model.count_params()
    fine_tune(pruned, x, y, epochs=6)
    assert accuracy(pruned, xt, yt) >= accuracy(model, xt, yt) - 0.02


def test_packed_models_are_pruned_member_by_member_and_stay_packed():
    from ensemblekit.pack import PackedOutput, pack, unpack

    packed = pack([randomize_bn(make_residual_cnn(seed=s, width=8), seed=s) for s in (0, 1)])
    np.testing.assert_allclose(channels(packed, 0.0).predict(X40, verbose=0), packed.predict(X40, verbose=0),
                               atol=1e-6)
    pruned, report = channels(packed, 0.5, return_report=True)
    assert [g.kept for g in report.groups if g.layers == ["conv_a", "conv_b"]] == [4, 4]  # one per member
    assert any(isinstance(layer, PackedOutput) for layer in pruned.layers)
    members = unpack(pruned)
    assert [m.get_layer("conv_a").filters for m in members] == [4, 4]
    expected = ek.ensemble([channels(m, 0.5) for m in unpack(packed)]).predict(X40, verbose=0)
    np.testing.assert_allclose(pruned.predict(X40, verbose=0), expected, atol=1e-5)
    with pytest.raises(ValueError, match="packed .*global_ranking"):
        channels(packed, 0.5, global_ranking=True)



def randomize_vectors(model, seed=0):
    """Non-trivial values for every 1-D float weight (biases, norms, scales, means, variances)."""
    rng = np.random.default_rng(seed)
    for ref in weight_refs(model):
        if len(ref.shape) == 1 and ref.is_float:
            positive = any(key in ref.name for key in ("variance", "gamma")) or isinstance(ref.layer, LayerScale)
            ref.assign(rng.uniform(0.5, 1.5, ref.shape) if positive else rng.uniform(-0.5, 0.5, ref.shape))
            if hasattr(ref.layer, "finalize_state"):  # Normalization caches its mean and variance
                ref.layer.finalize_state()
    return model


def make_squeeze_excite(seed=0):
    """MobileNetV3/EfficientNet-style block: conv, SE gate (size-1 Reshape, hard sigmoid by keras.ops)."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((6, 6, 3))
    h = L.ReLU()(L.BatchNormalization(name="bn")(L.Conv2D(8, 3, padding="same", name="expand")(inputs)))
    s = L.Reshape((1, 1, 8), name="se_reshape")(L.GlobalAveragePooling2D()(h))
    s = L.Conv2D(4, 1, activation="relu", name="se_reduce")(s)
    s = L.ReLU(6.0)(L.Conv2D(8, 1, name="se_expand")(s) + 3.0) * (1.0 / 6.0)
    h = L.Multiply(name="se_excite")([h, s])
    return randomize_vectors(keras.Model(inputs, L.Dense(3, name="out")(L.GlobalAveragePooling2D()(h))))


def make_modern_blocks(seed=0):
    """Every new kind at once: Rescaling/Normalization, a ConvNeXt block (grouped conv, LN, LayerScale,
    StochasticDepth, residual by keras.ops), an SE gate, a nested Sequential and a hard-swish head."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((8, 8, 3))
    h = L.Normalization(name="norm_in")(L.Rescaling(1 / 255.0)(inputs))
    h = L.Normalization(name="norm_mid")(L.Conv2D(8, 3, padding="same", name="stem")(h))
    r = L.LayerNormalization(name="ln")(L.Conv2D(8, 3, padding="same", groups=8, name="dw")(h))
    r = L.Dense(8, name="pw2")(L.Dense(16, activation="gelu", name="pw1")(r))
    h = h + StochasticDepth(0.1, name="drop_path")(LayerScale(0.5, 8, name="layer_scale")(r))
    s = L.Reshape((1, 1, 8), name="se_reshape")(L.GlobalAveragePooling2D()(h))
    s = L.Conv2D(8, 1, activation="sigmoid", name="se_expand")(L.Conv2D(4, 1, name="se_reduce")(s))
    h = L.Multiply(name="se_excite")([h, s])
    down = keras.Sequential([L.BatchNormalization(name="down_bn"), L.Conv2D(12, 2, strides=2, name="down_conv")],
                            name="down")
    h = L.GlobalAveragePooling2D(keepdims=True)(down(h))
    h = L.Flatten()(L.Conv2D(10, 1, activation="hard_swish", name="head_conv")(h))
    return randomize_vectors(keras.Model(inputs, L.Dense(3, name="out")(h), name="modern"))


def test_squeeze_excitation_gate_is_pruned_with_the_channels_it_scales():
    model = make_squeeze_excite()
    pruned, report = channels(model, 0.5, return_report=True)
    assert group(report, "expand").layers == ["expand", "se_expand"]
    assert pruned.get_layer("se_reshape").target_shape == (1, 1, 4)
    assert pruned.get_layer("se_expand").filters == 4 and pruned.get_layer("se_reduce").filters == 2
    cut = _zero_reads(model, report, [("se_reduce", 2, "expand"), ("se_expand", 2, "se_reduce"), ("out", 0, "expand")])
    x = np.random.default_rng(0).normal(size=(4, 6, 6, 3)).astype("float32")
    np.testing.assert_allclose(pruned.predict(x, verbose=0), cut.predict(x, verbose=0), atol=1e-5)


def test_every_coupled_axis_moves_together_through_the_new_kinds():
    """Rebuilding with each prunable group's channels permuted (not cut) must keep the outputs: a weight
    axis the graph missed, or a layer sliced on the wrong side, would scramble them."""
    model = make_modern_blocks()
    graph = channel_graph(model)
    rng = np.random.default_rng(0)
    shuffled = {root: rng.permutation(graph.size(root)) for root in graph.roots() if graph.fixed(root) is None}
    assert sorted(graph.size(root) for root in shuffled) == [4, 8, 10, 12, 16]  # se_reduce, stem, head, down, pw1
    x = np.random.default_rng(1).uniform(0, 255, size=(3, 8, 8, 3)).astype("float32")
    expected = keras.ops.convert_to_numpy(model(x, training=False))
    permuted = keras.ops.convert_to_numpy(_rebuild(graph, shuffled)(x, training=False))
    np.testing.assert_allclose(permuted, expected, rtol=1e-5, atol=1e-6)


def test_new_kinds_are_resized_and_the_nested_sequential_rebuilt(tmp_path):
    model = make_modern_blocks()
    pruned = channels(model, 0.5)
    assert (pruned.get_layer("dw").filters, pruned.get_layer("dw").groups) == (4, 4)
    assert pruned.get_layer("layer_scale").projection_dim == 4
    assert [w.shape for w in pruned.get_layer("norm_mid").get_weights()] == [(4,), (4,), ()]
    assert [w.shape for w in pruned.get_layer("norm_in").get_weights()] == [(3,), (3,), ()]  # model input
    down = pruned.get_layer("down")
    assert isinstance(down, keras.Sequential) and down.get_layer("down_conv").get_weights()[0].shape == (2, 2, 4, 6)
    x = np.random.default_rng(1).uniform(0, 255, size=(3, 8, 8, 3)).astype("float32")
    pruned.save(tmp_path / "modern.keras")
    loaded = keras.saving.load_model(tmp_path / "modern.keras", safe_mode=True)
    np.testing.assert_allclose(loaded.predict(x, verbose=0), pruned.predict(x, verbose=0), atol=1e-6)
    np.testing.assert_array_equal(channels(model, 0.0).predict(x, verbose=0), model.predict(x, verbose=0))


def make_transfer(seed=0):
    """The keras.io transfer-learning recipe in small: a base (with a nested Sequential) inside a new model."""
    keras.utils.set_random_seed(seed)
    x = keras.Input((6, 6, 3))
    block = keras.Sequential([L.BatchNormalization(name="block_bn"), L.Conv2D(8, 1, name="block_conv")],
                             name="block")
    base = keras.Model(x, L.ReLU()(block(L.Conv2D(6, 3, name="stem")(x))), name="base")
    inputs = keras.Input((6, 6, 3))
    features = L.GlobalAveragePooling2D()(base(inputs, training=False))
    return randomize_vectors(keras.Model(inputs, L.Dense(3, name="head")(features), name="transfer"))


def test_a_nested_base_is_pruned_through_and_given_back_nested():
    model = make_transfer()
    pruned, report = channels(model, 0.5, return_report=True)
    base = pruned.get_layer("base")
    assert isinstance(base, keras.Model) and isinstance(base.get_layer("block"), keras.Sequential)
    assert base.get_layer("stem").filters == 3 and base.get_layer("block").get_layer("block_conv").filters == 4
    assert pruned.get_layer("head").get_weights()[0].shape == (4, 3)
    assert base.get_layer("block").get_layer("block_bn").get_weights()[0].shape == (3,)
    cut = keras.models.clone_model(model)
    cut.set_weights(model.get_weights())
    for consumer, producer in (("block_conv", "stem"), ("head", "block_conv")):
        layer = cut.get_layer("base").get_layer("block").get_layer(consumer) if consumer == "block_conv" \
            else cut.get_layer(consumer)
        weights = layer.get_weights()
        weights[0][..., removed(report, producer), :] = 0.0
        layer.set_weights(weights)
    x = np.random.default_rng(0).normal(size=(4, 6, 6, 3)).astype("float32")
    np.testing.assert_allclose(pruned.predict(x, verbose=0), cut.predict(x, verbose=0), atol=1e-5)


def test_unsupported_and_shared_nested_layers_get_a_warning_or_one_error():
    inputs = keras.Input((6, 6, 3))
    h = L.Conv2D(4, 3, name="conv")(inputs)
    h = L.DepthwiseConv2D(3, depth_multiplier=2, name="dw_x2")(h)
    model = keras.Model(inputs, L.Dense(2)(L.GlobalAveragePooling2D()(L.Conv2D(4, 1, name="pw")(h))))
    with pytest.warns(UserWarning, match=r"left unpruned conv \(4 channels\): layer 'dw_x2' \(DepthwiseConv2D\) "
                                         r"cannot be pruned or permuted through: depth_multiplier != 1"):
        pruned = channels(model, 0.5)
    assert pruned.get_layer("conv").filters == 4 and pruned.get_layer("pw").filters == 2
    inner = keras.Sequential([keras.Input((4,)), L.Dense(4)], name="inner")
    x = keras.Input((4,))
    with pytest.raises(ValueError, match=r"nested model 'inner' \(Sequential\) is called more than once"):
        channels(keras.Model(x, inner(inner(x))), 0.5)
