"""Loading members from models or files, and atomic saving."""

from __future__ import annotations

import os
import tempfile
import zipfile
from pathlib import Path

import keras
import numpy as np

from ensemblekit._validate import member_label

MODEL_SUFFIXES = (".keras", ".h5", ".hdf5")


def load_model(path, safe_mode=True, label="model"):
    """Load a whole Keras model from ``.keras`` or legacy ``.h5``, with clear errors.

    Args:
        path: a path to a ``.keras``, ``.h5`` or ``.hdf5`` file.
        safe_mode: passed to ``keras.saving.load_model``; ``True`` refuses lambda
            layers and other arbitrary code in the file.
        label: how the error messages name this model (e.g. ``"member 2"``).

    Returns:
        The loaded, uncompiled ``keras.Model``.
    """
    path = Path(os.fspath(path))
    if path.name.endswith(".weights.h5"):
        raise ValueError(
            f"{label}: {str(path)!r} holds weights only, not a model; load it into a model "
            "with model.load_weights(...) and pass the model."
        )
    if path.suffix not in MODEL_SUFFIXES:
        raise ValueError(
            f"{label}: {str(path)!r} is not a Keras model file; expected one of "
            f"{', '.join(MODEL_SUFFIXES)}."
        )
    if not path.is_file():
        raise ValueError(f"{label}: file {str(path)!r} does not exist.")
    if path.suffix == ".keras" and not zipfile.is_zipfile(path):
        raise ValueError(
            f"{label}: {str(path)!r} is not a valid .keras archive (truncated or corrupt; "
            f"{path.stat().st_size} bytes); save the model again."
        )
    try:
        model = keras.saving.load_model(path, compile=False, safe_mode=safe_mode)
    except Exception as error:  # corrupt zip, bad HDF5, unknown layer, safe_mode refusal
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"{label}: could not load {str(path)!r} as a Keras model: {reason}") from None
    return model


def single_output(model):
    """``model`` with a one-element list output (Keras 2 ``.h5`` files load so) as a single output.

    Returns ``model`` itself when its output is already one tensor (or it has
    no functional graph); otherwise a functional model over the same layers and
    weights whose output is that one tensor.

    Example:
        >>> inputs = keras.Input((4,))
        >>> listed = keras.Model(inputs, [keras.layers.Dense(3)(inputs)])
        >>> type(listed.output).__name__, type(single_output(listed).output).__name__
        ('list', 'KerasTensor')
    """
    outputs = getattr(model, "_outputs_struct", None)
    if isinstance(outputs, (list, tuple)) and len(outputs) == 1 and not isinstance(model, keras.Sequential):
        return keras.Model(model.inputs, model.outputs[0], name=model.name)
    return model


def load_member(member, index, safe_mode=True):
    """Return member ``index`` as a single-output ``keras.Model``, loading it if it is a path."""
    if isinstance(member, keras.Model):
        return single_output(member)
    if isinstance(member, (str, os.PathLike)):
        return single_output(load_model(member, safe_mode=safe_mode, label=member_label(index)))
    raise TypeError(
        f"{member_label(index)} is a {type(member).__name__}; expected a keras.Model "
        "or a path to a .keras/.h5 file."
    )


def load_members(models, min_count=2, what="an ensemble", safe_mode=True):
    """Validate a list of members and load the ones given as paths.

    Raises:
        TypeError: ``models`` is not a list/tuple, or a member is not a model or path.
        ValueError: fewer than ``min_count`` members, or a file is missing or corrupt.
    """
    if isinstance(models, (keras.Model, str, os.PathLike)) or not isinstance(models, (list, tuple)):
        raise TypeError(
            f"models must be a list of keras.Model objects or paths, got {type(models).__name__}."
        )
    if len(models) < min_count:
        raise ValueError(
            f"{what} needs at least {min_count} members, got {len(models)}."
        )
    return [load_member(m, i, safe_mode=safe_mode) for i, m in enumerate(models)]


def atomic_save(model, path, **save_kwargs):
    """Save ``model`` to ``path`` through a temporary file and a rename.

    A crash mid-save never leaves a half-written file at ``path``.
    """
    path = Path(os.fspath(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = ".weights.h5" if path.name.endswith(".weights.h5") else path.suffix
    handle, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=suffix, dir=path.parent)
    os.close(handle)
    os.unlink(tmp)  # Keras refuses to overwrite some files without asking; start clean.
    try:
        if path.name.endswith(".weights.h5"):
            model.save_weights(tmp)
        else:
            model.save(tmp, **save_kwargs)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def predict(model, x, batch_size=256):
    """``model`` on ``x`` as numpy, in batches of exactly ``batch_size`` rows.

    The last partial batch is padded with zeros (and the padding's outputs
    dropped), so every call of a model sees one input shape: ``model.predict``
    would trace its function again for each new remainder size, and
    TensorFlow warns about "frequent retracing" once the library has scored
    one model on a few differently sized arrays (fit/score halves, folds).

    Example:
        >>> import keras, numpy as np
        >>> model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
        >>> predict(model, np.ones((3, 2), "float32"), batch_size=2).shape
        (3, 1)

    Several inputs (a dict or list of arrays) and several outputs (a dict or
    list of arrays, returned in the same structure) work the same way.
    """
    x, rows = pad_to_batches(x, batch_size)
    outputs = model.predict(x, batch_size=batch_size, verbose=0)
    return keras.tree.map_structure(lambda out: np.asarray(out)[:rows], outputs)


def pad_to_batches(x, batch_size):
    """``(x padded with zero rows to a multiple of batch_size, original row count)``.

    ``x`` is an array, or a dict/list of arrays with the same number of rows.
    """
    if isinstance(x, dict) or (isinstance(x, (list, tuple)) and x and all(hasattr(a, "shape") for a in x)):
        padded = keras.tree.map_structure(lambda a: pad_to_batches(a, batch_size)[0], x)
        rows = {len(np.asarray(a)) for a in keras.tree.flatten(x)}
        if len(rows) != 1:
            raise ValueError(f"the inputs have different numbers of rows: {sorted(rows)}.")
        return padded, rows.pop()
    x = np.asarray(x)
    padding = -len(x) % batch_size
    if padding:
        x = np.concatenate([x, np.zeros((padding, *x.shape[1:]), x.dtype)])
    return x, len(x) - padding

