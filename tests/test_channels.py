"""ensemblekit._channels: the kind table, layouts, coupled groups and their fixed reasons."""

import keras
import numpy as np
import pytest

from ensemblekit import _channels
from ensemblekit._channels import _Groups, channel_graph, layer_kind, unsupported_reason
from ensemblekit._graph import weight_refs
from ensemblekit.merge.permutation import permutation_spec

L = keras.layers
LayerScale = keras.src.applications.convnext.LayerScale
StochasticDepth = keras.src.applications.convnext.StochasticDepth


def record(graph, name):
    return graph.layers[id(graph.model.get_layer(name))]


def roots(graph, layout):
    return [graph.find(g) for g in layout]


@pytest.mark.parametrize("layer, shapes, kind", [
    (L.Dense(4), [(None, 3)], "producer"),
    (L.Conv3D(4, 3), [(None, 5, 5, 5, 2)], "producer"),
    (L.Conv2DTranspose(4, 3), [(None, 5, 5, 2)], "producer"),
    (L.DepthwiseConv2D(3), [(None, 5, 5, 2)], "depthwise"),
    (L.SeparableConv1D(4, 3), [(None, 5, 2)], "separable"),
    (L.BatchNormalization(), [(None, 5, 2)], "norm"),
    (L.LayerNormalization(axis=2), [(None, 5, 2)], "norm"),
    (L.Embedding(10, 4), [(None, 5)], "embedding"),
    (L.Softmax(), [(None, 4)], "elementwise"),
    (L.GaussianDropout(0.1), [(None, 4)], "elementwise"),
    (L.SpatialDropout1D(0.1), [(None, 5, 4)], "spatial"),
    (L.GlobalMaxPooling2D(), [(None, 5, 5, 4)], "spatial"),
    (L.Cropping1D(1), [(None, 5, 4)], "spatial"),
    (L.Subtract(), [(None, 4), (None, 4)], "merge"),
    (L.Concatenate(), [(None, 4), (None, 2)], "concat"),
    (L.Flatten(), [(None, 5, 4)], "flatten"),
    (keras.Sequential([L.Dense(2)]), [(None, 4)], "nested"),
    (L.Reshape((1, 1, 4)), [(None, 4)], "reshape"),
    (L.Reshape((4,)), [(None, 1, 1, 4)], "reshape"),
    (L.Reshape((-1, 1, 4)), [(None, 1, 4)], "reshape"),
    (LayerScale(1e-6, 4), [(None, 3, 3, 4)], "scale"),
    (L.Normalization(), [(None, 5, 3)], "constant"),
    (L.Normalization(axis=None), [(None, 5, 3)], "constant"),
    (L.Rescaling(1 / 255.0, offset=-1.0), [(None, 5, 3)], "constant"),
    (StochasticDepth(0.1), [(None, 3, 3, 4)], "elementwise"),
    (L.Activation("hard_swish"), [(None, 4)], "elementwise"),
    (L.Activation("gelu"), [(None, 4)], "elementwise"),
    (L.Activation("swish"), [(None, 4)], "elementwise"),
    (L.Conv2D(4, 7, groups=4), [(None, 9, 9, 4)], "depthwise"),
    (L.GlobalAveragePooling2D(keepdims=True), [(None, 5, 5, 4)], "spatial"),
])
def test_kind_table(layer, shapes, kind):
    assert layer_kind(layer, shapes) == kind
    assert unsupported_reason(layer, shapes) is None


@pytest.mark.parametrize("layer, shapes, why", [
    (L.Conv2D(4, 3, data_format="channels_first"), [(None, 2, 5, 5)], "channels_last"),
    (L.Conv1D(4, 3, groups=2), [(None, 5, 2)], "grouped convolutions"),
    (L.DepthwiseConv1D(3, depth_multiplier=2), [(None, 5, 2)], "depth_multiplier"),
    (L.BatchNormalization(axis=1), [(None, 5, 2)], "over the last axis"),
    (L.LayerNormalization(axis=[1, 2]), [(None, 5, 2)], "over the last axis"),
    (L.Softmax(axis=1), [(None, 5, 2)], "softmax over an axis"),
    (L.Flatten(), [(None, None, 4)], "spatial dimensions are unknown"),
    (L.Reshape((2, 2)), [(None, 4)], "keeps the last (channel) axis"),
    (L.Reshape((4, 4)), [(None, 2, 2, 4)], "adds or removes size-1 axes"),
    (L.Normalization(axis=1), [(None, 5, 3)], "over the last axis"),
    (L.Conv2D(8, 3, groups=4), [(None, 5, 5, 4)], "groups == input channels == filters"),
    (L.DepthwiseConv2D(3, depth_multiplier=2), [(None, 5, 5, 2)], "c*M+m reads input channel c"),
    (L.UnitNormalization(), [(None, 4)], "not a layer kind the channel graph knows"),
])
def test_kind_table_says_why_a_layer_cannot_pass_channels(layer, shapes, why):
    assert layer_kind(layer, shapes) is None
    assert why in unsupported_reason(layer, shapes)


