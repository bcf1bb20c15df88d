"""int8/int4 quantization of packed models: ``GroupedDense`` on Keras' ``Dense`` schemes."""

import importlib.util
import warnings

import keras
import numpy as np
import pytest

import ensemblekit as ek
from ensemblekit.costs import layer_macs
from ensemblekit.pack.layers import GroupedConv, GroupedDense
from tests.conftest import make_mlp, train_mlp

L = keras.layers


def conv_member(seed):
    """Conv1D -> Flatten -> Dense -> Dense: member-axis GroupedDense layers after a GroupedConv."""
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input((40, 1)), L.Conv1D(8, 5, strides=2, activation="relu", name="conv"),
                             L.Flatten(), L.Dense(32, activation="relu", name="hidden"),
                             L.Dense(10, name="out")], name=f"conv_member_{seed}")


def keras_quantize(model, mode, config=None):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "does not have a `quantize` method" per other layer
        model.quantize(mode, config=config)
    return model


@pytest.fixture(scope="module")
def trained(mnist1d):
    """Three MLPs trained briefly on mnist1d (logits out), packed, and the test split."""
    (x, y), (x_test, y_test) = mnist1d
    members = [train_mlp(seed, x, y, epochs=8, input_shape=(40, 1), classes=10, hidden=64,
                         name=f"member_{seed}") for seed in range(3)]
    return ek.pack(members), x_test, y_test


def test_int8_packed_equals_the_quantized_ensemble_and_stays_close_to_float(trained):
    packed, x, y = trained
    weights = [w.copy() for w in packed.get_weights()]
    quantized, report = ek.quantize(packed, "int8", x, y, verbose=0)
    assert report.quantized == ["hidden", "out"] and report.left_float == {}
    assert report.max_abs_diff < 2e-2 and report.agreement >= 0.99  # measured 0.0115, 0.995+
    assert abs(report.accuracy_drop) <= 0.005
    assert abs(report.after["nll"] - report.before["nll"]) < 0.01
    assert report.weight_bytes_after < 0.3 * report.weight_bytes_before
    hidden = quantized.get_layer("hidden")
    assert str(hidden.kernel.dtype) == "int8" and tuple(hidden.kernel_scale.shape) == (3, 64)
    assert hidden.dtype_policy.name == "int8_from_float32"
    # Member k's part is exactly Keras' int8 Dense of member k.
    ensemble = keras_quantize(ek.ensemble(ek.unpack(packed)), "int8")
    np.testing.assert_allclose(quantized.predict(x, verbose=0), ensemble.predict(x, verbose=0), atol=1e-6)
    assert all(np.array_equal(a, b) for a, b in zip(packed.get_weights(), weights, strict=True))
    assert packed.get_layer("hidden").quantization_mode is None


def test_keras_quantize_on_a_conv_pack_quantizes_grouped_dense_in_both_lowerings(mnist1d):
    (_, _), (x, _) = mnist1d
    packed = ek.pack([conv_member(seed) for seed in range(3)], lowering="grouped")
    looped = ek.pack([conv_member(seed) for seed in range(3)], lowering="loop")
    expected = packed.predict(x[:200], verbose=0)
    for model in (packed, looped):
        keras_quantize(model, "int8")
        assert isinstance(model.get_layer("conv"), GroupedConv)
        assert model.get_layer("conv").quantization_mode is None  # Keras quantizes no convolution
        assert {model.get_layer(n).quantization_mode for n in ("hidden", "out")} == {"int8"}
    grouped, loop = packed.predict(x[:200], verbose=0), looped.predict(x[:200], verbose=0)
    np.testing.assert_allclose(grouped, loop, atol=1e-6)
    assert np.abs(grouped - expected).max() < 1e-2
    assert np.mean(grouped.argmax(-1) == expected.argmax(-1)) >= 0.97  # untrained: near ties (0.985)


def test_quantized_pack_loads_in_safe_mode_with_the_same_outputs(trained, tmp_path):
    packed, x, y = trained
    quantized, report = ek.quantize(packed, "int8", x, y, verbose=0)
    ek.inference.copy_model(packed).save(tmp_path / "float.keras")
    quantized.save(tmp_path / "int8.keras")
    loaded = keras.saving.load_model(tmp_path / "int8.keras", safe_mode=True)
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), quantized.predict(x, verbose=0))
    layer = loaded.get_layer("out")
    assert isinstance(layer, GroupedDense) and layer.dtype_policy.name == "int8_from_float32"
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(layer.kernel),
                                  keras.ops.convert_to_numpy(quantized.get_layer("out").kernel))
    # The file shrinks by the kernels' 3 bytes in 4 (the rest is the config: member architectures).
    saved = (tmp_path / "float.keras").stat().st_size - (tmp_path / "int8.keras").stat().st_size
    assert saved > 0.65 * report.weight_bytes_before


