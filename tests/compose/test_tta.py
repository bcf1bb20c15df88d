"""ek.tta: a model averaged over deterministic views equals the NumPy mean over the views."""

import keras
import numpy as np
import pytest

import ensemblekit as ek
from ensemblekit.compose import CenterCrop, Flip, Shift

RNG = np.random.default_rng(0)


def softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


@pytest.fixture(scope="module")
def sequence_model():
    keras.utils.set_random_seed(0)
    return keras.Sequential([keras.Input((12, 2)), keras.layers.Conv1D(4, 3, activation="relu"),
                             keras.layers.GlobalAveragePooling1D(), keras.layers.Dense(3)], name="seq")


def test_tta_equals_the_mean_of_probabilities_over_views(sequence_model):
    x = RNG.normal(size=(5, 12, 2)).astype("float32")
    model = ek.tta(sequence_model, [None, Flip(axis=1), Shift(2, axis=1), Shift(-1, axis=1)])
    shifted = np.concatenate([np.zeros((5, 2, 2)), x[:, :-2]], axis=1)
    back = np.concatenate([x[:, 1:], np.zeros((5, 1, 2))], axis=1)
    views = [x, x[:, ::-1], shifted, back]
    expected = np.mean([softmax(sequence_model.predict(v.astype("float32"), verbose=0)) for v in views], axis=0)
    np.testing.assert_allclose(model.predict(x, verbose=0), expected, atol=1e-6)


def test_tta_saves_and_loads_in_safe_mode_and_composes_with_ensemble(sequence_model, tmp_path):
    model = ek.tta(sequence_model, [None, Flip(axis=1)], method="logit_mean")
    x = RNG.normal(size=(4, 12, 2)).astype("float32")
    path = tmp_path / "tta.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-6)
    keras.utils.set_random_seed(1)
    other = keras.models.clone_model(sequence_model)
    other_tta = ek.tta(other, [None, Flip(axis=1)], method="logit_mean")
    both = ek.ensemble([model, other_tta], "mean")  # an ensemble of TTA members
    expected = (model.predict(x, verbose=0) + other_tta.predict(x, verbose=0)) / 2
    np.testing.assert_allclose(both.predict(x, verbose=0), expected, atol=1e-6)
    over = ek.tta(ek.ensemble([sequence_model, other], "mean"), [None, Flip(axis=1)])  # TTA of an ensemble
    flipped = x[:, ::-1]
    members = [sequence_model, other]
    expected = np.mean([softmax(m.predict(v, verbose=0)) for m in members for v in (x, flipped)], axis=0)
    np.testing.assert_allclose(over.predict(x, verbose=0), expected, atol=1e-6)


def test_center_crop_keeps_the_size_and_a_full_crop_is_the_identity():
    images = RNG.uniform(size=(2, 8, 8, 3)).astype("float32")
    np.testing.assert_allclose(keras.ops.convert_to_numpy(CenterCrop(1.0)(images)), images, atol=1e-6)
    assert CenterCrop(0.5)(images).shape == (2, 8, 8, 3)


def test_bad_views_get_one_clear_error(sequence_model):
    with pytest.raises(ValueError, match="at least two views"):
        ek.tta(sequence_model, [Flip(axis=1)])
    with pytest.raises(TypeError, match=r"views\[1\] is a str"):
        ek.tta(sequence_model, [None, "flip"])
    with pytest.raises(ValueError, match="CenterCrop: fraction must be in"):
        CenterCrop(1.5)


def test_tta_of_a_packed_ensemble_equals_tta_of_the_ensemble_and_exports(sequence_model, tmp_path):
    """``pack`` then ``tta``: the same function as ``tta`` of ``ek.ensemble``; its SavedModel export
    is verified against the Keras model (``ek.export`` refuses an artifact that differs)."""
    keras.utils.set_random_seed(2)
    members = [sequence_model, keras.models.clone_model(sequence_model)]
    views = [None, Shift(1, axis=1), Shift(-1, axis=1)]
    over_pack = ek.tta(ek.pack(members, reduce="mean"), views)
    over_ensemble = ek.tta(ek.ensemble(members, "mean"), views)
    x = RNG.normal(size=(6, 12, 2)).astype("float32")
    np.testing.assert_allclose(over_pack.predict(x, verbose=0), over_ensemble.predict(x, verbose=0), atol=1e-5)
    if keras.backend.backend() != "tensorflow":
        return
    path = tmp_path / "tta_packed"
    ek.export(over_pack, path)
    import tensorflow as tf

    loaded = tf.saved_model.load(str(path))  # held: its variables live as long as it does
    served = loaded.serve(tf.constant(x))
    np.testing.assert_allclose(np.asarray(served), over_pack.predict(x, verbose=0), atol=1e-5)