def test_lora_layers_cannot_pass_channels():
    dense = L.Dense(4)
    dense.build((None, 3))
    assert layer_kind(dense, [(None, 3)]) == "producer"
    dense.enable_lora(2)
    assert layer_kind(dense, [(None, 3)]) is None
    assert "LoRA" in unsupported_reason(dense, [(None, 3)])


def test_every_kind_is_documented_and_the_class_tuples_do_not_overlap():
    tuples = [_channels.PRODUCERS + _channels.TRANSPOSED, _channels.DEPTHWISE, _channels.SEPARABLE,
              _channels.NORMS, _channels.EMBEDDINGS, _channels.ELEMENTWISE, _channels.SPATIAL,
              _channels.MERGES, _channels.CONCATS, _channels.FLATTENS, _channels.ELEMENTWISE_OPS,
              _channels.BINARY_OPS, _channels.RESHAPES, _channels.SCALES, _channels.CONSTANTS]
    classes = [cls for types in tuples for cls in types]
    assert len(classes) == len(set(classes))
    assert set(_channels.OPENERS) < set(_channels.KINDS) and set(_channels.PASSING) < set(_channels.KINDS)
    assert {"reshape", "scale", "constant"} <= set(_channels.KINDS)  # names pack relies on
    assert all(types for types in tuples)
    assert all("\n" not in text and text for text in _channels.KINDS.values())


def test_union_find_compresses_paths_and_keeps_the_first_reason():
    groups = _Groups()
    a, b, c, d = (groups.new(4) for _ in range(4))
    groups.fix([c], _channels.Fixed("model output"))
    groups.fix([d], _channels.Fixed("model input"))
    groups.union(c, d)
    groups.union(b, c)
    groups.union(a, b)
    assert groups.parent == [a, a, b, c]  # a chain d -> c -> b -> a
    assert groups.find(d) == a
    assert groups.parent == [a, a, a, a]  # compressed by that find
    assert groups.fixed == {a: _channels.Fixed("model output")}


def test_add_unites_concatenate_joins_flatten_tiles():
    inputs = keras.Input((6, 3))
    a = L.Conv1D(4, 3, padding="same", name="a")(inputs)
    b = L.Conv1D(4, 3, padding="same", name="b")(inputs)
    h = L.Add(name="add")([a, b])
    c = L.Conv1D(2, 3, padding="same", name="c")(h)
    h = L.Concatenate(name="cat")([h, c])
    h = L.Flatten(name="flat")(L.MaxPooling1D(3, name="pool")(h))
    graph = channel_graph(keras.Model(inputs, L.Dense(5, name="out")(h)))
    ab, c_root = graph.find(record(graph, "a").output[0]), graph.find(record(graph, "c").output[0])
    assert graph.find(record(graph, "b").output[0]) == ab and ab != c_root
    assert roots(graph, record(graph, "cat").output) == [ab, c_root]
    assert roots(graph, record(graph, "out").input) == [ab, c_root, ab, c_root]
    np.testing.assert_array_equal(graph.unit_positions(record(graph, "out").input, c_root),
                                  [[4, 5], [10, 11]])
    np.testing.assert_array_equal(graph.positions(record(graph, "out").input, {ab: [1, 3], c_root: [0]}),
                                  [1, 3, 4, 7, 9, 10])
    assert {graph.size(r): [layer.name for layer in ls] for r, ls in graph.openers().items()} == {
        4: ["a", "b"], 2: ["c"], 5: ["out"]}


