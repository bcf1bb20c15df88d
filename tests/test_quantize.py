"""``ek.quantize``: Keras' int8/int4/float8 quantizer on a copy, verified before it is returned."""

import importlib.util

import keras
import numpy as np
import pytest

import ensemblekit as ek
from tests.conftest import make_mlp, train_mlp

TF = keras.backend.backend() == "tensorflow"


@pytest.fixture(scope="module")
def trained(mnist1d):
    """Three MLPs trained briefly on mnist1d (logits out) and the test split."""
    (x, y), (x_test, y_test) = mnist1d
    members = [train_mlp(seed, x, y, epochs=8, input_shape=(40, 1), classes=10, hidden=64,
                         name=f"member_{seed}") for seed in range(3)]
    return members, x_test, y_test


def test_int8_ensemble_keeps_accuracy_and_never_touches_the_original(trained):
    members, x, y = trained
    model = ek.ensemble(members)
    weights = [w.copy() for w in model.get_weights()]
    quantized, report = ek.quantize(model, "int8", x, y, verbose=0)
    assert report.mode == "int8"
    assert report.quantized == [f"member_{i}/{name}" for i in range(3) for name in ("hidden", "out")]
    assert report.left_float == {}
    assert abs(report.accuracy_drop) <= 0.005
    assert report.agreement >= 0.98
    assert abs(report.after["nll"] - report.before["nll"]) < 0.02
    assert abs(report.after["ece"] - report.before["ece"]) < 0.02
    assert report.weight_bytes_after < 0.3 * report.weight_bytes_before
    kernel_dtypes = {str(layer._kernel.dtype) for layer in quantized.get_layer("member_0").layers
                     if isinstance(layer, keras.layers.Dense)}
    assert kernel_dtypes == {"int8"}
    assert not quantized.get_layer("member_0").compiled  # no optimizer state carried along
    # The user's model is unchanged: float weights, float policies.
    assert all(np.array_equal(a, b) for a, b in zip(model.get_weights(), weights, strict=True))
    assert {layer.dtype_policy.name for layer in members[0].layers} == {"float32"}


def test_int4_is_smaller_than_int8_and_float8_is_larger_than_float32(trained):
    members, x, y = trained
    model = ek.ensemble(members)
    sizes = {}
    # int4 and float8 (scale 1) move the argmax of more borderline rows (members at ~45%).
    for mode, min_agreement in (("int8", 0.98), ("int4", 0.9), ("float8", 0.93)):
        quantized, report = ek.quantize(model, mode, x, y, max_accuracy_drop=0.05, verbose=0)
        assert len(report.quantized) == 6 and report.agreement >= min_agreement
        assert quantized.get_layer("member_1").get_layer("hidden").dtype_policy.quantization_mode == mode
        sizes[mode] = report.weight_bytes_after
    float_bytes = report.weight_bytes_before
    assert sizes["int4"] < sizes["int8"] < float_bytes < sizes["float8"]


def test_quantized_model_loads_in_safe_mode_with_the_same_outputs(trained, tmp_path):
    members, x, y = trained
    quantized, _ = ek.quantize(ek.ensemble(members), "int8", x, y, verbose=0)
    path = tmp_path / "int8.keras"
    quantized.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    np.testing.assert_array_equal(loaded.predict(x[:64], verbose=0), quantized.predict(x[:64], verbose=0))
    assert loaded.get_layer("member_2").get_layer("out").dtype_policy.name == "int8_from_float32"


def test_accuracy_drop_above_the_bound_is_refused_with_the_numbers():
    # One huge weight per column sets the int8 scale, so the small weights that carry
    # the signal round to zero: the quantized model predicts class 0 everywhere.
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(2, use_bias=False)], name="fragile")
    model.layers[0].set_weights([np.array([[1000.0, 1000.0], [-0.01, 0.01]], "float32")])
    x = np.stack([np.zeros(100), np.linspace(-1, 1, 100)], axis=1).astype("float32")
    y = (x[:, 1] > 0).astype(int)
    with pytest.raises(ValueError, match=r"drops model 'fragile''s accuracy from 1\.0000 to 0\.5000 "
                                         r"\(0\.5000 > max_accuracy_drop=0\.005\) on 100 rows"):
        ek.quantize(model, "int8", x, y, verbose=0)


