import keras
import numpy as np
import pytest

from ensemblekit.merge import merge
from tests.conftest import make_mlp


def _predict(model, x):
    return model.predict(x, verbose=0)


def test_soup_of_copies_is_the_model(toy_data):
    x, _ = toy_data
    model = make_mlp(0)
    for method, kwargs in [("linear", {}), ("task_arithmetic", {"base": model}),
                           ("ties", {"base": make_mlp(0)}), ("slerp", {})]:
        copies = [model, keras.models.clone_model(model)]
        copies[1].set_weights(model.get_weights())
        if method != "slerp":
            copies.append(model)
        merged = merge(copies, method, **kwargs)
        for got, want in zip(merged.get_weights(), model.get_weights(), strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7, err_msg=method)
    np.testing.assert_allclose(_predict(merged, x), _predict(model, x), atol=1e-6)


def test_weights_one_zero_returns_first():
    a, b = make_mlp(0), make_mlp(1)
    merged = merge([a, b], weights=[1, 0])
    for got, want in zip(merged.get_weights(), a.get_weights(), strict=True):
        np.testing.assert_array_equal(got, want)


def test_per_layer_weights_take_layers_from_different_members():
    a, b = make_mlp(0), make_mlp(1)
    merged = merge([a, b], weights={"hidden/*": [1, 0], "default": [0, 1]})
    np.testing.assert_array_equal(merged.get_layer("hidden").kernel.numpy(), a.get_layer("hidden").kernel.numpy())
    np.testing.assert_array_equal(merged.get_layer("out").kernel.numpy(), b.get_layer("out").kernel.numpy())


def test_mismatch_lists_every_incompatible_tensor_before_arithmetic():
    a, wider, more_classes = make_mlp(0), make_mlp(1, hidden=17), make_mlp(2, classes=4)
    with pytest.raises(ValueError) as info:
        merge([a, wider, more_classes])
    message = str(info.value)
    assert "(5 incompatible weights)" in message
    assert "member 1" in message and "'hidden/kernel' Dense (8, 17)" in message and "(8, 16)" in message
    assert "member 2" in message and "'out/bias' Dense (4,)" in message


def test_nan_in_member_names_member_and_path():
    a, b = make_mlp(0), make_mlp(1)
    kernel = b.get_layer("out").kernel
    kernel.assign(np.where(np.eye(*kernel.shape) > 0, np.nan, kernel.numpy()))
    with pytest.raises(ValueError, match=r"member 1 .*weight 'out/kernel' holds 3 NaN/inf"):
        merge([a, b])


class _CountingDense(keras.layers.Dense):
    """A Dense layer with an integer step counter among its weights."""

    def build(self, input_shape):
        super().build(input_shape)
        self.steps = self.add_weight(shape=(), dtype="int64", trainable=False, name="steps",
                                     initializer="zeros")


def test_non_float_weights_are_copied_not_averaged():
    def model(steps):
        m = keras.Sequential([keras.Input((3,)), _CountingDense(2, name="d")])
        m.get_layer("d").steps.assign(steps)
        return m

    a, b = model(10), model(21)
    merged = merge([a, b], weights=[1, 3])
    assert merged.get_layer("d").steps.dtype == "int64"
    assert int(merged.get_layer("d").steps.numpy()) == 10
    assert int(merge([a, b], "task_arithmetic", base=b).get_layer("d").steps.numpy()) == 21


def test_base_rules_and_weight_count_errors():
    a, b = make_mlp(0), make_mlp(1)
    with pytest.raises(ValueError, match="'ties' needs base="):
        merge([a, b], "ties")
    with pytest.raises(ValueError, match="'linear' does not use a base"):
        merge([a, b], base=a)
    with pytest.raises(ValueError, match="weights has 3 entries but there are 2 members"):
        merge([a, b], weights=[1, 2, 3])
    with pytest.raises(ValueError, match="'slerp' merges exactly 2 models, got 3"):
        merge([a, b, a], "slerp")
    with pytest.raises(TypeError, match="models must be a list"):
        merge(a)


def test_merged_model_is_plain_keras_and_round_trips(tmp_path, toy_data):
    x, _ = toy_data
    merged = merge([make_mlp(0), make_mlp(1)], "slerp", t=0.3)
    path = tmp_path / "merged.keras"
    merged.save(path)
    loaded = keras.saving.load_model(path)  # safe_mode, no custom_objects
    np.testing.assert_allclose(_predict(loaded, x), _predict(merged, x), atol=1e-6)
    assert all(type(layer).__module__.startswith("keras.") for layer in loaded.layers)


def test_models_from_legacy_and_keras_paths_load(tmp_path):
    a, b = make_mlp(0), make_mlp(1)
    a.save(tmp_path / "a.keras")
    b.save(tmp_path / "b.keras")
    merged = merge([tmp_path / "a.keras", tmp_path / "b.keras"], stream=False)
    expected = merge([a, b])
    for got, want in zip(merged.get_weights(), expected.get_weights(), strict=True):
        np.testing.assert_allclose(got, want, atol=1e-7)