def test_depthwise_passes_channels_and_its_kernel_carries_them():
    inputs = keras.Input((5, 5, 3))
    h = L.Conv2D(8, 3, name="stem")(inputs)
    h = L.DepthwiseConv2D(3, name="dw")(h)
    h = L.SeparableConv2D(6, 1, name="sep")(h)
    h = L.Conv2DTranspose(4, 3, name="up")(h)
    graph = channel_graph(keras.Model(inputs, L.GlobalAveragePooling2D()(h)))
    stem = graph.find(record(graph, "stem").output[0])
    assert roots(graph, record(graph, "dw").output) == [stem]
    dw, sep, up = record(graph, "dw"), record(graph, "sep"), record(graph, "up")
    assert [(w.variable.name, w.axis, w.side) for w in dw.weights] == [("kernel", 2, "in"), ("bias", 0, "in")]
    assert [(w.variable.name, w.axis, w.side) for w in sep.weights] == [
        ("depthwise_kernel", 2, "in"), ("pointwise_kernel", 2, "in"), ("pointwise_kernel", 3, "out"),
        ("bias", 0, "out")]
    assert [(w.axis, w.side) for w in up.weights] == [(3, "in"), (2, "out"), (0, "out")]
    assert graph.out_axis(up.layer).axis == 2
    assert graph.fixed(stem) is None and graph.fixed(sep.output[0]) is None


def test_embedding_opens_a_group_on_its_feature_axis():
    tokens = keras.Input((7,), dtype="int32")
    h = L.Embedding(20, 8, name="emb")(tokens)
    h = L.Dense(4, name="proj")(L.LayerNormalization(name="ln")(h))
    graph = channel_graph(keras.Model(tokens, L.Dense(2)(L.GlobalAveragePooling1D()(h))))
    emb = record(graph, "emb")
    assert emb.kind == "embedding" and graph.size(emb.output[0]) == 8
    assert [(w.variable.name, w.axis, w.side) for w in emb.weights] == [("embeddings", 1, "out")]
    assert roots(graph, record(graph, "proj").input) == roots(graph, emb.output)
    assert graph.fixed(emb.output[0]) is None
    assert graph.fixed(emb.input[0]).text == "model input"


def test_fixed_groups_say_why():
    inputs = keras.Input((4,))
    h = L.Dense(8, name="h")(inputs)
    skip = L.Add(name="skip")([h, L.Dense(8, name="r")(h)])
    u = L.Dense(6, name="u")(skip)
    u = L.UnitNormalization(name="unit_norm")(u)
    member = keras.Sequential([keras.Input((6,)), L.Dense(3, name="inner")], name="member")
    graph = channel_graph(keras.Model(inputs, [L.UnitNormalization(name="combine")(member(u)),
                                               L.Dense(2, name="out2")(skip)]))
    assert graph.fixed(record(graph, "h").input[0]).text == "model input"
    assert graph.fixed(record(graph, "h").output[0]) is None  # h, r share it; it reaches no output
    fixed = graph.fixed(record(graph, "u").output[0])
    assert fixed.layer is graph.model.get_layer("unit_norm")
    assert fixed.text.startswith("layer 'unit_norm' (UnitNormalization) cannot be pruned or permuted")
    assert graph.fixed(record(graph, "member").input[0]) == fixed  # first reason wins
    # a nested model's output read by a layer the graph cannot follow stays whole like a model output
    member_output = graph.fixed(record(graph, "member").output[0])
    assert member_output == _channels.Fixed("nested model output: 'member', read by 'combine'")
    assert graph.fixed(record(graph, "out2").output[0]).text == "model output"
    assert record(graph, "member").kind == "nested" and record(graph, "unit_norm").kind is None


def test_merge_of_unequal_layouts_splits_the_coarser_group():
    """Dense(4) + concat(Dense(2), Dense(2)) (NASNet's pattern): the 4-channel group becomes 2 + 2."""
    inputs = keras.Input((4,))
    a = L.Dense(4, name="a")(inputs)
    first, second = L.Dense(2, name="first"), L.Dense(2, name="second")
    b = L.Concatenate(name="cat")([first(inputs), second(inputs)])
    graph = channel_graph(keras.Model(inputs, L.Dense(3)(L.Multiply(name="mul")([a, b]))))
    halves = record(graph, "a").output
    assert [graph.size(g) for g in halves] == [2, 2]
    assert [graph.fixed(g) for g in halves] == [None, None]
    assert graph.find(halves[0]) == graph.find(record(graph, "first").output[0])
    assert graph.find(halves[1]) == graph.find(record(graph, "second").output[0])
    assert record(graph, "mul").output == halves


