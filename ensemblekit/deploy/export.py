"""Verified export of a composed model to a TensorFlow SavedModel or ONNX.

``keras.Model.export`` writes the artifact; :func:`export` then reloads it with
the runtime that will serve it (``tf.saved_model.load`` through the
``serving_default`` signature that TensorFlow Serving calls, or
``onnxruntime``), compares its outputs with the Keras model on a probe batch,
and only then moves it into place.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import keras
import numpy as np

from ensemblekit._graph import model_input_shape
from ensemblekit._io import load_model
from ensemblekit._validate import check_choice

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


def export(model, path, format="tf_saved_model", probe=None, atol=1e-5, seed=0, verbose=0):
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
            (loaded in ``safe_mode``).
        path: the SavedModel folder, or the ``.onnx`` file, to write.
        format: ``"tf_saved_model"`` or ``"onnx"`` (needs ``pip install
            "ensemblekit[onnx]"``).
        probe: inputs to compare on (default: a seeded standard-normal batch of
            8 rows of the model's input shape).
        atol: the largest absolute output difference accepted.
        seed: seed of the default probe batch.
        verbose: 1 lets Keras print what it exported.

    Returns:
        ``pathlib.Path`` of the verified artifact.

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
    return path
