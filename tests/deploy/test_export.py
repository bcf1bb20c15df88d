"""ek.deploy.export: verified, atomic SavedModel and ONNX export."""

import sys

import numpy as np
import pytest

import ensemblekit as ek
from ensemblekit.deploy import export
from tests.conftest import make_mlp

export_module = sys.modules["ensemblekit.deploy.export"]


@pytest.fixture(scope="module")
def ensemble_model():
    return ek.ensemble([make_mlp(seed, softmax=seed % 2 == 0) for seed in range(3)], method="mean")


def _saved_model_predict(path, x):
    import tensorflow as tf

    signature = tf.saved_model.load(str(path)).signatures["serving_default"]
    return next(iter(signature(tf.constant(x)).values())).numpy()


def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_saved_model_round_trip_matches_keras(ensemble_model, tmp_path):
    x = np.random.default_rng(1).normal(size=(5, 8)).astype("float32")
    path = export(ensemble_model, tmp_path / "ensemble" / "1")
    assert (path / "saved_model.pb").is_file()
    np.testing.assert_allclose(
        _saved_model_predict(path, x), ensemble_model.predict(x, verbose=0), atol=1e-6
    )
    assert _leftovers(path.parent) == []


def test_onnx_round_trip_matches_keras(ensemble_model, tmp_path):
    onnxruntime = pytest.importorskip("onnxruntime", reason='needs pip install "ensemblekit[onnx]"')
    pytest.importorskip("tf2onnx", reason='needs pip install "ensemblekit[onnx]"')
    x = np.random.default_rng(2).normal(size=(6, 8)).astype("float32")
    path = export(ensemble_model, tmp_path / "ensemble.onnx", format="onnx", probe=x)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x})[0]
    np.testing.assert_allclose(got, ensemble_model.predict(x, verbose=0), atol=1e-6)
    assert _leftovers(tmp_path) == []


def test_export_from_keras_file_and_overwrite_replaces_old_folder(ensemble_model, tmp_path):
    from ensemblekit._io import atomic_save

    other = ek.ensemble([make_mlp(seed) for seed in (7, 8)])
    atomic_save(other, tmp_path / "other.keras")
    target = tmp_path / "served"
    export(ensemble_model, target)
    export(tmp_path / "other.keras", target)
    x = np.random.default_rng(3).normal(size=(4, 8)).astype("float32")
    np.testing.assert_allclose(_saved_model_predict(target, x), other.predict(x, verbose=0), atol=1e-6)
    assert _leftovers(tmp_path) == []


def test_mismatching_artifact_raises_and_leaves_path_untouched(ensemble_model, tmp_path, monkeypatch):
    def broken_reload(path, probe):
        return _saved_model_predict(path, probe) + 1e-3

    monkeypatch.setitem(export_module._RELOADERS, "tf_saved_model", broken_reload)
    with pytest.raises(ValueError, match=r"tf_saved_model export of model .* max abs difference 0\.001 > atol 1e-05"):
        export(ensemble_model, tmp_path / "bad")
    assert list(tmp_path.iterdir()) == []


def test_atol_is_the_threshold(ensemble_model, tmp_path, monkeypatch):
    def shifted_reload(path, probe):
        return _saved_model_predict(path, probe) + 1e-4

    monkeypatch.setitem(export_module._RELOADERS, "tf_saved_model", shifted_reload)
    assert export(ensemble_model, tmp_path / "loose", atol=1e-3).is_dir()


def test_missing_onnx_runtime_names_the_extra(ensemble_model, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(ImportError, match=r'onnxruntime.*pip install "ensemblekit\[onnx\]"'):
        export(ensemble_model, tmp_path / "m.onnx", format="onnx")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"format": "tflite"}, ValueError, "Unknown format 'tflite'; expected one of 'tf_saved_model', 'onnx'"),
        ({"probe": np.zeros((2, 5))}, ValueError, r"probe has shape \(2, 5\) but model .* \(None, 8\)"),
        ({"atol": -1}, ValueError, "atol is -1"),
    ],
)
def test_bad_arguments(ensemble_model, tmp_path, kwargs, error, match):
    with pytest.raises(error, match=match):
        export(ensemble_model, tmp_path / "x", **kwargs)
    assert list(tmp_path.iterdir()) == []


def test_not_a_model_is_a_type_error(tmp_path):
    with pytest.raises(TypeError, match="model must be a keras.Model or a path"):
        export([1, 2], tmp_path / "x")


def _merged():
    from ensemblekit.merge import merge

    return merge([make_mlp(seed) for seed in (0, 1)], method="linear")


def _packed():
    from ensemblekit.pack import pack

    return pack([make_mlp(seed) for seed in range(3)], reduce="mean")


def _pruned():
    from ensemblekit.prune import magnitude, strip

    return strip(magnitude(ek.ensemble([make_mlp(seed) for seed in range(2)]), sparsity=0.5))


def _channel_pruned():
    from ensemblekit.prune import channels

    return channels(ek.ensemble([make_mlp(seed) for seed in range(2)]), ratio=0.5)


COMPOSED = {"merged": _merged, "packed": _packed, "pruned": _pruned, "channel_pruned": _channel_pruned}


@pytest.mark.parametrize("format", ["tf_saved_model", "onnx"])
@pytest.mark.parametrize("kind", list(COMPOSED))
def test_composed_models_round_trip(kind, format, tmp_path):
    if format == "onnx":
        pytest.importorskip("onnxruntime", reason='needs pip install "ensemblekit[onnx]"')
        pytest.importorskip("tf2onnx", reason='needs pip install "ensemblekit[onnx]"')
    model = COMPOSED[kind]()
    x = np.random.default_rng(4).normal(size=(7, 8)).astype("float32")
    path = export(model, tmp_path / ("model.onnx" if format == "onnx" else "model"), format=format, probe=x)
    if format == "tf_saved_model":
        got = _saved_model_predict(path, x)
    else:
        import onnxruntime

        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        got = session.run(None, {session.get_inputs()[0].name: x})[0]
    np.testing.assert_allclose(got, model.predict(x, verbose=0), atol=1e-5)