def test_shared_layer_and_subclassed_model_errors_name_them():
    inputs = keras.Input((4,))
    shared = L.Dense(4, name="shared")
    with pytest.raises(ValueError, match=r"layer 'shared' \(Dense\) is called more than once"):
        channel_graph(keras.Model(inputs, shared(shared(inputs))))

    class Sub(keras.Model):
        def call(self, x):
            return x

    with pytest.raises(ValueError, match="has no functional graph"):
        channel_graph(Sub(name="sub"))


def squeeze_excite_model(gate_channels=8):
    """conv -> squeeze-and-excitation (GAP, size-1 Reshape, two 1x1 convs, hard sigmoid by keras.ops) -> conv."""
    inputs = keras.Input((6, 6, 3))
    h = L.Conv2D(8, 3, padding="same", name="expand")(inputs)
    s = L.Reshape((1, 1, 8), name="se_reshape")(L.GlobalAveragePooling2D(name="squeeze")(h))
    s = L.Conv2D(2, 1, activation="relu", name="se_reduce")(s)
    s = L.Conv2D(gate_channels, 1, name="se_expand")(s)
    s = L.ReLU(6.0, name="relu6")(s + 3.0) * (1.0 / 6.0)
    h = L.Multiply(name="se_excite")([h, s])
    return keras.Model(inputs, L.Dense(3, name="out")(L.GlobalAveragePooling2D(keepdims=False)(h)))


def test_squeeze_excitation_gate_is_united_with_the_tensor_it_scales():
    graph = channel_graph(squeeze_excite_model())
    expand = roots(graph, record(graph, "expand").output)
    assert roots(graph, record(graph, "se_reshape").output) == expand  # (C,) -> (1, 1, C) keeps the group
    assert roots(graph, record(graph, "se_expand").output) == expand  # (batch, 1, 1, 8) gate x (batch, 6, 6, 8)
    assert roots(graph, record(graph, "se_excite").output) == expand
    assert graph.fixed(expand[0]) is None and graph.fixed(record(graph, "se_reduce").output[0]) is None
    ops = [r for r in graph.records() if not isinstance(r.layer, L.Layer)]
    assert [(type(r.layer).__name__, r.kind) for r in ops] == [("Add", "elementwise"), ("Multiply", "elementwise")]
    assert {graph.size(r): [layer.name for layer in ls] for r, ls in graph.openers().items()} == {
        8: ["expand", "se_expand"], 2: ["se_reduce"], 3: ["out"]}


def test_a_one_channel_gate_broadcasts_and_is_kept_whole():
    graph = channel_graph(squeeze_excite_model(gate_channels=1))
    expand = roots(graph, record(graph, "expand").output)
    assert graph.fixed(expand[0]) is None
    assert roots(graph, record(graph, "se_excite").output) == expand
    assert graph.fixed(record(graph, "se_expand").output[0]) == _channels.Fixed("broadcast over the channels by 'se_excite'")


def test_scale_and_constant_layers_carry_their_per_channel_weights():
    inputs = keras.Input((4, 4, 3))
    h = L.Conv2D(6, 3, name="conv")(L.Rescaling(1 / 255.0, name="rescale")(inputs))
    h = L.Normalization(name="norm")(h)
    h = LayerScale(0.5, 6, name="scale")(h)
    h = StochasticDepth(0.2, name="drop_path")(h)
    h = L.Rescaling(2.0, offset=1.0, name="scalar_rescale")(h)
    graph = channel_graph(keras.Model(inputs, L.Dense(2)(L.Flatten()(h))))
    conv = roots(graph, record(graph, "conv").output)
    for name in ("norm", "scale", "drop_path", "scalar_rescale"):
        assert roots(graph, record(graph, name).output) == conv
    assert graph.fixed(conv[0]) is None
    norm, scale = record(graph, "norm"), record(graph, "scale")
    assert (norm.kind, scale.kind) == ("constant", "scale")
    assert [(w.variable.name, w.axis, w.side) for w in norm.weights] == [("mean", 0, "in"), ("variance", 0, "in")]
    assert [(w.variable is scale.layer.gamma, w.axis, w.side) for w in scale.weights] == [(True, 0, "in")]


@pytest.mark.parametrize("constant", [
    lambda h: L.Rescaling([1.0, 2.0, 3.0, 4.0], name="constant")(h),
    lambda h: L.Normalization(mean=[0.0] * 4, variance=[1.0] * 4, name="constant")(h),
    lambda h: h * np.arange(1, 5, dtype="float32"),
])
def test_per_channel_constants_outside_the_weights_keep_their_group_whole(constant):
    inputs = keras.Input((4,))
    h = L.Dense(4, name="h")(inputs)
    graph = channel_graph(keras.Model(inputs, L.Dense(2, name="out")(constant(h))))
    fixed = graph.fixed(record(graph, "h").output[0])
    assert fixed is not None and "per-channel constants are held in its config or call" in fixed.why


