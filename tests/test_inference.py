"""compile_for_inference: one compiled call per shape, padding, and the lowering policy."""

import keras
import numpy as np
import pytest

from ensemblekit import inference
from ensemblekit.compose import ensemble
from ensemblekit.inference import (
    POLICY,
    LoweringPolicy,
    compile_for_inference,
    forced_lowering,
    unpacked_ensemble,
)
from ensemblekit.pack import GroupedDense, pack, unpack
from tests.conftest import make_mlp

K = 3


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
    assert set(fn.lowerings_.values()) <= {"grouped", "loop", "ensemble"}
    # Plain models have nothing to tune; a packed model with fixed lowerings still
    # has two ways: itself ("packed") and its members as separate graphs.
    plain = compile_for_inference(ensemble(models, "mean"))
    plain(x)
    assert plain.lowerings_ == {}
    fixed = compile_for_inference(pack(models, "mean", lowering="loop"))
    np.testing.assert_allclose(fixed(x), ensemble(models, "mean").predict(x, verbose=0), atol=1e-5, rtol=0)
    assert set(fixed.lowerings_.values()) <= {"packed", "ensemble"} and len(fixed.lowerings_) == 1


def test_jit_compile_auto_records_a_choice_per_shape_and_keeps_the_outputs():
    models = [make_mlp(seed) for seed in range(K)]
    rng = np.random.default_rng(6)
    inputs = [rng.normal(size=(rows, 8)).astype("float32") for rows in (3, 200)]
    tensorflow = keras.backend.backend() == "tensorflow"
    for model in (ensemble(models, "mean"), pack(models, "mean")):
        f = compile_for_inference(model, jit_compile="auto")
        for x in inputs:
            np.testing.assert_allclose(f(x), model.predict(x, verbose=0), atol=1e-5, rtol=0)
        assert f.jit_compile == "auto" and set(f.jit_compile_) == {(3, 8), (200, 8)}
        # TF keeps XLA or the plain graph, whichever was faster; JAX always jits.
        assert set(f.jit_compile_.values()) <= ({True, False} if tensorflow else {True})
    assert set(f.lowerings_) == {(3, 8), (200, 8)}
    assert set(f.lowerings_.values()) <= {"grouped", "loop", "ensemble"}
    fixed = compile_for_inference(models[0], jit_compile=False)
    fixed(inputs[0])
    assert fixed.jit_compile_ == {(3, 8): not tensorflow}  # False asked on TF; JAX jits


@pytest.mark.parametrize("xla_wins", [False, True])
def test_jit_compile_auto_tries_xla_on_the_second_call_and_more_xla_ways_only_when_xla_wins(monkeypatch, xla_wins):
    models = [make_mlp(seed) for seed in range(K)]
    timed, compiled = [], []

    def fastest(calls, x):
        timed.append(sorted(calls, key=str))
        if all(isinstance(key, str) for key in calls):  # one setting: the ways by name
            return "ensemble" if xla_wins else "loop"
        if len(timed) == 2:  # the plain winner against XLA "grouped"
            return ("grouped", True) if xla_wins else ("loop", False)
        return ("ensemble", True)

    monkeypatch.setattr(inference, "_fastest", fastest)
    original = inference._tf_compiler if keras.backend.backend() == "tensorflow" else inference._jax_compiler

    def recording_compiler():
        compile_for_shape = original()
        return lambda way, lowering, x, jit: compiled.append((lowering, jit)) or compile_for_shape(
            way, lowering, x, jit)

    monkeypatch.setattr(inference, "_tf_compiler", recording_compiler)
    monkeypatch.setattr(inference, "_jax_compiler", recording_compiler)
    packed = pack(models, "mean")
    f = compile_for_inference(packed)  # jit_compile="auto" by default
    x = np.random.default_rng(7).normal(size=(4, 8)).astype("float32")
    np.testing.assert_allclose(f(x), packed.predict(x, verbose=0), atol=1e-5, rtol=0)
    if keras.backend.backend() != "tensorflow":
        assert timed == [["ensemble", "grouped", "loop"]] and f.jit_compile_ == {(4, 8): True}
        assert f.lowerings_ == {(4, 8): "ensemble" if xla_wins else "loop"}
        return
    # The first call: every way as a plain graph, no XLA; the fake timing picks a plain winner.
    winner = "ensemble" if xla_wins else "loop"
    plain = [("grouped", False), ("loop", False), (None, False)]
    assert compiled == plain and timed == [["ensemble", "grouped", "loop"]]
    assert f.jit_compile_ == {(4, 8): False} and len(f.compile_seconds_[(4, 8)]) == 1
    timed[0] = "first call"
    # The second call: XLA "grouped" against that plain winner ...
    np.testing.assert_allclose(f(x), packed.predict(x, verbose=0), atol=1e-5, rtol=0)
    assert timed[1] == sorted([("grouped", True), (winner, False)], key=str)
    if xla_wins:  # ... and the other ways with XLA only once XLA won.
        assert compiled == plain + [("grouped", True), ("loop", True), (None, True)]
        assert timed[2:] == [[("ensemble", True), ("grouped", True), ("loop", True)]]
        assert f.lowerings_ == {(4, 8): "ensemble"} and f.jit_compile_ == {(4, 8): True}
    else:
        assert compiled == plain + [("grouped", True)] and len(timed) == 2
        assert f.lowerings_ == {(4, 8): "loop"} and f.jit_compile_ == {(4, 8): False}
    assert len(f.compile_seconds_[(4, 8)]) == 2
    f(x)  # later calls compile nothing
    assert len(f.compile_seconds_[(4, 8)]) == 2


