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


def _text_proto(text):
    """A tiny parser for the text protobufs TensorFlow Serving reads: ``{field: [values]}``.

    Handles ``field: value``, ``field { value: N }`` wrappers and nested ``config { ... }``
    blocks (each parsed into a dict); strings lose their quotes, numbers become ints.
    """
    import re

    tokens = re.findall(r"'[^']*'|\"[^\"]*\"|[{}:]|[^\s{}:]+", text)
    position = 0

    def value(token):
        return token[1:-1] if token[0] in "'\"" else int(token) if token.lstrip("-").isdigit() else token

    def block():
        nonlocal position
        fields = {}
        while position < len(tokens) and tokens[position] != "}":
            name = tokens[position]
            if tokens[position + 1] == ":":
                fields.setdefault(name, []).append(value(tokens[position + 2]))
                position += 3
            else:
                assert tokens[position + 1] == "{", text
                position += 2
                inner = block()
                assert tokens[position] == "}", text
                position += 1
                fields.setdefault(name, []).append(inner["value"][0] if list(inner) == ["value"] else inner)
        return fields

    parsed = block()
    assert position == len(tokens), f"unparsed rest: {tokens[position:]}"
    return parsed


def test_tfserving_config_lays_out_the_version_folder_and_writes_both_files(ensemble_model, tmp_path):
    path = export(ensemble_model, tmp_path / "base" / "ens", tfserving_config=True, max_batch=32,
                  max_wait_ms=2.5, allowed_batch_sizes=[1, 8, 32], max_enqueued=100)
    base = tmp_path / "base"
    assert path == base / "ens" / "1" and (path / "saved_model.pb").is_file()
    config = _text_proto((base / "models.config").read_text())
    assert config["model_config_list"][0]["config"] == [
        {"name": ["ens"], "base_path": [str(base / "ens")], "model_platform": ["tensorflow"]}]
    batching = _text_proto((base / "batching_parameters.txt").read_text())
    assert batching == {"max_batch_size": [32], "batch_timeout_micros": [2500],
                        "max_enqueued_batches": [4],  # ceil(100 requests / 32 rows per batch)
                        "num_batch_threads": [1], "allowed_batch_sizes": [1, 8, 32]}
    assert _leftovers(base) == [] and _leftovers(base / "ens") == []
    x = np.random.default_rng(2).normal(size=(3, 8)).astype("float32")
    np.testing.assert_allclose(_saved_model_predict(path, x), ensemble_model.predict(x, verbose=0), atol=1e-5)


def test_tfserving_config_defaults_are_the_serve_defaults_and_other_models_are_kept(ensemble_model, tmp_path):
    import inspect

    from ensemblekit.deploy.batching import (
        DEFAULT_MAX_BATCH,
        DEFAULT_MAX_WAIT_MS,
        default_batch_sizes,
        default_max_enqueued,
    )
    from ensemblekit.deploy.serve import serve

    defaults = inspect.signature(serve).parameters
    assert (defaults["max_batch"].default, defaults["max_wait_ms"].default) == (DEFAULT_MAX_BATCH, DEFAULT_MAX_WAIT_MS)
    export(make_mlp(5), tmp_path / "member" / "3", tfserving_config=True)
    path = export(ensemble_model, tmp_path / "ens" / "7", tfserving_config=True)
    assert path == tmp_path / "ens" / "7" and (path / "saved_model.pb").is_file()
    config = _text_proto((tmp_path / "models.config").read_text())["model_config_list"][0]["config"]
    assert [(c["name"][0], c["base_path"][0]) for c in config] == [
        ("member", str(tmp_path / "member")), ("ens", str(tmp_path / "ens"))]
    batching = _text_proto((tmp_path / "batching_parameters.txt").read_text())
    assert batching["max_batch_size"] == [DEFAULT_MAX_BATCH]
    assert batching["batch_timeout_micros"] == [round(DEFAULT_MAX_WAIT_MS * 1000)]
    assert batching["max_enqueued_batches"] == [default_max_enqueued(DEFAULT_MAX_BATCH) // DEFAULT_MAX_BATCH]
    assert batching["allowed_batch_sizes"] == list(default_batch_sizes(DEFAULT_MAX_BATCH))


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"format": "onnx"}, 'tfserving_config=True needs format="tf_saved_model"'),
    ({"allowed_batch_sizes": [1, 8]}, "allowed_batch_sizes ends with 8 but max_batch is 64"),
    ({"max_enqueued": 0}, "max_enqueued is 0"),
])
def test_tfserving_config_bad_arguments_write_nothing(ensemble_model, tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        export(ensemble_model, tmp_path / "m", tfserving_config=True, **kwargs)
    assert list(tmp_path.iterdir()) == []
