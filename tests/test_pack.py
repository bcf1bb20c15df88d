"""ek.pack / ek.unpack / compile_for_inference: exactness, round trip, save/load, errors."""

import keras
import numpy as np
import pytest

from ensemblekit.compose import ensemble
from ensemblekit.pack import compile_for_inference, pack, unpack
from tests.conftest import make_mlp, save_all

L = keras.layers
K = 3


def make_cnn1d(seed):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([
        keras.Input((40, 1)),
        L.Conv1D(6, 5, activation="relu"),
        L.MaxPooling1D(2),
        L.Conv1D(6, 3, strides=2, padding="same", activation="relu"),
        L.Dropout(0.2),
        L.Flatten(),
        L.Dense(10),
    ])


def make_cnn2d(seed):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([
        keras.Input((12, 12, 3)),
        L.Conv2D(4, 3, activation="relu"),
        L.AveragePooling2D(2),
        L.Conv2D(6, 3, padding="same", dilation_rate=1),
        L.ZeroPadding2D(1),
        L.GlobalAveragePooling2D(),
        L.Dense(5, activation="softmax"),
    ])


def make_resnet(seed):
    """Residual Conv1D net with BatchNorm, Add, Concatenate and LayerNorm."""
    keras.utils.set_random_seed(seed)
    x = keras.Input((40, 1))
    h = L.ReLU()(L.BatchNormalization()(L.Conv1D(8, 3, padding="same")(x)))
    r = L.BatchNormalization()(L.Conv1D(8, 3, padding="same")(h))
    h = L.Activation("relu")(L.Add()([h, r]))
    h = L.Concatenate()([h, x])
    h = L.LayerNormalization()(L.GlobalMaxPooling1D()(h))
    return keras.Model(x, L.Dense(10)(h))


def randomize_norms(models, seed=0):
    """Give BatchNorm/LayerNorm parameters non-trivial values so packing them is tested."""
    rng = np.random.default_rng(seed)
    for model in models:
        for variable in model.weights:
            if any(key in variable.path for key in ("gamma", "beta", "moving")):
                variable.assign(rng.uniform(0.5, 1.5, size=variable.shape).astype("float32"))
    return models


BUILDERS = {
    "mlp": (lambda seed: make_mlp(seed, input_shape=(40, 1), classes=10), (40, 1)),
    "mlp_softmax": (lambda seed: make_mlp(seed, input_shape=(8,), softmax=True), (8,)),
    "cnn1d": (make_cnn1d, (40, 1)),
    "cnn2d": (make_cnn2d, (12, 12, 3)),
    "resnet": (make_resnet, (40, 1)),
}


@pytest.fixture(scope="module", params=list(BUILDERS))
def case(request):
    build, shape = BUILDERS[request.param]
    models = randomize_norms([build(seed) for seed in range(K)])
    x = np.random.default_rng(1).normal(size=(9, *shape)).astype("float32")
    return request.param, models, x


@pytest.mark.parametrize("reduce", ["mean", "logit_mean"])
def test_pack_equals_ensemble(case, reduce):
    _, models, x = case
    expected = ensemble(models, reduce).predict(x, verbose=0)
    packed = pack(models, reduce)
    np.testing.assert_allclose(packed.predict(x, verbose=0), expected, atol=1e-5, rtol=0)


def test_packed_model_declares_probabilities_and_counts_its_members_macs(case):
    from ensemblekit.compose import detect_output_kind
    from ensemblekit.metrics import evaluate
    from ensemblekit.prune.report import macs

    _, models, x = case
    packed = pack(models, "mean")
    assert detect_output_kind(packed) == "probs"
    assert detect_output_kind(pack(models, "none")) == detect_output_kind(models[0])
    assert macs(packed) == sum(macs(m) for m in models) > 0
    y = np.arange(len(x)) % models[0].predict(x, verbose=0).shape[-1]
    packed_scores, ensemble_scores = evaluate(packed, x, y), evaluate(ensemble(models, "mean"), x, y)
    assert abs(packed_scores["nll"] - ensemble_scores["nll"]) < 1e-5


def test_pack_none_gives_member_outputs(case):
    _, models, x = case
    expected = np.stack([m.predict(x, verbose=0) for m in models], axis=1)
    outputs = pack(models, "none").predict(x, verbose=0)
    assert outputs.shape == (len(x), K, expected.shape[-1])
    np.testing.assert_allclose(outputs, expected, atol=1e-5, rtol=0)