def test_grouped_conv_with_one_filter_per_channel_is_depthwise():
    inputs = keras.Input((6, 6, 3))
    h = L.Conv2D(8, 1, name="pw")(inputs)
    h = L.Conv2D(8, 3, padding="same", groups=8, name="dw")(h)
    graph = channel_graph(keras.Model(inputs, L.Dense(2)(L.GlobalAveragePooling2D()(h))))
    dw = record(graph, "dw")
    assert dw.kind == "depthwise" and roots(graph, dw.output) == roots(graph, record(graph, "pw").output)
    assert [(w.variable.name, w.axis, tuple(w.variable.shape)) for w in dw.weights] == [
        ("kernel", 3, (3, 3, 1, 8)), ("bias", 0, (8,))]


def transfer_model():
    """The keras.io recipe in small: a functional base (with a nested Sequential) called in a new model."""
    x = keras.Input((6, 6, 3))
    block = keras.Sequential([L.LayerNormalization(name="block_ln"), L.Conv2D(8, 1, name="block_conv")],
                             name="block")
    h = block(L.Conv2D(4, 3, name="stem")(x))
    base = keras.Model(x, L.ReLU(name="base_relu")(h), name="base")
    inputs = keras.Input((6, 6, 3))
    features = L.GlobalAveragePooling2D(name="pool")(base(inputs, training=False))
    return keras.Model(inputs, L.Dense(3, name="head")(features), name="transfer"), base, block


def test_nested_models_are_walked_through_and_their_weights_point_at_nested_variables():
    model, base, block = transfer_model()
    graph = channel_graph(model)
    stem, conv = base.get_layer("stem"), block.get_layer("block_conv")
    assert [type(r.layer).__name__ for r in graph.records()][:4] == ["Functional", "Conv2D", "Sequential",
                                                                     "LayerNormalization"]
    conv_record = graph.layers[id(conv)]
    assert conv_record.input == graph.layers[id(stem)].output  # the stem's group crosses into `block`
    assert graph.fixed(graph.layers[id(stem)].output[0]) is None
    # the base's last group reaches the outer head through pooling: prunable, not a boundary
    assert roots(graph, record(graph, "head").input) == roots(graph, conv_record.output)
    assert graph.fixed(conv_record.output[0]) is None
    assert [w.variable for w in conv_record.weights] == [conv.kernel, conv.kernel, conv.bias]
    assert record(graph, "base").kind == "nested" and record(graph, "base").output == conv_record.output
    spec = permutation_spec(model, nested=True)
    paths = [ref.path for ref in weight_refs(model)]
    carried = {paths[index] for group in spec.sizes for index, _, _ in spec.weights_of(group)}
    assert carried == {"base/stem/kernel", "base/stem/bias", "base/block/block_ln/gamma",
                       "base/block/block_ln/beta", "base/block/block_conv/kernel",
                       "base/block/block_conv/bias", "head/kernel"}
    with pytest.raises(ValueError, match=r"Model 'transfer': align cannot permute through layer 'base' "
                                         r"\(Functional\): nested models are not supported unless"):
        permutation_spec(model)


def test_a_nested_model_called_twice_is_named_in_the_error():
    inputs = keras.Input((4,))
    inner = keras.Sequential([keras.Input((4,)), L.Dense(4)], name="inner")
    model = keras.Model(inputs, inner(inner(inputs)), name="twice")
    with pytest.raises(ValueError, match=r"Model 'twice': nested model 'inner' \(Sequential\) is called more "
                                         r"than once"):
        channel_graph(model)


def test_keras_ops_on_two_tensors_unite_like_merge_layers():
    inputs = keras.Input((4,))
    a, b = L.Dense(4, name="a")(inputs), L.Dense(4, name="b")(inputs)
    h = keras.ops.relu(keras.ops.maximum(a, b))
    graph = channel_graph(keras.Model(inputs, L.Dense(2, name="out")(h)))
    assert graph.find(record(graph, "a").output[0]) == graph.find(record(graph, "b").output[0])
    assert [r.kind for r in graph.records() if not isinstance(r.layer, L.Layer)] == ["merge", "elementwise"]