def test_jit_compile_is_validated():
    with pytest.raises(ValueError, match="jit_compile must be True, False or 'auto'; got 'xla'"):
        compile_for_inference(make_mlp(0), jit_compile="xla")


@pytest.mark.parametrize("settings", [
    dict(reduce="mean"),
    dict(reduce="logit_mean", uncertainty=True),
    dict(reduce="median", task="regression"),
])
def test_unpacked_ensemble_is_ek_ensemble_of_the_unpacked_members(settings):
    models = [make_mlp(seed) for seed in range(K)]
    packed = pack(models, **settings)
    candidate = unpacked_ensemble(packed)
    method = settings["reduce"]
    reference = ensemble(unpack(packed), method, task=settings.get("task"),
                         uncertainty=settings.get("uncertainty", False))
    x = np.random.default_rng(4).normal(size=(6, 8)).astype("float32")
    got, want, packed_out = (m.predict(x, verbose=0) for m in (candidate, reference, packed))
    for expected in (want, packed_out):
        keras.tree.map_structure(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=0),
                                 got, expected)
    # Its own weights: the packed model's are not shared (nor changed).
    assert not {id(v) for v in candidate.weights} & {id(v) for v in packed.weights}


def test_unpacked_ensemble_rejects_models_not_made_by_pack():
    with pytest.raises(ValueError, match=r"model 'plain' is not a packed model \(ek.pack\)"):
        unpacked_ensemble(make_mlp(0, name="plain"))


@pytest.mark.parametrize("dtype", [None, "bfloat16"])
def test_autotune_times_the_unpacked_ensemble_and_records_the_choice(monkeypatch, dtype):
    models = [make_mlp(seed) for seed in range(K)]
    packed = pack(models, "mean")
    x = np.random.default_rng(5).normal(size=(4, 8)).astype("float32")
    expected = packed.predict(x, verbose=0)
    timed, built = [], []
    build = inference.unpacked_ensemble
    monkeypatch.setattr(inference, "unpacked_ensemble",
                        lambda *args: built.append(build(*args)) or built[-1])
    monkeypatch.setattr(inference, "_fastest", lambda calls, x: timed.append(sorted(calls)) or "ensemble")
    f = compile_for_inference(packed, dtype=dtype)
    assert built == [] and f.lowerings_ == {}  # nothing built before the first call
    tolerance = 1e-5 if dtype is None else 5e-2
    np.testing.assert_allclose(f(x), expected, atol=tolerance, rtol=0)
    np.testing.assert_allclose(f(x[:2]), expected[:2], atol=tolerance, rtol=0)
    assert timed == [["ensemble", "grouped", "loop"]] * 2
    assert f.lowerings_ == {(4, 8): "ensemble", (2, 8): "ensemble"}
    assert len(built) == 1  # kept once chosen, so the second shape reuses it
    compute = {layer.compute_dtype for m in built[0].layers if isinstance(m, keras.Model) for layer in m.layers}
    assert compute == {"float32" if dtype is None else "bfloat16"}


