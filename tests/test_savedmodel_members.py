"""TensorFlow SavedModel directories as members: run through ``keras.layers.TFSMLayer`` or refused.

The SavedModel member outputs logits (a Dense head without softmax); its output
kind cannot be read through the TFSMLayer, so the tests state it (``output_kind=``).
"""

import re

import keras
import numpy as np
import pytest

import ensemblekit as ek
from ensemblekit._io import load_member, load_model, load_savedmodel
from tests.conftest import make_mlp

if keras.backend.backend() != "tensorflow":
    pytest.skip("SavedModel members need the TensorFlow backend", allow_module_level=True)

TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 8)).astype("float32")
    y = (x[:, 0] > 0).astype("int64") + (x[:, 1] > 0.5).astype("int64")
    return x, y


@pytest.fixture(scope="module")
def logits_keras():
    """The Keras model the SavedModel was exported from (logits)."""
    return make_mlp(0, name="logits_keras")


@pytest.fixture(scope="module")
def probs_member():
    return make_mlp(1, softmax=True, name="probs_member")


@pytest.fixture(scope="module")
def savedmodel(tmp_path_factory, logits_keras):
    """``models/clf/1``: a SavedModel laid out for TF Serving, written by ``model.export``."""
    path = tmp_path_factory.mktemp("savedmodels") / "clf" / "1"
    logits_keras.export(str(path), verbose=False)
    return path


@pytest.fixture(scope="module")
def reference(data, logits_keras, probs_member):
    """NumPy probabilities of both members and their mean."""
    logits = logits_keras.predict(data[0], verbose=0).astype("float64")
    first = np.exp(logits - logits.max(axis=1, keepdims=True))
    first /= first.sum(axis=1, keepdims=True)
    second = probs_member.predict(data[0], verbose=0).astype("float64")
    return first, second, (first + second) / 2


@pytest.fixture(scope="module")
def ensemble_model(savedmodel, probs_member):
    with pytest.warns(UserWarning, match="safe_mode=False"):
        return ek.ensemble([savedmodel, probs_member], output_kind=["logits", None])


def test_savedmodel_loads_with_its_signature_inputs_and_one_output(savedmodel, data, logits_keras):
    model = load_member(savedmodel, 0)
    assert model.name == "clf_1"
    assert [(t.name, tuple(t.shape), t.dtype) for t in model.inputs] == [
        (logits_keras.inputs[0].name, (None, 8), "float32")]
    assert tuple(model.output.shape) == (None, 3)  # one output: the tensor, not {"output_0": ...}
    assert isinstance(model.layers[-1], keras.layers.TFSMLayer)
    np.testing.assert_allclose(model.predict(data[0], verbose=0), logits_keras.predict(data[0], verbose=0),
                               atol=1e-6)


def test_ensemble_equals_numpy_mean_of_probabilities(ensemble_model, data, reference):
    np.testing.assert_allclose(ensemble_model.predict(data[0], verbose=0), reference[2], atol=TOLERANCE)


def test_ensemble_warns_that_its_file_loads_only_with_safe_mode_false(savedmodel, probs_member):
    with pytest.warns(UserWarning, match=r"member 0 \('clf_1'\) is a TensorFlow SavedModel.*safe_mode=False"):
        ek.ensemble([savedmodel, probs_member], output_kind=["logits", None])


def test_saved_ensemble_loads_with_safe_mode_false_and_says_so_otherwise(ensemble_model, savedmodel, data,
                                                                       reference, tmp_path):
    path = tmp_path / "ensemble.keras"
    ensemble_model.save(path)
    with pytest.raises(ValueError, match=r"member 0: .*TFSMLayer.*" + re.escape(repr(str(savedmodel)))
                       + r".*pass safe_mode=False if you trust the file"):
        load_member(path, 0)
    loaded = load_model(path, safe_mode=False)
    np.testing.assert_allclose(loaded.predict(data[0], verbose=0), reference[2], atol=TOLERANCE)


def test_evaluate_matches_numpy_reference(ensemble_model, data, reference):
    x, y = data
    probs = reference[2]
    scores = ek.evaluate(ensemble_model, x, y)
    assert scores["accuracy"] == pytest.approx(np.mean(probs.argmax(axis=1) == y))
    assert scores["nll"] == pytest.approx(-np.mean(np.log(probs[np.arange(len(y)), y])), abs=1e-5)


def test_calibrate_savedmodel_equals_calibrating_its_keras_model(savedmodel, logits_keras, data):
    x, y = data
    from_savedmodel = ek.calibrate(savedmodel, x, y, output_kind="logits", task="multiclass")
    from_keras = ek.calibrate(logits_keras, x, y, output_kind="logits", task="multiclass")
    np.testing.assert_allclose(from_savedmodel.predict(x, verbose=0), from_keras.predict(x, verbose=0),
                               atol=TOLERANCE)


def test_stack_savedmodel_equals_stacking_its_keras_model(savedmodel, logits_keras, probs_member, data):
    x, y = data
    settings = dict(output_kind=["logits", None], cv=2, epochs=10, seed=0, verbose=0)
    from_savedmodel = ek.stack([savedmodel, probs_member], x, y, **settings)
    from_keras = ek.stack([logits_keras, probs_member], x, y, **settings)
    np.testing.assert_allclose(from_savedmodel.predict(x, verbose=0), from_keras.predict(x, verbose=0),
                               atol=TOLERANCE)


