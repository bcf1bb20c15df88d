import keras
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