def test_loop_lowering_equals_grouped(case):
    _, models, x = case
    grouped = pack(models, "none", lowering="grouped").predict(x, verbose=0)
    looped = pack(models, "none", lowering="loop").predict(x, verbose=0)
    np.testing.assert_allclose(looped, grouped, atol=1e-5, rtol=0)


def test_unpack_round_trip_is_exact(case):
    _, models, x = case
    members = unpack(pack(models, "mean"))
    assert [m.name for m in members] == [m.name for m in models]
    for original, back in zip(models, members, strict=True):
        weights, weights_back = original.get_weights(), back.get_weights()
        assert len(weights) == len(weights_back)
        for a, b in zip(weights, weights_back, strict=True):
            np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(back.predict(x, verbose=0), original.predict(x, verbose=0))


def test_save_load_safe_mode(case, tmp_path):
    _, models, x = case
    packed = pack(models, "logit_mean")
    path = tmp_path / "packed.keras"
    packed.save(path)
    loaded = keras.saving.load_model(path)  # safe_mode=True, no custom_objects
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), packed.predict(x, verbose=0))
    for original, back in zip(models, unpack(loaded), strict=True):
        for a, b in zip(original.get_weights(), back.get_weights(), strict=True):
            np.testing.assert_array_equal(a, b)


def test_pack_accepts_paths(tmp_path):
    models = [make_mlp(seed) for seed in range(2)]
    paths = save_all(models, tmp_path)
    x = np.random.default_rng(0).normal(size=(4, 8)).astype("float32")
    np.testing.assert_allclose(pack(paths).predict(x, verbose=0),
                               ensemble(models).predict(x, verbose=0), atol=1e-5, rtol=0)


def test_pack_rejects_different_architectures():
    models = [make_mlp(0), make_mlp(1, hidden=12)]
    with pytest.raises(ValueError, match=r"member 1 .*hidden/kernel.*\(8, 12\)"):
        pack(models)


def test_pack_rejects_different_activation():
    models = [make_mlp(0), make_mlp(1, softmax=True)]
    with pytest.raises(ValueError, match=r"member 1 .*layer 'out' \(Dense\).*activation"):
        pack(models)


def test_pack_rejects_unsupported_layer_naming_it():
    def build(seed):
        keras.utils.set_random_seed(seed)
        return keras.Sequential([keras.Input((6, 4)), L.LSTM(5, name="rnn"), L.Dense(3)], name=f"rnn{seed}")

    with pytest.raises(ValueError, match=r"member 0 \('rnn0'\), layer 'rnn' \(LSTM\) is not supported"):
        pack([build(0), build(1)])


def test_pack_rejects_nested_model():
    def build(seed):
        inner = make_mlp(seed, name=f"inner{seed}")
        x = keras.Input((8,))
        return keras.Model(x, inner(x))

    with pytest.raises(ValueError, match=r"layer 'inner0' is a nested model"):
        pack([build(0), build(1)])


def test_pack_bad_arguments():
    models = [make_mlp(0), make_mlp(1)]
    with pytest.raises(ValueError, match="Unknown reduce 'median'"):
        pack(models, reduce="median")
    with pytest.raises(ValueError, match="Unknown lowering 'fast'"):
        pack(models, lowering="fast")
    with pytest.raises(ValueError, match="at least 2 members"):
        pack(models[:1])
    with pytest.raises(ValueError, match="not made by ek.pack"):
        unpack(models[0])
    with pytest.raises(TypeError, match="keras.Model"):
        unpack("model.keras")


@pytest.mark.parametrize("jit_compile", [True, False])
def test_compile_for_inference_matches_predict(jit_compile):
    models = [make_mlp(seed) for seed in range(K)]
    x = np.random.default_rng(0).normal(size=(5, 8)).astype("float32")
    for model in (ensemble(models, "mean"), pack(models, "mean")):
        fn = compile_for_inference(model, jit_compile=jit_compile)
        np.testing.assert_allclose(fn(x), model.predict(x, verbose=0), atol=1e-5, rtol=0)
        np.testing.assert_allclose(fn.predict(x, batch_size=2), model.predict(x, verbose=0),
                                   atol=1e-5, rtol=0)


