"""Verified export of a composed model to a TensorFlow SavedModel or ONNX.

``keras.Model.export`` writes the artifact; :func:`export` then reloads it with
the runtime that will serve it (``tf.saved_model.load`` through the
``serving_default`` signature that TensorFlow Serving calls, or
``onnxruntime``), compares its outputs with the Keras model on a probe batch,
and only then moves it into place.

With ``tfserving_config=True`` the SavedModel is laid out as TensorFlow Serving
expects, ``BASE/NAME/VERSION/saved_model.pb``, and ``BASE`` gets the two files
``tensorflow_model_server`` needs to scale ``ensemblekit serve`` out:
``models.config`` (a ``model_config_list``, text protobuf) and
``batching_parameters.txt`` holding the same batching as ``ensemblekit serve``
with the same flags (defaults from :mod:`ensemblekit.deploy.batching`).
"""

from __future__ import annotations

import importlib.util
import math
import os
import re
import shutil
import tempfile
from pathlib import Path

import keras
import numpy as np

from ensemblekit._graph import model_input_shape
from ensemblekit._io import load_model, write_text_atomic
from ensemblekit._validate import check_choice
from ensemblekit.deploy.batching import (
    DEFAULT_MAX_BATCH,
    DEFAULT_MAX_WAIT_MS,
    allowed_sizes,
    default_max_enqueued,
)

FORMATS = ("tf_saved_model", "onnx")
PROBE_BATCH = 8

# What keras.Model.export needs to convert, per backend, besides the runtime we reload with.
_ONNX_CONVERTERS = {"tensorflow": "tf2onnx", "jax": "jax2onnx", "torch": "onnxscript"}


def _check_dependencies(format):
    """Raise ``ImportError`` with one install line if ``format`` cannot be written or reloaded."""
    if format == "tf_saved_model":
        modules, install = ["tensorflow"], "tensorflow"
    else:
        modules = ["onnx", "onnxruntime", _ONNX_CONVERTERS.get(keras.backend.backend(), "onnx")]
        install = "ensemblekit[onnx]"
    missing = [module for module in dict.fromkeys(modules) if importlib.util.find_spec(module) is None]
    if missing:
        raise ImportError(
            f'export(format="{format}") needs {", ".join(missing)}, which is not installed; '
            f'pip install "{install}"'
        )


def batch_fits(shape, instance_shape):
    """True when a batch of ``shape`` holds instances of ``instance_shape`` (``None``: any size)."""
    return len(shape) == len(instance_shape) + 1 and all(
        want is None or got == want for got, want in zip(shape[1:], instance_shape, strict=True)
    )


def _probe_batch(model, probe, seed):
    """The batch both runtimes are compared on: ``probe`` or seeded normal noise."""
    dtype = model.inputs[0].dtype if getattr(model, "inputs", None) else "float32"
    shape = model_input_shape(model)
    if probe is None:
        if any(dim is None for dim in shape):
            raise ValueError(
                f"Model {model.name!r} has input shape {(None, *shape)} with unknown dimensions; "
                "pass probe=<a batch of real inputs> to verify the export."
            )
        probe = np.random.default_rng(seed).normal(size=(PROBE_BATCH, *shape))
    probe = np.asarray(probe).astype(keras.backend.standardize_dtype(dtype))
    if not batch_fits(probe.shape, shape):
        raise ValueError(
            f"probe has shape {probe.shape} but model {model.name!r} takes inputs of shape "
            f"{(None, *shape)}."
        )
    return probe


def _run_saved_model(path, probe):
    import tensorflow as tf

    signature = tf.saved_model.load(str(path)).signatures["serving_default"]
    (input_name,) = signature.structured_input_signature[1]
    outputs = signature(**{input_name: tf.constant(probe)})
    return next(iter(outputs.values())).numpy()


def _run_onnx(path, probe):
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: probe})[0]


_RELOADERS = {"tf_saved_model": _run_saved_model, "onnx": _run_onnx}


def _move_into_place(source, target):
    """Rename ``source`` onto ``target``; an existing folder is swapped out, then removed."""
    if target.is_dir() and not target.is_symlink():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", dir=target.parent))
        os.replace(target, old / target.name)
        try:
            os.replace(source, target)
        except OSError:
            os.replace(old / target.name, target)
            raise
        finally:
            shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(source, target)