def test_unpack_of_a_quantized_pack_gives_members_with_dequantized_kernels(trained):
    packed, x, y = trained
    quantized, _ = ek.quantize(packed, "int8", x, y, verbose=0)
    members = ek.unpack(quantized)
    layer = quantized.get_layer("out")
    kernel = keras.ops.convert_to_numpy(layer.kernel).astype("float32")
    scale = keras.ops.convert_to_numpy(layer.kernel_scale)
    for index, member in enumerate(members):
        np.testing.assert_allclose(member.get_layer("out").get_weights()[0], kernel[index] / scale[index],
                                   rtol=1e-6)
        assert member.get_layer("out").quantization_mode is None
    # Re-quantizing the dequantized members gives the quantized pack back.
    again = keras_quantize(ek.ensemble(members), "int8")
    np.testing.assert_allclose(again.predict(x, verbose=0), quantized.predict(x, verbose=0), atol=1e-6)


@pytest.mark.parametrize("block_size", [128, -1])  # Keras' default int4/128 (one block here), per channel
def test_int4_packed_equals_the_quantized_ensemble_and_loads_in_safe_mode(trained, tmp_path, block_size):
    packed, x, y = trained
    config = keras.quantizers.Int4QuantizationConfig(block_size=block_size)
    quantized = keras_quantize(ek.inference.copy_model(packed), None, config)
    layer = quantized.get_layer("hidden")
    assert layer.dtype_policy.name == f"int4/{block_size}_from_float32"
    assert tuple(layer.kernel.shape) == (40, 3, 32)  # (in, K, units / 2): two int4 per byte
    assert layer_macs(layer) == layer_macs(packed.get_layer("hidden")) == 40 * 3 * 64
    assert hasattr(layer, "kernel_zero") == (block_size > 0)
    ensemble = keras_quantize(ek.ensemble(ek.unpack(packed)), None, config)
    probs = quantized.predict(x, verbose=0)
    np.testing.assert_allclose(probs, ensemble.predict(x, verbose=0), atol=1e-6)
    expected = packed.predict(x, verbose=0)
    # int4 moves probabilities ~10x more than int8 (measured max 0.11-0.12), as for the ensemble.
    assert np.abs(probs - expected).mean() < 0.01 and np.mean(probs.argmax(-1) == expected.argmax(-1)) >= 0.9
    quantized.save(tmp_path / "int4.keras")
    loaded = keras.saving.load_model(tmp_path / "int4.keras", safe_mode=True)
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), probs)
    # int4 is weight-only: the dequantized members compute exactly what the quantized pack does.
    np.testing.assert_allclose(ek.ensemble(ek.unpack(loaded)).predict(x, verbose=0), probs, atol=1e-6)


def test_float8_leaves_grouped_dense_float_and_is_refused_with_a_pointer(toy_data):
    x, y = toy_data
    packed = ek.pack([make_mlp(seed) for seed in range(2)])
    with pytest.raises(ValueError, match=r"'packed_mean' has no layer that quantizes to float8 .*"
                                         r"GroupedDense int8 and int4.*'hidden' \(GroupedDense\).*"
                                         r"ek\.quantize\(ek\.ensemble\(ek\.unpack\(packed\)\)"):
        ek.quantize(packed, "float8", x, y, verbose=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        packed.quantize("float8")
    assert any("GroupedDense quantizes to int8 and int4 only" in str(w.message) for w in caught)
    assert packed.get_layer("hidden").quantization_mode is None


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_pack_still_trains_through_the_quantized_layers(toy_data, mode):
    x, y = toy_data
    packed = keras_quantize(ek.pack([make_mlp(seed) for seed in range(2)], reduce="none"), mode)
    bias = keras.ops.convert_to_numpy(packed.get_layer("hidden").bias).copy()
    packed.compile(keras.optimizers.SGD(0.1), keras.losses.MeanSquaredError())
    packed.fit(x, np.zeros((len(x), 2, 3), "float32"), epochs=1, batch_size=50, verbose=0)
    # "hidden"'s bias only moves if the gradient flows back through "out"'s quantized matmul.
    moved = np.abs(keras.ops.convert_to_numpy(packed.get_layer("hidden").bias) - bias).max()
    assert moved > 1e-4
    assert str(packed.get_layer("out").kernel.dtype) == "int8"


@pytest.mark.slow
@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="export runs on the TensorFlow backend")
def test_int8_and_int4_conv_packs_export_as_saved_model_and_onnx(mnist1d, tmp_path):
    (_, _), (x, _) = mnist1d
    onnx = importlib.util.find_spec("tf2onnx") is not None and importlib.util.find_spec("onnxruntime") is not None
    for mode in ("int8", "int4"):
        packed = keras_quantize(ek.pack([conv_member(seed) for seed in range(2)]), mode)
        assert ek.export(packed, tmp_path / mode / "1", probe=x[:8]).is_dir()
        if onnx:
            assert ek.export(packed, tmp_path / f"{mode}.onnx", format="onnx", probe=x[:8]).is_file()
    if not onnx:
        pytest.skip("ONNX export needs ensemblekit[onnx]")
