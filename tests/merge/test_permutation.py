import keras
import numpy as np
import pytest

from ensemblekit.merge.permutation import permutation_spec

L = keras.layers


def test_mlp_groups_hidden_units_and_never_the_output():
    model = keras.Sequential([keras.Input((4,)), L.Dense(8, name="h1"), L.Dropout(0.1),
                              L.Dense(6, name="h2"), L.Dense(2, name="out")])
    spec = permutation_spec(model)
    assert sorted(spec.sizes.values()) == [6, 8]
    # h1 kernel out-axis, h1 bias, h2 kernel in-axis share one group; out's axis 1 is fixed
    assert spec.axes[0] == [(1, spec.axes[1][0][1], 1)]
    assert spec.axes[2][0] == (0, spec.axes[1][0][1], 1)
    assert 5 not in spec.axes and [a for a, _, _ in spec.axes[4]] == [0]


def test_residual_add_joins_groups_and_flatten_tiles_channels():
    inputs = keras.Input((10, 1))
    h = L.Conv1D(4, 3, padding="same")(inputs)
    h = L.BatchNormalization()(h)
    r = L.Conv1D(4, 3, padding="same")(L.ReLU()(h))
    h = L.Add()([h, r])
    h = L.Flatten()(L.MaxPooling1D()(h))
    model = keras.Model(inputs, L.Dense(3)(h))
    spec = permutation_spec(model)
    assert list(spec.sizes.values()) == [4]
    group = next(iter(spec.sizes))
    # BN's 4 vectors, both convs' outputs, the second conv's input and the Dense input (tiled x5)
    assert spec.axes[0] == [(2, group, 1)]
    assert all(spec.axes[i] == [(0, group, 1)] for i in range(2, 6))
    assert spec.axes[6] == [(1, group, 1), (2, group, 1)]
    assert spec.axes[8] == [(0, group, 5)]


def test_unsupported_layer_in_the_path_is_named():
    model = keras.Sequential([keras.Input((4,)), L.Dense(8), L.Reshape((2, 4), name="reshape_me"),
                              L.Flatten(), L.Dense(2)])
    with pytest.raises(ValueError, match=r"cannot permute through layer 'reshape_me' \(Reshape\)"):
        permutation_spec(model)


def test_layers_before_any_permutable_unit_are_fine():
    model = keras.Sequential([keras.Input((4,)), L.Rescaling(0.5), L.Dense(8), L.Dense(2)])
    assert list(permutation_spec(model).sizes.values()) == [8]


def test_concatenate_places_each_group_at_its_offset():
    inputs = keras.Input((4,))
    a, b = L.Dense(3, name="a")(inputs), L.Dense(2, name="b")(inputs)
    model = keras.Model(inputs, L.Dense(2, name="out")(L.Concatenate()([a, b])))
    spec = permutation_spec(model)
    assert spec.sizes == {0: 3, 1: 2}
    assert spec.axes[4] == [(0, 0, 1), (0, 1, 1)]  # out's kernel reads both groups
    np.testing.assert_array_equal(spec.unit_positions(4, 0, 0), [[0, 1, 2]])
    np.testing.assert_array_equal(spec.unit_positions(4, 0, 1), [[3, 4]])
    assert [layer.name for layer in spec.sources[1]] == ["b"]


def test_depthwise_kernel_moves_with_its_input_group():
    inputs = keras.Input((6, 6, 2))
    h = L.DepthwiseConv2D(3, padding="same")(L.Conv2D(4, 3, padding="same")(inputs))
    spec = permutation_spec(keras.Model(inputs, L.Dense(2)(L.GlobalAveragePooling2D()(h))))
    assert spec.sizes == {0: 4}
    assert spec.axes[2] == [(2, 0, 1)] and spec.axes[3] == [(0, 0, 1)]  # depthwise kernel, bias
    assert [type(layer).__name__ for layer in spec.sources[0]] == ["Conv2D"]


@pytest.mark.parametrize("build, message", [
    (lambda x: keras.Sequential([L.Dense(3)], name="inner")(L.Dense(4)(x)),
     r"layer 'inner' \(Sequential\): nested models are not supported"),
    (lambda x: L.Conv1D(4, 1, groups=2, name="grouped")(L.Dense(4)(x)),
     r"layer 'grouped' \(Conv1D\): grouped convolutions are not supported"),
    (lambda x: L.Dense(3)(L.Softmax(axis=1, name="sm")(L.Dense(4)(x))),
     r"layer 'sm' \(Softmax\): softmax over an axis other than the last"),
])
def test_layers_that_stop_a_permutation_are_named(build, message):
    inputs = keras.Input((3, 4))
    with pytest.raises(ValueError, match="align cannot permute through " + message):
        permutation_spec(keras.Model(inputs, build(inputs)))