def test_export_of_a_savedmodel_path_and_of_an_ensemble_holding_one(savedmodel, ensemble_model, logits_keras,
                                                                   data, reference, tmp_path):
    import tensorflow as tf

    def reloaded(path):
        signature = tf.saved_model.load(str(path)).signatures["serving_default"]
        (name,) = signature.structured_input_signature[1]
        return next(iter(signature(**{name: tf.constant(data[0])}).values())).numpy()

    member = ek.export(savedmodel, tmp_path / "member" / "1")
    np.testing.assert_allclose(reloaded(member), logits_keras.predict(data[0], verbose=0), atol=TOLERANCE)
    ensemble_path = ek.export(ensemble_model, tmp_path / "ensemble" / "1")
    np.testing.assert_allclose(reloaded(ensemble_path), reference[2], atol=TOLERANCE)


def test_serve_a_savedmodel_directory(savedmodel, logits_keras, data):
    httpx = pytest.importorskip("httpx", reason='needs pip install "ensemblekit[serve]"')
    pytest.importorskip("fastapi", reason='needs pip install "ensemblekit[serve]"')
    with ek.deploy.running(savedmodel, max_batch=4) as service:
        assert service.model_url.endswith("/v1/models/clf_1")
        reply = httpx.post(service.model_url + ":predict", json={"instances": data[0][:3].tolist()}, timeout=30)
    assert reply.status_code == 200, reply.text
    np.testing.assert_allclose(reply.json()["predictions"], logits_keras.predict(data[0][:3], verbose=0),
                               atol=TOLERANCE)


@pytest.fixture(scope="module")
def two_inputs(tmp_path_factory):
    """A softmax model with inputs ``{"a", "b"}`` and its SavedModel (a ``TFSMLayer`` subclass runs it)."""
    a, b = keras.Input((2,), name="a"), keras.Input((3,), name="b")
    keras.utils.set_random_seed(2)
    original = keras.Model({"a": a, "b": b},
                           keras.layers.Dense(2, activation="softmax")(keras.layers.Concatenate()([a, b])))
    path = tmp_path_factory.mktemp("savedmodels") / "two_inputs"
    original.export(str(path), verbose=False)
    return original, path


def test_several_named_inputs_are_passed_to_the_signature_by_name(two_inputs):
    original, path = two_inputs
    rng = np.random.default_rng(1)
    x = {"a": rng.normal(size=(5, 2)).astype("float32"), "b": rng.normal(size=(5, 3)).astype("float32")}
    with pytest.warns(UserWarning, match="SavedModel"):
        model = ek.ensemble([path, original], output_kind="probs")
    member = load_member(path, 0)
    assert sorted(t.name for t in member.inputs) == ["a", "b"]
    assert isinstance(member.layers[-1], keras.layers.TFSMLayer)
    np.testing.assert_allclose(model.predict(x, verbose=0), original.predict(x, verbose=0), atol=TOLERANCE)


def test_merge_refuses_a_several_input_savedmodel_member(two_inputs):
    original, path = two_inputs
    with pytest.raises(ValueError, match=r"merge.*member 0 \('two_inputs'\).*SavedModel.*no Keras layers"):
        ek.merge([path, original], method="linear")


@pytest.mark.parametrize("function, call", [
    ("merge", lambda members, x: ek.merge(members, method="linear")),
    ("pack", lambda members, x: ek.pack(members)),
    ("align", lambda members, x: ek.align(members, verbose=0)),
])
def test_weight_space_functions_refuse_a_savedmodel_member(function, call, savedmodel, logits_keras, data):
    with pytest.raises(ValueError, match=rf"{function}.*member 0 \('clf_1'\).*SavedModel.*no Keras layers"):
        call([savedmodel, logits_keras], data[0])


def test_prune_refuses_a_savedmodel_member_and_an_ensemble_holding_one(savedmodel, ensemble_model):
    member = load_member(savedmodel, 0)
    with pytest.raises(ValueError, match=r"^magnitude\(\): model 'clf_1' is a TensorFlow SavedModel.*"
                                         r"no Keras layers to read"):
        ek.prune.magnitude(member, sparsity=0.5)
    with pytest.raises(ValueError, match=r"^channels\(\): model 'ensemble_mean', member 0 \('clf_1'\), is a "
                                         r"TensorFlow SavedModel.*no Keras layers to read"):
        ek.prune.channels(ensemble_model, ratio=0.5)


def test_paths_that_are_not_savedmodels_name_the_member(tmp_path, probs_member, savedmodel):
    with pytest.raises(ValueError, match=r"^member 0: '.*/missing' does not exist; expected a .keras/.h5 file "
                                         "or a TensorFlow SavedModel directory"):
        ek.ensemble([tmp_path / "missing", probs_member])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"^member 1: directory '.*/empty' is not a TensorFlow SavedModel"):
        ek.ensemble([probs_member, tmp_path / "empty"])
    with pytest.raises(ValueError, match=r"^member 2: could not load SavedModel .*signature 'predict'.*"
                                         "serving_default"):
        load_savedmodel(savedmodel, label="member 2", signature="predict")


def test_savedmodel_under_jax_is_one_clear_error(tmp_path):
    pytest.importorskip("jax", reason="the JAX backend is tested where jax is installed (the test extra)")
    from tests.test_backends import BLOCK_TENSORFLOW, run_under_jax

    folder = tmp_path / "exported"
    folder.mkdir()
    (folder / "saved_model.pb").write_bytes(b"")  # a SavedModel by its layout; never parsed under JAX
    script = BLOCK_TENSORFLOW + """
import keras
import ensemblekit as ek
member = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
try:
    ek.ensemble([sys.argv[1], member])
except ValueError as error:
    print(error)
assert "tensorflow" not in sys.modules
"""
    output = run_under_jax(script, str(folder))
    assert output.startswith("member 0: ") and "is a TensorFlow SavedModel" in output
    assert "TensorFlow backend, but the backend is 'jax'" in output
