"""Loading members from models, files or TensorFlow SavedModels, and atomic saving."""

from __future__ import annotations

import json
import os
import re
import tempfile
import zipfile
from pathlib import Path

import keras

from ensemblekit._graph import is_container, iter_layers
from ensemblekit._validate import member_label

MODEL_SUFFIXES = (".keras", ".h5", ".hdf5")
SAVEDMODEL_FILES = ("saved_model.pb", "saved_model.pbtxt")
SAVEDMODEL_SIGNATURE = "serving_default"
EXPECTED_PATHS = "a .keras/.h5 file or a TensorFlow SavedModel directory"


def load_model(path, safe_mode=True, label="model"):
    """Load a whole model from ``.keras``, legacy ``.h5`` or a TensorFlow SavedModel, with clear errors.

    Args:
        path: a path to a ``.keras``, ``.h5`` or ``.hdf5`` file, or to a
            TensorFlow SavedModel directory (see :func:`load_savedmodel`;
            TensorFlow backend only).
        safe_mode: passed to ``keras.saving.load_model``; ``True`` refuses lambda
            layers and other arbitrary code in the file (a ``.keras`` file holding
            a ``keras.layers.TFSMLayer`` loads only with ``False``). A SavedModel
            directory given as the path itself is the caller's explicit choice
            and loads either way.
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
    if path.is_dir():
        return load_savedmodel(path, label=label)
    if path.suffix not in MODEL_SUFFIXES:
        if not path.suffix and not path.exists():
            raise ValueError(f"{label}: {str(path)!r} does not exist; expected {EXPECTED_PATHS}.")
        raise ValueError(
            f"{label}: {str(path)!r} is not a Keras model file; expected one of "
            f"{', '.join(MODEL_SUFFIXES)} or a TensorFlow SavedModel directory."
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
        if safe_mode and "TFSMLayer" in str(error):
            raise ValueError(_tfsm_safe_mode_message(path, label)) from None
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"{label}: could not load {str(path)!r} as a Keras model: {reason}") from None
    return model


def _tfsm_safe_mode_message(path, label):
    """Why a ``.keras`` file holding a ``TFSMLayer`` did not load in safe mode, and what to do."""
    try:
        with zipfile.ZipFile(path) as archive:
            config = json.loads(archive.read("config.json"))
        sources = sorted({node["config"]["filepath"] for node in _config_nodes(config)
                          if node.get("class_name") == "TFSMLayer" and "filepath" in node.get("config", {})})
    except Exception:  # the hint is optional; the refusal is what matters
        sources = []
    where = f" (it loads the SavedModel {', '.join(map(repr, sources))})" if sources else ""
    return (
        f"{label}: {str(path)!r} holds a keras.layers.TFSMLayer, a member loaded from a TensorFlow "
        f"SavedModel{where}, which Keras loads only with safe_mode=False: pass safe_mode=False if "
        "you trust the file and that SavedModel."
    )


def _config_nodes(config):
    """Every dict in a nested Keras config (depth first)."""
    if isinstance(config, dict):
        yield config
        for value in config.values():
            yield from _config_nodes(value)
    elif isinstance(config, list):
        for value in config:
            yield from _config_nodes(value)


def is_savedmodel(path):
    """True when ``path`` is a directory holding a TensorFlow SavedModel (``saved_model.pb``)."""
    path = Path(os.fspath(path))
    return path.is_dir() and any((path / name).is_file() for name in SAVEDMODEL_FILES)


def load_savedmodel(path, label="model", signature=SAVEDMODEL_SIGNATURE):
    """A TensorFlow SavedModel directory as a functional ``keras.Model`` around ``keras.layers.TFSMLayer``.

    The serving ``signature`` gives the model's inputs (one ``keras.Input``
    per signature input, with its name, shape and dtype) and outputs (one
    output: that tensor; several: ``{name: tensor}``). The SavedModel is
    opaque to Keras: such a member works wherever only its outputs are used
    (``ek.ensemble``, ``stack``, ``calibrate``, ``evaluate``, ``export``,
    ``serve``); ``merge``, ``pack``, ``align`` and ``prune`` refuse it.

    Args:
        path: a SavedModel directory (``model.export(path)``, ``tf.saved_model.save``).
        label: how the error messages name this model (e.g. ``"member 2"``).
        signature: the serving signature to call.

    Returns:
        An uncompiled functional ``keras.Model`` named after the directory.

    Raises:
        ValueError: ``path`` is not a SavedModel, the backend is not TensorFlow,
            or the signature is missing or has inputs of unknown rank.
    """
    path = Path(os.fspath(path))
    if not is_savedmodel(path):
        what = "directory" if path.is_dir() else "path"
        raise ValueError(
            f"{label}: {what} {str(path)!r} is not a TensorFlow SavedModel (no saved_model.pb); "
            f"expected {EXPECTED_PATHS}."
        )
    backend = keras.backend.backend()
    if backend != "tensorflow":
        raise ValueError(
            f"{label}: {str(path)!r} is a TensorFlow SavedModel, which Keras runs (keras.layers.TFSMLayer) "
            f"only under the TensorFlow backend, but the backend is {backend!r}; set "
            "KERAS_BACKEND=tensorflow, or pass the model as a .keras file."
        )
    layer = _signature_layer(path, label, signature, keras.layers.TFSMLayer)
    specs = layer.call_endpoint_fn.structured_input_signature[1]
    if len(specs) > 1:  # a signature takes its inputs as keywords, which TFSMLayer does not pass
        layer = _signature_layer(path, label, signature, SavedModelSignature)
    inputs = {name: _signature_input(name, spec, path, label) for name, spec in specs.items()}
    outputs = layer(next(iter(inputs.values())) if len(inputs) == 1 else inputs)
    if isinstance(outputs, dict) and len(outputs) == 1:
        outputs = next(iter(outputs.values()))
    return keras.Model(inputs if len(inputs) > 1 else next(iter(inputs.values())), outputs,
                       name=_savedmodel_name(path))


def _signature_layer(path, label, signature, layer_class):
    try:
        return layer_class(str(path), call_endpoint=signature, trainable=False, name="savedmodel")
    except Exception as error:  # unreadable SavedModel, missing signature (Keras lists those there are)
        reason = " ".join(str(error).split()) or type(error).__name__
        raise ValueError(
            f"{label}: could not load SavedModel {str(path)!r} through signature {signature!r}: {reason}"
        ) from None


def _signature_input(name, spec, path, label):
    if spec.shape.rank is None or spec.shape.rank == 0:
        raise ValueError(
            f"{label}: SavedModel {str(path)!r}, signature input {name!r} has shape {spec.shape}; "
            "members need inputs of known rank with a batch axis."
        )
    return keras.Input(batch_shape=tuple(spec.shape.as_list()), dtype=spec.dtype.name, name=name)


def _savedmodel_name(path):
    """A model name from the directory (``models/NAME/1``, a TF Serving version folder: ``NAME_1``)."""
    name = path.resolve().name
    if name.isdigit() and path.resolve().parent.name:
        name = f"{path.resolve().parent.name}_{name}"
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name) or "savedmodel"


@keras.saving.register_keras_serializable(package="ensemblekit")
class SavedModelSignature(keras.layers.TFSMLayer):
    """``keras.layers.TFSMLayer`` over a signature with several inputs: ``{name: tensor}`` passed as keywords.

    Loads, like ``TFSMLayer``, only with ``safe_mode=False``.
    """

    def call(self, inputs, training=False):
        return self.call_endpoint_fn(**inputs)


def savedmodel_layers(model):
    """``[(layer path, layer)]`` for every ``keras.layers.TFSMLayer`` in ``model`` (nested models walked)."""
    return [(path, layer) for path, layer in iter_layers(model)
            if isinstance(layer, keras.layers.TFSMLayer)]


def check_no_savedmodel(models, what, labels=None):
    """Raise one ``ValueError`` when a model holds a SavedModel: ``what`` needs Keras layers to read.

    Args:
        models: one ``keras.Model`` or a list of them (members).
        what: the refusing function, as errors name it (``"channels()"``).
        labels: how errors name each model (default ``member_label``; ``"model 'name'"``
            for one model).
    """
    single = isinstance(models, keras.Model)
    models = [models] if single else list(models)
    for index, model in enumerate(models):
        found = savedmodel_layers(model)
        if not found:
            continue
        layer_path, layer = found[0]
        label = labels[index] if labels else (f"model {model.name!r}" if single else member_label(index, model))
        if "/" in layer_path:  # inside a nested member (of an ensemble): name that member too
            nested = [sub for sub in model.layers if is_container(sub)]
            holder = layer_path.split("/")[0]
            label += "".join(f", {member_label(position, sub)}," for position, sub in enumerate(nested)
                             if sub.name == holder)
        raise ValueError(
            f"{what}: {label} is a TensorFlow SavedModel (keras.layers.TFSMLayer {layer_path!r} from "
            f"{layer.filepath!r}); a SavedModel has no Keras layers to read, so {what} cannot use it "
            "(ensemble, stack, calibrate, evaluate, export and serve can)."
        )


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
        f"or a path to {EXPECTED_PATHS}."
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


def write_text_atomic(path, text):
    """Write ``text`` to a temporary file next to ``path``, then rename it onto ``path``.

    Example:
        >>> import pathlib, tempfile
        >>> target = pathlib.Path(tempfile.mkdtemp()) / "a.txt"
        >>> write_text_atomic(target, "hi"); target.read_text()
        'hi'
    """
    path = Path(path)
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "w") as file:
            file.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
