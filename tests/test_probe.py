"""A softmax the detector cannot read is probed, with a warning, or the call refuses and asks."""

import warnings

import keras
import numpy as np
import pytest
from keras import ops

import ensemblekit as ek

X = np.random.default_rng(0).normal(size=(16, 5)).astype("float32")


@keras.saving.register_keras_serializable(package="ensemblekit_tests")
class CustomHead(keras.layers.Layer):
    """Dense then softmax, sigmoid or nothing inside ``call``: no ``activation`` to read."""

    def __init__(self, units=3, squash="softmax", **kwargs):
        super().__init__(**kwargs)
        self.units, self.squash = units, squash
        self.dense = keras.layers.Dense(units)

    def call(self, inputs):
        z = self.dense(inputs)
        return {"softmax": ops.softmax, "sigmoid": ops.sigmoid, "none": lambda v: v}[self.squash](z)

    def get_config(self):
        return {**super().get_config(), "units": self.units, "squash": self.squash}


def member(seed, units=3, squash="softmax"):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((5,))
    hidden = keras.layers.Dense(8, activation="relu")(inputs)
    return keras.Model(inputs, CustomHead(units, squash)(hidden), name=f"custom_{seed}")


def softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_a_custom_softmax_head_is_probed_and_the_ensemble_is_exact():
    members = [member(0), member(1)]
    with pytest.warns(UserWarning, match=r"member 0 \('custom_0'\).*'custom_head.*' \(CustomHead\).*"
                                         r"rows >= 0 summing to 1.*output_kind='probs'"):
        model = ek.ensemble(members, "mean")
    expected = np.mean([m.predict(X, verbose=0) for m in members], axis=0)
    np.testing.assert_allclose(model.predict(X, verbose=0), expected, atol=1e-6)


def test_stating_the_output_kind_silences_the_probe():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ek.ensemble([member(0), member(1)], "mean", output_kind="probs", task="multiclass")


def test_a_custom_head_without_squash_is_read_as_logits():
    members = [member(0, squash="none"), member(1, squash="none")]
    with pytest.warns(UserWarning, match="values outside"):
        model = ek.ensemble(members, "mean")
    expected = np.mean([softmax(m.predict(X, verbose=0)) for m in members], axis=0)
    np.testing.assert_allclose(model.predict(X, verbose=0), expected, atol=1e-6)


def test_a_lambda_sigmoid_is_read_as_binary_probabilities():
    def lambda_member(seed):
        keras.utils.set_random_seed(seed)
        inputs = keras.Input((5,))
        z = keras.layers.Dense(1)(keras.layers.Dense(8, activation="relu")(inputs))
        return keras.Model(inputs, keras.layers.Lambda(ops.sigmoid)(z))

    members = [lambda_member(0), lambda_member(1)]
    with pytest.warns(UserWarning, match=r"values in \[0, 1\]"):
        model = ek.ensemble(members, "mean")
    expected = np.mean([m.predict(X, verbose=0) for m in members], axis=0)
    np.testing.assert_allclose(model.predict(X, verbose=0), expected, atol=1e-6)
    assert ek.detect_output_kind(members[0]) == "probs"


def test_string_inputs_cannot_be_probed_so_the_call_refuses_and_asks():
    inputs = keras.Input((1,), dtype="string")
    lookup = keras.layers.StringLookup(vocabulary=["a", "b"], output_mode="one_hot")(inputs)
    model = keras.Model(inputs, CustomHead(3, "softmax")(keras.layers.Flatten()(lookup)))
    with pytest.raises(ValueError, match=r"no probe batch can be built for its string input.*output_kind="):
        ek.ensemble([model, keras.models.clone_model(model)], "mean")


@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="SavedModels need TensorFlow")
def test_a_savedmodel_softmax_member_is_probed(tmp_path):
    members = [keras.Sequential([keras.Input((5,)), keras.layers.Dense(3, activation="softmax")])
               for _ in range(2)]
    paths = []
    for i, m in enumerate(members):
        paths.append(str(tmp_path / f"sm{i}"))
        m.export(paths[-1], verbose=0)
    with pytest.warns(UserWarning, match=r"TFSMLayer.*summing to 1"):
        model = ek.ensemble(paths, "mean")
    expected = np.mean([m.predict(X, verbose=0) for m in members], axis=0)
    np.testing.assert_allclose(model.predict(X, verbose=0), expected, atol=1e-6)
