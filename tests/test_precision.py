"""Mixed precision end to end: members under a Keras mixed policy through ensemble, pack,
compile_for_inference and .keras files; reductions and outputs in float32."""

import contextlib

import keras
import numpy as np
import pytest

import ensemblekit as ek

L = keras.layers
K = 3


@contextlib.contextmanager
def global_policy(name):
    """Layers built inside use dtype policy ``name``; the previous global policy comes back after."""
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(name)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


def conv_member(seed, policy=None, name=None):
    """Conv1D + BatchNorm + pooling + Dense + LayerNorm on mnist1d, built under ``policy``."""
    keras.utils.set_random_seed(seed)
    with global_policy(policy or "float32"):
        inputs = keras.Input((40, 1))
        h = L.Conv1D(16, 5, padding="same", activation="relu")(inputs)
        h = L.BatchNormalization()(h)
        h = L.MaxPooling1D(2)(h)
        h = L.Flatten()(h)
        h = L.Dense(64, activation="relu")(h)
        h = L.LayerNormalization()(h)
        return keras.Model(inputs, L.Dense(10)(h), name=name)


@pytest.fixture(scope="module")
def float32_members(mnist1d):
    (x, y), _ = mnist1d
    members = []
    for seed in range(K):
        model = conv_member(seed, name=f"member_{seed}")
        model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        model.fit(x, y, epochs=3, batch_size=64, verbose=0)
        members.append(model)
    return members


@pytest.fixture(scope="module")
def inputs(mnist1d):
    return mnist1d[1][0][:500]


def with_policy(members, policy):
    """Members rebuilt under ``policy`` with exactly the float32 members' weights."""
    copies = [conv_member(seed, policy, name=m.name) for seed, m in enumerate(members)]
    for copy, member in zip(copies, members, strict=True):
        copy.set_weights(member.get_weights())
    return copies


def close_to_float32(probs, reference, atol):
    assert probs.dtype == np.float32
    assert np.abs(probs - reference).max() <= atol
    assert np.mean(probs.argmax(-1) == reference.argmax(-1)) >= 0.99


def test_global_policy_is_restored_by_the_helpers(float32_members):
    with_policy(float32_members, "mixed_bfloat16")
    assert keras.config.dtype_policy().name == "float32"


@pytest.mark.parametrize("policy, atol", [("mixed_bfloat16", 1e-2), ("mixed_float16", 2e-3)])
def test_ensemble_keeps_the_members_policy_and_combines_in_float32(float32_members, inputs, policy, atol):
    reference = ek.ensemble(float32_members).predict(inputs, verbose=0)
    model = ek.ensemble(with_policy(float32_members, policy))
    dense = model.get_layer("member_0").layers[-1]
    assert dense.compute_dtype == policy.split("_")[1] and dense.kernel.dtype == "float32"
    assert model.get_layer("combine_mean").compute_dtype == "float32"
    close_to_float32(model.predict(inputs, verbose=0), reference, atol)


def test_ensemble_built_under_a_mixed_global_policy_still_outputs_float32(float32_members, inputs):
    members = with_policy(float32_members, "mixed_bfloat16")
    with global_policy("mixed_bfloat16"):
        model = ek.ensemble(members)
    assert model.get_layer("combine_mean").compute_dtype == "bfloat16"
    output = keras.ops.convert_to_numpy(model(inputs[:8]))
    assert output.dtype == np.float32  # the combiner casts the member outputs to float32
    np.testing.assert_allclose(output.sum(-1), 1.0, atol=1e-6)


def test_pack_under_bfloat16_equals_the_bfloat16_ensemble_and_is_close_to_float32(float32_members, inputs):
    reference = ek.ensemble(float32_members).predict(inputs, verbose=0)
    members = with_policy(float32_members, "mixed_bfloat16")
    with global_policy("mixed_bfloat16"):
        packed = ek.pack(members)
    grouped = [layer for layer in packed.layers if isinstance(layer, ek.pack.GroupedDense)]
    assert grouped and {layer.compute_dtype for layer in grouped} == {"bfloat16"}
    assert {layer.kernel.dtype for layer in grouped} == {"float32"}
    probs = packed.predict(inputs, verbose=0)
    close_to_float32(probs, reference, 1e-2)
    # pack == ensemble up to bfloat16 rounding: their grouped and per-member ops round differently.
    close_to_float32(probs, ek.ensemble(members).predict(inputs, verbose=0), 1e-2)