def test_an_unpacked_ensemble_no_shape_chose_is_not_kept(monkeypatch):
    models = [make_mlp(seed) for seed in range(K)]
    built = []
    build = inference.unpacked_ensemble
    monkeypatch.setattr(inference, "unpacked_ensemble",
                        lambda *args: built.append(build(*args)) or built[-1])
    monkeypatch.setattr(inference, "_fastest", lambda calls, x: "grouped")
    f = compile_for_inference(pack(models, "mean"))
    for rows in (2, 3):
        f(np.zeros((rows, 8), "float32"))
    assert f.lowerings_ == {(2, 8): "grouped", (3, 8): "grouped"} and len(built) == 2
    assert compile_for_inference(pack(models, "mean"), autotune=False)(np.zeros((2, 8), "float32")).shape == (2, 3)
    assert len(built) == 2  # autotune=False builds nothing extra


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
    models = [make_mlp(seed) for seed in range(K)]
    packed = pack(models, "mean")
    dense = [layer for layer in packed.layers if isinstance(layer, GroupedDense)]
    assert [layer.lowering for layer in dense] == ["auto", "auto"]
    member_axis = dense[1]
    assert not member_axis._use_loop(keras.KerasTensor((None, K, 16)))  # unknown batch: einsum
    assert not member_axis._use_loop(np.zeros((POLICY.loop_rows - 1, K, 16)))
    assert member_axis._use_loop(np.zeros((POLICY.loop_rows, K, 16)))
    x = np.random.default_rng(0).normal(size=(POLICY.loop_rows + 2, 8)).astype("float32")
    expected = ensemble(models, "mean").predict(x, verbose=0)
    np.testing.assert_allclose(compile_for_inference(packed)(x), expected, atol=1e-5, rtol=0)


def test_lowering_policy_is_the_one_place_that_decides():
    policy = LoweringPolicy(loop_rows=64, conv_lowering="grouped")
    assert policy.for_layer("dense") == "auto" and policy.for_layer("conv") == "grouped"
    assert policy.for_layer("conv", "loop") == "loop"
    assert [policy.choose(rows) for rows in (None, 63, 64)] == ["grouped", "grouped", "loop"]
    assert policy.choose(1000, forced="grouped") == "grouped"


def test_forced_lowering_applies_while_tracing_and_is_undone():
    models = [make_mlp(seed) for seed in range(K)]
    packed = pack(models, "mean")
    member_axis = [layer for layer in packed.layers if isinstance(layer, GroupedDense)][1]
    many_rows = np.zeros((POLICY.loop_rows, K, 16))
    with forced_lowering(packed, "grouped"):
        assert not member_axis._use_loop(many_rows)
    assert member_axis._use_loop(many_rows)


def test_compile_for_inference_dtype_is_validated_and_outputs_float32():
    model = make_mlp(0)
    with pytest.raises(ValueError, match=r"dtype must be None or one of 'float32', 'bfloat16', "
                                         r"'float16'; got 'int8'"):
        compile_for_inference(model, dtype="int8")
    x = np.random.default_rng(0).normal(size=(4, 8)).astype("float32")
    f = compile_for_inference(model, dtype="bfloat16")
    assert f(x).dtype == np.float32 and f.model.layers[-1].compute_dtype == "bfloat16"
    np.testing.assert_allclose(f(x), model.predict(x, verbose=0), atol=5e-2, rtol=0)


def test_copy_model_drops_training_state_and_keeps_derived_state():
    from ensemblekit.inference import copy_model

    keras.utils.set_random_seed(0)
    normalization = keras.layers.Normalization()
    normalization.adapt(np.arange(12, dtype="float32").reshape(6, 2))
    model = keras.Sequential([keras.Input((2,)), normalization, keras.layers.Dense(3)])
    model.compile("adam", "mse")
    copy = copy_model(model)
    x = np.ones((2, 2), "float32")
    assert not copy.compiled
    np.testing.assert_array_equal(copy.predict(x, verbose=0), model.predict(x, verbose=0))