def test_compile_for_inference_traces_each_input_shape_and_dtype_once():
    models = [make_mlp(seed) for seed in range(K)]
    packed = pack(models, "mean")
    fn = compile_for_inference(packed, jit_compile=False, autotune=False)
    rng = np.random.default_rng(1)
    inputs = [rng.normal(size=(n, 8)).astype("float32") for n in (3, 7, 3)]
    inputs.append(inputs[0].astype("float64"))
    traces = []
    original_call = packed.call
    packed.call = lambda *args, **kwargs: traces.append(1) or original_call(*args, **kwargs)
    for x in inputs:
        np.testing.assert_allclose(fn(x), ensemble(models, "mean").predict(x, verbose=0),
                                   atol=1e-5, rtol=0)
        np.testing.assert_allclose(fn(keras.ops.convert_to_tensor(x)), fn(x), atol=0, rtol=0)
    # (3, 8) float32, (7, 8) float32, (3, 8) float64 -- JAX without x64 makes the
    # float64 input float32, so it reuses the first trace there.
    float64_kept = keras.backend.standardize_dtype(keras.ops.convert_to_tensor(inputs[-1]).dtype) == "float64"
    assert len(traces) == (3 if float64_kept else 2)


@pytest.mark.parametrize("jit_compile", [False, True])
def test_autotune_times_both_lowerings_per_shape_and_keeps_the_outputs(jit_compile):
    models = [make_mlp(seed) for seed in range(K)]
    packed = pack(models, "mean")
    fn = compile_for_inference(packed, jit_compile=jit_compile)
    rng = np.random.default_rng(2)
    for rows in (3, 200):
        x = rng.normal(size=(rows, 8)).astype("float32")
        np.testing.assert_allclose(fn(x), ensemble(models, "mean").predict(x, verbose=0), atol=1e-5, rtol=0)
    assert set(fn.lowerings_) == {(3, 8), (200, 8)}
    assert set(fn.lowerings_.values()) <= {"grouped", "loop"}
    # Plain models and fixed lowerings have nothing to tune.
    assert compile_for_inference(ensemble(models, "mean")).lowerings_ == {}
    fixed = compile_for_inference(pack(models, "mean", lowering="loop"))
    fixed(x)
    assert fixed.lowerings_ == {}


def test_inference_predict_pads_the_last_batch_to_one_compiled_shape():
    models = [make_mlp(seed) for seed in range(K)]
    model = ensemble(models, "mean")
    fn = compile_for_inference(model, jit_compile=False)
    x = np.random.default_rng(3).normal(size=(7, 8)).astype("float32")
    expected = model.predict(x, verbose=0)
    traced_rows = []
    original_call = model.call
    model.call = lambda x, *args, **kwargs: traced_rows.append(x.shape[0]) or original_call(x, *args, **kwargs)
    np.testing.assert_allclose(fn.predict(x, batch_size=3), expected, atol=1e-5, rtol=0)
    assert traced_rows == [3]


def test_compile_for_inference_rejects_non_models():
    with pytest.raises(TypeError, match="expects a keras.Model"):
        compile_for_inference(lambda x: x)


def test_auto_lowering_switches_dense_to_loop_for_many_rows():
    from ensemblekit.pack import GroupedDense

    models = [make_mlp(seed) for seed in range(K)]
    packed = pack(models, "mean")
    dense = [layer for layer in packed.layers if isinstance(layer, GroupedDense)]
    assert [layer.lowering for layer in dense] == ["auto", "auto"]
    member_axis = dense[1]
    assert not member_axis._use_loop(keras.KerasTensor((None, K, 16)))  # unknown batch: einsum
    assert not member_axis._use_loop(np.zeros((GroupedDense.LOOP_ROWS - 1, K, 16)))
    assert member_axis._use_loop(np.zeros((GroupedDense.LOOP_ROWS, K, 16)))
    x = np.random.default_rng(0).normal(size=(GroupedDense.LOOP_ROWS + 2, 8)).astype("float32")
    expected = ensemble(models, "mean").predict(x, verbose=0)
    np.testing.assert_allclose(compile_for_inference(packed)(x), expected, atol=1e-5, rtol=0)
