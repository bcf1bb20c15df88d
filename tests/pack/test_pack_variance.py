"""ek.pack of members that predict a variance: the packed mixture equals ek.ensemble's."""

import keras
import numpy as np
import pytest

import ensemblekit as ek
from ensemblekit.pack.build import repack_settings

RNG = np.random.default_rng(7)
X = RNG.normal(size=(10, 12, 2)).astype("float32")


def gaussian_conv(seed, head="softplus", label=False):
    keras.utils.set_random_seed(seed)
    x = keras.Input((12, 2))
    hidden = keras.layers.GlobalAveragePooling1D()(keras.layers.Conv1D(6, 3, activation="relu")(x))
    outputs = {"mean": keras.layers.Dense(2, name="mu")(hidden),
               "var": keras.layers.Dense(2, activation=head, name="sigma2")(hidden)}
    if label:
        outputs["label"] = keras.layers.Dense(3, activation="softmax", name="cls")(hidden)
    return keras.Model(x, outputs, name=f"gaussian_{seed}")


def assert_same(got, want):
    assert sorted(got) == sorted(want)
    for key in want:
        np.testing.assert_allclose(got[key], want[key], atol=1e-5, err_msg=key)


def test_pack_mixture_equals_ensemble_and_saves(tmp_path):
    members = [gaussian_conv(s) for s in range(4)]
    packed = ek.pack(members, variance="var", uncertainty=True)
    want = ek.ensemble(members, variance="var", uncertainty=True).predict(X, verbose=0)
    got = packed.predict(X, verbose=0)
    assert_same(got, want)
    path = tmp_path / "packed_mixture.keras"
    packed.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    assert_same(loaded.predict(X, verbose=0), got)
    for member, back in zip(members, ek.unpack(loaded)):
        for a, b in zip(member.get_weights(), back.get_weights()):
            np.testing.assert_array_equal(a, b)
    settings = repack_settings(loaded)
    assert settings["variance"] == {"mean": "var"} and settings["reduce"] == {"mean": "mean"}
    assert_same(ek.pack(ek.unpack(loaded), **settings).predict(X, verbose=0), got)


def test_pack_log_variance_pair_next_to_a_classifier_head():
    members = [gaussian_conv(s, head=None, label=True) for s in range(3)]
    kwargs = dict(variance={"mean": "var"}, variance_kind="log_variance")
    got = ek.pack(members, {"label": "logit_mean", "mean": "mean"}, **kwargs).predict(X, verbose=0)
    want = ek.ensemble(members, {"label": "logit_mean", "mean": "mean"}, **kwargs).predict(X, verbose=0)
    assert sorted(got) == ["label", "mean", "mean_variance"]
    assert_same(got, want)


def test_pack_refuses_what_ensemble_refuses():
    members = [gaussian_conv(s, head=None) for s in range(2)]
    with pytest.raises(ValueError, match=r"member 0 \('gaussian_0'\): variance output 'var' .* ends in a linear"):
        ek.pack(members, variance="var")
    with pytest.raises(ValueError, match="method 'median' for output 'mean' \\(pack\\) cannot be used with a variance"):
        ek.pack(members, "median", variance="var", variance_kind="log_variance")