def test_packed_model_quantizes_its_grouped_dense_in_int8_and_int4_not_float8(toy_data):
    # More in tests/pack/test_pack_quantize.py.
    x, y = toy_data
    packed = ek.pack([make_mlp(seed) for seed in range(2)])
    for mode in ("int8", "int4"):
        _, report = ek.quantize(packed, mode, x, y, max_accuracy_drop=1.0, verbose=0)
        assert report.quantized == ["hidden", "out"] and report.max_abs_diff < 0.05
    with pytest.raises(ValueError, match=r"'packed_mean' has no layer that quantizes to float8.*"
                                         r"\(GroupedDense\).*ek\.unpack\(packed\)"):
        ek.quantize(packed, "float8", x, y, verbose=0)


def test_model_with_nothing_to_quantize_is_refused_naming_its_layers(toy_data):
    x, y = toy_data
    model = keras.Sequential([keras.Input((8,)), keras.layers.Reshape((8, 1)),
                              keras.layers.Conv1D(3, 8, name="conv"), keras.layers.Flatten()], name="convs")
    with pytest.raises(ValueError, match=r"'convs' has no layer that quantizes to int8 .*"
                                         r"'conv' \(Conv1D\)\.$"):
        ek.quantize(model, "int8", x, y, verbose=0)


def test_bad_arguments_raise_one_clear_error(toy_data):
    x, y = toy_data
    model = make_mlp(0, name="mlp")
    with pytest.raises(TypeError, match="expects a keras.Model, got list"):
        ek.quantize([model], "int8", x, y)
    with pytest.raises(ValueError, match="mode"):
        ek.quantize(model, "int2", x, y)
    with pytest.raises(ValueError, match=r"quantize: x does not fit model 'mlp': a batch of shapes \(200, 5\), "
                                         r"the model takes \[\(\(None, 8\)"):
        ek.quantize(model, "int8", x[:, :5], y)
    with pytest.raises(ValueError, match="quantize: y has 199 rows but x has 200"):
        ek.quantize(model, "int8", x, y[:-1])
    with pytest.raises(ValueError, match="task='regression' is not supported"):
        ek.quantize(model, "int8", x, y, task="regression")
    with pytest.raises(ValueError, match="quantize: x yields no labels"):
        ek.quantize(model, "int8", x)
    with pytest.raises(ValueError, match="quantize needs x"):
        ek.quantize(model, "int8")


def test_int8_with_float16_compute_is_refused_naming_the_model(toy_data):
    x, y = toy_data
    keras.config.set_dtype_policy("mixed_float16")
    try:
        model = make_mlp(0, name="half")
    finally:
        keras.config.set_dtype_policy("float32")
    with pytest.raises(ValueError, match=r"model 'half' cannot be quantized to int8: .*float16"):
        ek.quantize(model, "int8", x, y, verbose=0)


@pytest.mark.slow
@pytest.mark.skipif(not TF, reason="SavedModel export runs on the TensorFlow backend")
def test_export_keeps_int8_as_saved_model_and_onnx_but_float8_has_no_onnx(trained, tmp_path):
    members, x, y = trained
    model = ek.ensemble(members)
    int8, _ = ek.quantize(model, "int8", x, y, verbose=0)
    assert ek.export(int8, tmp_path / "int8" / "1", probe=x[:8]).is_dir()
    if importlib.util.find_spec("tf2onnx") is None or importlib.util.find_spec("onnxruntime") is None:
        pytest.skip("ONNX export needs ensemblekit[onnx]")
    assert ek.export(int8, tmp_path / "int8.onnx", format="onnx", probe=x[:8]).is_file()
    float8, _ = ek.quantize(model, "float8", x, y, max_accuracy_drop=0.05, verbose=0)
    with pytest.raises(Exception, match="float8"):
        ek.export(float8, tmp_path / "float8.onnx", format="onnx", probe=x[:8])
    assert not (tmp_path / "float8.onnx").exists()
