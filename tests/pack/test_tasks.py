"""ek.pack for every task: the packed model equals ek.ensemble, uncertainty outputs included."""

import keras
import numpy as np
import pytest

import ensemblekit as ek

RNG = np.random.default_rng(4)


def conv_member(units, activation, seed):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([
        keras.Input((12, 2)),
        keras.layers.Conv1D(6, 3, activation="relu"),
        keras.layers.BatchNormalization(),
        keras.layers.GlobalAveragePooling1D(),
        keras.layers.Dense(units, activation=activation),
    ], name=f"member_{seed}")


def assert_same_outputs(got, want, label=""):
    """The packed model's dict outputs equal the ensemble's, key by key."""
    assert sorted(got) == sorted(want)
    for key in want:
        np.testing.assert_allclose(got[key], want[key], atol=1e-5, err_msg=f"{label}{key}")


def assert_unpacks_exactly(members, packed):
    for member, back in zip(members, ek.unpack(packed)):
        for a, b in zip(member.get_weights(), back.get_weights()):
            np.testing.assert_array_equal(a, b)


CASES = [
    ("binary", 1, "sigmoid", ["mean", "logit_mean", "vote"]),
    ("multilabel", 3, "sigmoid", ["mean", "geometric"]),
    ("regression", 2, None, ["mean", "median", "trimmed_mean"]),
    ("multiclass", 4, "softmax", ["mean", "vote"]),
]


@pytest.mark.parametrize("task,units,activation,methods", CASES)
def test_pack_equals_ensemble_per_task(task, units, activation, methods, tmp_path):
    members = [conv_member(units, activation, seed) for seed in range(5)]
    x = RNG.normal(size=(10, 12, 2)).astype("float32")
    given = task if activation is None else None
    for method in methods:
        packed = ek.pack(members, method, task=given, uncertainty=True)
        ensemble = ek.ensemble(members, method, task=given, uncertainty=True)
        got = packed.predict(x, verbose=0)
        assert_same_outputs(got, ensemble.predict(x, verbose=0), f"{task}/{method}/")
    path = tmp_path / f"{task}.keras"
    packed.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    np.testing.assert_allclose(loaded.predict(x, verbose=0)["prediction"], got["prediction"], atol=1e-6)
    assert_unpacks_exactly(members, loaded)


def test_pack_refuses_methods_of_another_task():
    members = [conv_member(2, None, seed) for seed in range(2)]
    with pytest.raises(ValueError, match="method 'vote' is not defined for task 'regression'"):
        ek.pack(members, "vote", task="regression")
    with pytest.raises(ValueError, match="cannot be told; pass task="):
        ek.pack([conv_member(1, None, seed) for seed in range(2)])


def two_headed(seed, dict_inputs=True):
    keras.utils.set_random_seed(seed)
    a, b = keras.Input((6,), name="a"), keras.Input((3,), name="b")
    hidden = keras.layers.Dense(8, activation="relu", name="hidden")(keras.layers.Concatenate(name="cat")([a, b]))
    outputs = {"label": keras.layers.Dense(3, activation="softmax", name="label_head")(hidden),
               "value": keras.layers.Dense(2, name="value_head")(hidden)}
    return keras.Model({"a": a, "b": b} if dict_inputs else [a, b], outputs, name=f"two_headed_{seed}")


def test_pack_several_inputs_and_outputs_equals_ensemble(tmp_path):
    members = [two_headed(seed) for seed in range(3)]
    x = {"a": RNG.normal(size=(7, 6)).astype("float32"), "b": RNG.normal(size=(7, 3)).astype("float32")}
    method = {"label": "logit_mean", "value": "median"}
    task = {"value": "regression"}
    packed = ek.pack(members, method, task=task, uncertainty=True)
    got = packed.predict(x, verbose=0)
    assert_same_outputs(got, ek.ensemble(members, method, task=task, uncertainty=True).predict(x, verbose=0))
    path = tmp_path / "two_headed.keras"
    packed.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    np.testing.assert_allclose(loaded.predict(x, verbose=0)["value"], got["value"], atol=1e-6)
    assert_unpacks_exactly(members, loaded)
    with pytest.raises(ValueError, match=r"reduce must name every output \['label', 'value'\]"):
        ek.pack(members, {"label": "mean"}, task=task)


def test_pack_dense_segmentation_maps_equals_ensemble():
    def segmenter(seed):
        keras.utils.set_random_seed(seed)
        inputs = keras.Input((6, 6, 3))
        hidden = keras.layers.Conv2D(4, 3, padding="same", activation="relu")(inputs)
        return keras.Model(inputs, keras.layers.Conv2D(5, 1, activation="softmax")(hidden))

    members = [segmenter(seed) for seed in range(3)]
    x = RNG.normal(size=(2, 6, 6, 3)).astype("float32")
    got = ek.pack(members, "vote", uncertainty=True).predict(x, verbose=0)
    assert got["prediction"].shape == (2, 6, 6, 5) and got["mutual_information"].shape == (2, 6, 6)
    assert_same_outputs(got, ek.ensemble(members, "vote", uncertainty=True).predict(x, verbose=0))