MODELS_CONFIG = "models.config"
BATCHING_PARAMETERS = "batching_parameters.txt"
_CONFIG_ENTRY = re.compile(r"config\s*\{\s*name:\s*'([^']*)'\s*base_path:\s*'([^']*)'\s*"
                           r"model_platform:\s*'([^']*)'\s*\}")


def tfserving_layout(path):
    """``(version folder, model name, base folder)`` of a TensorFlow Serving export at ``path``.

    ``BASE/NAME/N`` (a numeric last part) is a version folder already; ``BASE/NAME`` gets ``/1``.
    """
    path = Path(os.path.abspath(os.fspath(path)))
    version_folder = path if path.name.isdigit() else path / "1"
    model_folder = version_folder.parent
    if not re.match(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$", model_folder.name):
        raise ValueError(f"the model folder {model_folder.name!r} of {str(path)!r} is not a usable "
                         "model name; use letters, digits, '_', '.' and '-'.")
    return version_folder, model_folder.name, model_folder.parent


def models_config_text(entries):
    """TensorFlow Serving's ``model_config_list`` for ``{name: base_path}``."""
    configs = "".join(f"  config {{\n    name: '{name}'\n    base_path: '{base_path}'\n"
                      f"    model_platform: 'tensorflow'\n  }}\n" for name, base_path in entries.items())
    return f"model_config_list {{\n{configs}}}\n"


def batching_parameters_text(max_batch=DEFAULT_MAX_BATCH, max_wait_ms=DEFAULT_MAX_WAIT_MS,
                             allowed_batch_sizes=None, max_enqueued=None):
    """TensorFlow Serving's ``--batching_parameters_file`` equivalent to ``ensemblekit serve``'s flags.

    ``max_enqueued`` counts requests in ``ensemblekit serve`` but batches in
    TensorFlow Serving: ``max_enqueued_batches = ceil(max_enqueued / max_batch)``
    (the same number of one-row requests). One batch thread, as ``ensemblekit
    serve`` calls each model from one thread.
    """
    if not isinstance(max_batch, int) or max_batch < 1:
        raise ValueError(f"max_batch is {max_batch!r}; it must be an integer >= 1.")
    if not max_wait_ms >= 0:
        raise ValueError(f"max_wait_ms is {max_wait_ms!r}; it must be a number >= 0.")
    sizes = allowed_sizes(allowed_batch_sizes, max_batch)
    max_enqueued = default_max_enqueued(max_batch) if max_enqueued is None else max_enqueued
    if not isinstance(max_enqueued, int) or max_enqueued < 1:
        raise ValueError(f"max_enqueued is {max_enqueued!r}; it must be an integer >= 1.")
    lines = [f"max_batch_size {{ value: {max_batch} }}",
             f"batch_timeout_micros {{ value: {round(max_wait_ms * 1000)} }}",
             f"max_enqueued_batches {{ value: {math.ceil(max_enqueued / max_batch)} }}",
             "num_batch_threads { value: 1 }",
             *(f"allowed_batch_sizes: {size}" for size in sizes)]
    return "\n".join(lines) + "\n"


def _write_tfserving_config(base, name, batching):
    """Add ``name`` to ``BASE/models.config`` (keeping other models) and write the batching file."""
    config_path = base / MODELS_CONFIG
    entries = {}
    if config_path.is_file():
        entries = {n: b for n, b, _ in _CONFIG_ENTRY.findall(config_path.read_text())}
    entries[name] = str(base / name)
    write_text_atomic(config_path, models_config_text(entries))
    write_text_atomic(base / BATCHING_PARAMETERS, batching)
    return config_path, base / BATCHING_PARAMETERS


def export(model, path, format="tf_saved_model", probe=None, atol=1e-5, seed=0, verbose=0,
           tfserving_config=False, max_batch=DEFAULT_MAX_BATCH, max_wait_ms=DEFAULT_MAX_WAIT_MS,
           allowed_batch_sizes=None, max_enqueued=None):
    """Export a model with ``keras.Model.export``, verify the reloaded artifact, then publish it.

    The artifact is written next to ``path`` under a temporary name, reloaded
    with the runtime that will serve it, compared with the Keras model on a
    probe batch, and renamed onto ``path`` only when the largest absolute
    difference is at most ``atol``. A failed export leaves ``path`` untouched.

    A SavedModel written to ``models/NAME/1`` is served unchanged by TensorFlow
    Serving (``tensorflow_model_server --rest_api_port=8501 --model_name=NAME
    --model_base_path=$PWD/models/NAME``), with the same REST API as
    ``ensemblekit serve``.

    Args:
        model: a single-input ``keras.Model``, or a path to a ``.keras`` file
            (loaded in ``safe_mode``) or to a TensorFlow SavedModel directory
            (TensorFlow backend; an ensemble holding one exports too).
        path: the SavedModel folder, or the ``.onnx`` file, to write.
        format: ``"tf_saved_model"`` or ``"onnx"`` (needs ``pip install
            "ensemblekit[onnx]"``).
        probe: inputs to compare on (default: a seeded standard-normal batch of
            8 rows of the model's input shape).
        atol: the largest absolute output difference accepted.
        seed: seed of the default probe batch.
        verbose: 1 lets Keras print what it exported.
        tfserving_config: also lay the SavedModel out for TensorFlow Serving
            and write ``BASE/models.config`` and ``BASE/batching_parameters.txt``:
            ``path`` is ``BASE/NAME`` (the SavedModel goes to ``BASE/NAME/1``)
            or ``BASE/NAME/N`` (a version folder, kept). An existing
            ``models.config`` keeps its other models. Then run
            ``tensorflow_model_server --rest_api_port=8501
            --model_config_file=BASE/models.config --enable_batching
            --batching_parameters_file=BASE/batching_parameters.txt``.
        max_batch, max_wait_ms, allowed_batch_sizes, max_enqueued: the batching
            written with ``tfserving_config``, as the ``ensemblekit serve`` flags
            of the same names (and their defaults).

    Returns:
        ``pathlib.Path`` of the verified artifact (with ``tfserving_config``:
        the version folder ``BASE/NAME/N``).

    Raises:
        ValueError: unknown format, a probe of the wrong shape, or the reloaded
            artifact disagrees with the Keras model by more than ``atol``.
        ImportError: the runtime for ``format`` is not installed.

    Example:
        >>> import keras, numpy as np, tempfile, os
        >>> import ensemblekit as ek
        >>> members = [keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)]) for _ in range(2)]
        >>> folder = tempfile.mkdtemp()
        >>> path = ek.deploy.export(ek.ensemble(members), os.path.join(folder, "ensemble", "1"))
        >>> sorted(p.name for p in path.iterdir())[:2]
        ['assets', 'fingerprint.pb']
    """
    check_choice(format, FORMATS, "format")
    if isinstance(model, (str, os.PathLike)):
        model = load_model(model)
    if not isinstance(model, keras.Model):
        raise TypeError(f"model must be a keras.Model or a path to a .keras file, got {type(model).__name__}.")
    if not atol >= 0:
        raise ValueError(f"atol is {atol!r}; it must be a non-negative number.")
    batching = None
    if tfserving_config:
        if format != "tf_saved_model":
            raise ValueError(f'tfserving_config=True needs format="tf_saved_model", got {format!r}.')
        path, name, base = tfserving_layout(path)
        batching = batching_parameters_text(max_batch, max_wait_ms, allowed_batch_sizes, max_enqueued)
    _check_dependencies(format)
    probe = _probe_batch(model, probe, seed)
    expected = keras.ops.convert_to_numpy(model(probe, training=False))

    path = Path(os.fspath(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp.", dir=path.parent))
    try:
        artifact = workdir / ("model.onnx" if format == "onnx" else "model")
        model.export(str(artifact), format=format, verbose=bool(verbose))
        actual = _RELOADERS[format](artifact, probe)
        difference = (
            float(np.max(np.abs(actual.astype("float64") - expected)))
            if actual.shape == expected.shape else float("inf")
        )
        if not difference <= atol:
            raise ValueError(
                f"{format} export of model {model.name!r} does not match the Keras model: max abs "
                f"difference {difference:.3g} > atol {atol:g} on a probe batch of shape "
                f"{probe.shape} (reloaded output shape {actual.shape}); {str(path)!r} left unchanged."
            )
        _move_into_place(artifact, path)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if batching is not None:
        _write_tfserving_config(base, name, batching)
    return path
