"""ensemblekit._channels: the kind table, layouts, coupled groups and their fixed reasons."""

import keras
import numpy as np
import pytest

from ensemblekit import _channels
from ensemblekit._channels import _Groups, channel_graph, layer_kind, unsupported_reason

L = keras.layers


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
    (L.Reshape((2, 2)), [(None, 4)], "not a layer kind the channel graph knows"),
    (L.UnitNormalization(), [(None, 4)], "not a layer kind"),
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
              _channels.MERGES, _channels.CONCATS, _channels.FLATTENS]
    classes = [cls for types in tuples for cls in types]
    assert len(classes) == len(set(classes))
    assert set(_channels.OPENERS) < set(_channels.KINDS)
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
    graph = channel_graph(keras.Model(inputs, [member(u), L.Dense(2, name="out2")(skip)]))
    assert graph.fixed(record(graph, "h").input[0]).text == "model input"
    assert graph.fixed(record(graph, "h").output[0]) is None  # h, r share it; it reaches no output
    fixed = graph.fixed(record(graph, "u").output[0])
    assert fixed.layer is graph.model.get_layer("unit_norm")
    assert fixed.text.startswith("layer 'unit_norm' (UnitNormalization) cannot be pruned or permuted")
    assert graph.fixed(record(graph, "member").input[0]) == fixed  # first reason wins
    assert graph.fixed(record(graph, "member").output[0]).text == "nested model boundary ('member')"
    assert graph.fixed(record(graph, "out2").output[0]).text == "model output"
    assert record(graph, "member").kind == "nested" and record(graph, "unit_norm").kind is None


def test_merge_of_unequal_layouts_cannot_pass():
    inputs = keras.Input((4,))
    a = L.Dense(4, name="a")(inputs)
    b = L.Concatenate(name="cat")([L.Dense(2)(inputs), L.Dense(2)(inputs)])
    graph = channel_graph(keras.Model(inputs, L.Dense(3)(L.Multiply(name="mul")([a, b]))))
    assert "channel layouts differ" in graph.fixed(record(graph, "a").output[0]).why


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
