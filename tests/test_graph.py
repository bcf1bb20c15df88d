"""The shared walker: nested paths, weight refs, architecture differences."""

import keras
import numpy as np
import pytest

from ensemblekit import _graph
from tests.conftest import make_mlp


def test_iter_layers_expands_nested_models_with_paths():
    inner = make_mlp(0, name="inner")
    inputs = keras.Input((8,))
    outer = keras.Model(inputs, keras.layers.Dense(2, name="top")(inner(inputs)), name="outer")
    assert [p for p, _ in _graph.iter_layers(outer)] == [
        "inner/flatten", "inner/hidden", "inner/out", "top"] or [
        p for p, _ in _graph.iter_layers(outer)][1:] == ["inner/hidden", "inner/out", "top"]
    paths = [ref.path for ref in _graph.weight_refs(outer)]
    assert paths == ["inner/hidden/kernel", "inner/hidden/bias", "inner/out/kernel",
                     "inner/out/bias", "top/kernel", "top/bias"]


def test_get_set_arrays_round_trip_and_shape_error():
    a, b = make_mlp(0), make_mlp(1)
    _graph.set_arrays(b, _graph.get_arrays(a))
    for x, y in zip(a.get_weights(), b.get_weights()):
        np.testing.assert_array_equal(x, y)
    arrays = _graph.get_arrays(a)
    arrays[0] = arrays[0][:, :3]
    with pytest.raises(ValueError, match=r"weight 'hidden/kernel': expected shape \(8, 16\), got \(8, 3\)"):
        _graph.set_arrays(b, arrays)


def test_architecture_differences_list_every_tensor():
    a, b = make_mlp(0), make_mlp(1, hidden=32, classes=4)
    problems = _graph.architecture_differences([a, b])
    assert len(problems) == 4  # both kernels and both biases differ
    assert "(8, 32)" in problems[0] and "(8, 16)" in problems[0]
    with pytest.raises(ValueError, match="4 incompatible weights"):
        _graph.check_same_architecture([a, b])
    assert _graph.architecture_differences([a, make_mlp(2)]) == []


def test_functional_graph_and_subclassed_error():
    graph = _graph.functional_graph(make_mlp(0))
    assert graph["hidden"] == ["flatten"] or "hidden" in graph

    class Sub(keras.Model):
        def call(self, x):
            return x

    with pytest.raises(ValueError, match="has no functional graph"):
        _graph.functional_graph(Sub())


def test_architectures_match_by_structure_not_by_numbered_variable_names():
    """Keras numbers unnamed variables per process (``variable``, ``variable_18``): not a difference."""
    import keras

    from ensemblekit._graph import architecture_differences

    class Scale(keras.layers.Layer):
        def build(self, input_shape):
            self.add_weight(shape=(input_shape[-1],), initializer="ones")  # auto-named

        def call(self, x):
            return x * self.weights[0]

    def model():
        inputs = keras.Input((3,))
        return keras.Model(inputs, keras.layers.Dense(2)(Scale()(inputs)))

    a, b = model(), model()
    names = [w.name for w in a.layers[1].weights] + [w.name for w in b.layers[1].weights]
    assert architecture_differences([a, b]) == [], names
    inputs = keras.Input((3,))
    wider = keras.Model(inputs, keras.layers.Dense(4)(Scale()(inputs)))
    assert architecture_differences([a, wider])


def test_flat_nodes_expand_nested_models_in_place_with_the_same_layers():
    inner = make_mlp(0, name="inner")
    block = keras.Sequential([keras.layers.Dense(3, name="d")], name="block")
    inputs = keras.Input((8,))
    hidden = inner(inputs)
    outer = keras.Model(inputs, keras.layers.Add(name="sum")([block(hidden), hidden + 1.0]), name="outer")
    model_inputs, outputs, nodes = _graph.flat_nodes(outer)
    names = [(node.operation.name, node.path) for node in nodes]
    assert [n for n in names if n[0] in ("hidden", "out", "d", "sum")] == [
        ("hidden", ("inner",)), ("out", ("inner",)), ("d", ("block",)), ("sum", ())]
    leaves = {id(layer) for _, layer in _graph.iter_layers(outer)}
    assert {id(node.operation) for node in nodes if isinstance(node.operation, keras.layers.Layer)} == leaves
    produced = {id(t): node for node in nodes for t in node.outputs}
    first = next(node for node in nodes if node.path == ("inner",))
    assert first.inputs[0] is model_inputs[0]  # the nested model's input is the tensor it was called on
    add = nodes[-1]
    assert [produced[id(t)].operation.name for t in add.inputs][0] == "d"
    plus_one = produced[id(add.inputs[1])]
    assert produced[id(plus_one.inputs[0])].operation.name == "out"  # the nested output stands for the call
    assert outputs[0] is add.outputs[0]
    args, _ = plus_one.arguments({id(plus_one.inputs[0]): "h"})
    assert args == ("h", 1.0)  # the call's constants kept, its tensors replaced


def test_flat_nodes_reject_a_nested_model_without_graph():
    class Sub(keras.Model):
        def call(self, x):
            return x

    inputs = keras.Input((3,))
    with pytest.raises(ValueError, match="has no functional graph"):
        _graph.flat_nodes(keras.Model(inputs, Sub()(inputs)))