def test_pack_keeps_a_per_layer_member_policy(float32_members):
    packed = ek.pack(with_policy(float32_members, "mixed_bfloat16"))
    grouped = [layer for layer in packed.layers if isinstance(layer, ek.pack.GroupedDense)]
    assert {layer.compute_dtype for layer in grouped} == {"bfloat16"}
    assert packed.outputs[0].dtype == "float32"


def test_bfloat16_models_load_in_safe_mode_with_the_same_outputs(float32_members, inputs, tmp_path):
    members = with_policy(float32_members, "mixed_bfloat16")
    with global_policy("mixed_bfloat16"):
        packed = ek.pack(members)
    for model in (ek.ensemble(members), packed):
        path = tmp_path / f"{model.name}.keras"
        model.save(path)
        loaded = keras.saving.load_model(path, safe_mode=True)
        np.testing.assert_array_equal(loaded.predict(inputs, verbose=0), model.predict(inputs, verbose=0))
        assert any(layer.compute_dtype == "bfloat16" for _, layer in ek._graph.iter_layers(loaded))


def test_compile_for_inference_dtype_runs_a_copy_in_that_dtype(float32_members, inputs):
    packed = ek.pack(float32_members)
    reference = packed.predict(inputs, verbose=0)
    errors = {}
    for dtype in ("bfloat16", "float16", "float32"):
        f = ek.compile_for_inference(packed, dtype=dtype)
        probs = f.predict(inputs, batch_size=100)
        assert f.model is not packed
        assert {layer.compute_dtype for layer in f.model.layers
                if isinstance(layer, ek.pack.GroupedDense)} == {dtype}
        close_to_float32(probs, reference, 1e-2)
        errors[dtype] = np.abs(probs - reference).max()
    assert errors["float32"] < 1e-5 < errors["float16"] < errors["bfloat16"]
    assert {layer.compute_dtype for layer in packed.layers} == {"float32"}  # the original is unchanged


def test_compile_for_inference_float32_undoes_a_mixed_policy(float32_members, inputs):
    reference = ek.ensemble(float32_members).predict(inputs, verbose=0)
    mixed = ek.ensemble(with_policy(float32_members, "mixed_bfloat16"))
    probs = ek.compile_for_inference(mixed, dtype="float32").predict(inputs, batch_size=100)
    np.testing.assert_allclose(probs, reference, atol=1e-5, rtol=0)


def test_int8_quantize_of_a_bfloat16_ensemble_keeps_the_compute_dtype(float32_members, mnist1d):
    _, (x, y) = mnist1d
    model = ek.ensemble(with_policy(float32_members, "mixed_bfloat16"))
    quantized, report = ek.quantize(model, "int8", x, y, max_accuracy_drop=0.02, verbose=0)
    assert len(report.quantized) == 2 * K
    assert set(report.left_float.values()) == {"Conv1D", "BatchNormalization", "LayerNormalization"}
    assert quantized.get_layer("member_0").layers[-1].dtype_policy.name == "int8_from_mixed_bfloat16"
    assert report.agreement >= 0.97


@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="SavedModel export runs on TensorFlow")
def test_bfloat16_pack_exports_as_saved_model(float32_members, inputs, tmp_path):
    # ONNX does not take these models (tf2onnx has no bfloat16 constants); the SavedModel does.
    with global_policy("mixed_bfloat16"):
        packed = ek.pack(with_policy(float32_members, "mixed_bfloat16"))
    assert ek.export(packed, tmp_path / "packed" / "1", probe=inputs[:8], atol=1e-6).is_dir()
