"""What a model outputs: its task, its output kind (logits or probabilities), and conversions.

Tasks: ``"multiclass"`` (softmax over the last axis), ``"binary"`` (one sigmoid
unit), ``"multilabel"`` (several independent sigmoid units) and
``"regression"`` (values). Output kinds: ``"probs"`` (after the final softmax
or sigmoid) or ``"logits"`` (before it). Both are detected from the layer that
produces each output, or given with ``task=`` / ``output_kind=``.

The inputs' side lives here too, beside ``output_names``: ``input_names`` (how
members' inputs are matched by name) and ``structured_inputs`` (tensors in the
structure a model takes them), read by ``compose`` and ``pack`` alike.

Every composition turns member outputs into one canonical form per task before
combining them (``ensemblekit._tasks``); every metric turns a model's raw
outputs into probabilities. Both read the task and kind from here.
"""

from __future__ import annotations

import warnings
import weakref

import keras
import numpy as np
from keras import ops

OUTPUT_KINDS = ("probs", "logits")
TASKS = ("multiclass", "binary", "multilabel", "regression")
_LOG_EPSILON = 1e-12


def output_layers(model):
    """The layer producing each of ``model``'s outputs (nested models looked into).

    Models without a graph (subclassed, unbuilt) give their last layer.

    Example:
        >>> m = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name="head")])
        >>> [layer.name for layer in output_layers(m)]
        ['head']
    """
    outputs = getattr(model, "outputs", None) if isinstance(model, keras.Model) else None
    if not outputs:
        layer = model
        while isinstance(layer, keras.Model) and layer.layers:
            layer = layer.layers[-1]
        return [layer]
    return [_producer(tensor) for tensor in outputs]


def _producer(tensor):
    history = getattr(tensor, "_keras_history", None)
    if history is None:
        return None
    operation, _, index = history
    while isinstance(operation, keras.Model) and getattr(operation, "outputs", None):
        operation, _, index = operation.outputs[index]._keras_history
    return operation


def _activation_name(layer):
    if isinstance(layer, keras.layers.Softmax):
        return "softmax"
    activation = getattr(layer, "activation", None)
    return getattr(activation, "__name__", str(activation))


# Activations Keras itself defines: a layer ending in one of these says what it outputs.
_KERAS_ACTIVATIONS = frozenset(
    name for name in dir(keras.activations)
    if not name.startswith("_") and name not in ("get", "serialize", "deserialize")
) | {"linear", "softmax", "sigmoid"}


def _readable(layer):
    """True when ``layer``'s output activation can be read from the layer itself.

    Opaque layers cannot be read: a ``TFSMLayer`` (a SavedModel), a ``Lambda``,
    a custom layer whose ``call`` may end in ``keras.ops.softmax``, a layer
    with a custom activation function, or a reshaping/merging layer that
    passes on what came before it.
    """
    if getattr(layer, "output_kind", None) in OUTPUT_KINDS or getattr(layer, "task", None) in TASKS:
        return True
    if isinstance(layer, keras.layers.Softmax):
        return True
    if isinstance(layer, keras.layers.Lambda) or not hasattr(layer, "activation"):
        return False
    return _activation_name(layer) in _KERAS_ACTIVATIONS


_PROBED = weakref.WeakKeyDictionary()  # model -> {output index: "softmax"|"sigmoid"|"linear"}
_PROBE_ROWS = 32


def probe_activation(model, index=0, label=None):
    """What output ``index`` of ``model`` is, told by running it on a probe batch.

    Used when the producing layer is opaque (see ``_readable``). The batch is
    built from the model's input specs (standard normal floats scaled by 3,
    integers 0/1 for integer inputs such as token ids, 8 for unknown lengths).
    Rows ``>= 0`` summing to 1 over the last axis mean ``"softmax"``; values in
    ``[0, 1]`` that do not mean ``"sigmoid"``; any value outside ``[0, 1]``
    means ``"linear"``. A warning names the model and says how to state it.

    Returns:
        ``"softmax"``, ``"sigmoid"`` or ``"linear"``.

    Raises:
        ValueError: no probe can be built (string inputs, no inputs) or the
            outputs are not finite; the message asks for ``output_kind=``/``task=``.
    """
    name = label or f"Model {getattr(model, 'name', '?')!r}"
    cached = _PROBED.setdefault(model, {})
    if index in cached:
        return cached[index]
    layer = output_layers(model)[index]
    where = (f"{name}: output {index} ends in layer {getattr(layer, 'name', '?')!r} "
             f"({type(layer).__name__}), whose activation cannot be read")
    ask = "pass output_kind='probs' or 'logits' (and task=) to say what it outputs."
    outputs = _probe_outputs(model, where, ask)
    values = np.asarray(keras.ops.convert_to_numpy(outputs[index]), dtype="float64")
    if values.size == 0 or not np.all(np.isfinite(values)):
        raise ValueError(f"{where}, and a probe batch gave non-finite outputs; {ask}")
    inside = bool(np.all(values >= 0) and np.all(values <= 1))
    rows_sum_to_one = values.ndim >= 2 and values.shape[-1] >= 2 and bool(
        np.allclose(values.sum(axis=-1), 1.0, atol=1e-3))
    activation = ("softmax" if inside and rows_sum_to_one else "sigmoid" if inside else "linear")
    reading = {"softmax": "rows >= 0 summing to 1: probabilities (softmax)",
               "sigmoid": "values in [0, 1]: probabilities per unit (sigmoid)",
               "linear": "values outside [0, 1]: logits or values"}[activation]
    warnings.warn(f"{where}; a probe batch of {_PROBE_ROWS} rows gave {reading}, so it is read "
                  f"so. To state it and silence this warning, {ask}", UserWarning, stacklevel=3)
    cached[index] = activation
    return activation


def _probe_outputs(model, where, ask):
    inputs = getattr(model, "inputs", None) if isinstance(model, keras.Model) else None
    if not inputs:
        raise ValueError(f"{where}, and the model has no input specs to probe it with; {ask}")
    rng = np.random.default_rng(0)
    batch = []
    for tensor in inputs:
        shape = (_PROBE_ROWS, *[8 if d is None else d for d in tensor.shape[1:]])
        dtype = str(tensor.dtype)
        if "int" in dtype:
            batch.append(rng.integers(0, 2, size=shape).astype(dtype))
        elif "float" in dtype:
            batch.append((3 * rng.standard_normal(shape)).astype(dtype))
        elif "bool" in dtype:
            batch.append(np.zeros(shape, dtype="bool"))
        else:
            raise ValueError(f"{where}, and no probe batch can be built for its {dtype} input "
                             f"{getattr(tensor, 'name', '?')!r}; {ask}")
    try:
        outputs = model(structured_inputs(model, batch), training=False)
    except Exception as error:  # a model that cannot run on random inputs
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"{where}, and running it on a probe batch failed ({reason}); {ask}") from None
    return keras.tree.flatten(outputs)


def _activation(model, index, label=None):
    """The output activation of output ``index``: read from its layer, else probed."""
    layer = output_layers(model)[index] if isinstance(model, keras.Model) else model
    if _readable(layer) or not isinstance(model, keras.Model):
        return _activation_name(layer)
    return probe_activation(model, index, label)


def output_names(model):
    """The names of ``model``'s outputs: dict keys for dict outputs, else the output layers' names.

    Example:
        >>> inputs = keras.Input((4,))
        >>> m = keras.Model(inputs, {"label": keras.layers.Dense(3)(inputs),
        ...                          "value": keras.layers.Dense(1)(inputs)})
        >>> output_names(m)
        ['label', 'value']
    """
    struct = getattr(model, "_outputs_struct", None)
    if isinstance(struct, dict):
        return [str(key) for key in keras.tree.flatten(_key_tree(struct))]
    return [getattr(layer, "name", f"output_{i}") for i, layer in enumerate(output_layers(model))]


def input_keys(model):
    """The keys of ``model``'s dict inputs in ``model.inputs`` order (sorted, as Keras flattens a
    dict), or ``None`` when it takes one tensor or a list.

    Example:
        >>> a, b = keras.Input((2,), name="a"), keras.Input((3,), name="b")
        >>> input_keys(keras.Model({"b": b, "a": a}, keras.layers.Concatenate()([a, b])))
        ['a', 'b']
    """
    struct = getattr(model, "_inputs_struct", None)
    return sorted(struct) if isinstance(struct, dict) else None


def input_names(model):
    """The names of ``model``'s inputs in ``model.inputs`` order: dict keys for dict inputs, else the
    input tensors' names.

    Example:
        >>> a, b = keras.Input((2,), name="a"), keras.Input((3,), name="b")
        >>> input_names(keras.Model([a, b], keras.layers.Concatenate()([a, b])))
        ['a', 'b']
    """
    keys = input_keys(model)
    if keys is not None:
        return [str(key) for key in keys]
    return [str(getattr(t, "name", f"input_{i}")) for i, t in enumerate(model.inputs)]


def structured_inputs(model, tensors):
    """``tensors`` (one per input, in ``model.inputs`` order) as ``model`` takes them: a dict by
    input key for dict inputs, else one tensor or a list.

    Example:
        >>> a, b = keras.Input((2,), name="a"), keras.Input((3,), name="b")
        >>> m = keras.Model({"a": a, "b": b}, keras.layers.Concatenate()([a, b]))
        >>> sorted(structured_inputs(m, [np.ones((1, 2)), np.ones((1, 3))]))
        ['a', 'b']
    """
    keys = input_keys(model)
    if keys is not None:
        return dict(zip(keys, tensors, strict=True))
    return tensors[0] if len(tensors) == 1 else list(tensors)


def _key_tree(struct):
    """``struct`` with every leaf replaced by its key, so flattening gives keys in output order."""
    return {key: (_key_tree(value) if isinstance(value, dict) else key) for key, value in struct.items()}


def detect_task(model, index=0, label=None):
    """The task of output ``index`` of ``model``, read from the layer that produces it.

    A final softmax means ``"multiclass"``, a sigmoid ``"binary"`` (one unit) or
    ``"multilabel"`` (several); ensemblekit's own layers declare their task. A
    linear ``(batch, classes >= 2)`` output is read as multiclass logits (the
    0.1 behaviour); any other linear output is ambiguous (binary logits?
    regression?) and raises a ``ValueError`` asking for ``task=``. An opaque
    producing layer (a ``TFSMLayer``, a custom layer) is probed
    (:func:`probe_activation`).

    Args:
        model: a ``keras.Model``.
        index: which output.
        label: how errors name the model (default: its name).

    Returns:
        One of ``TASKS``.

    Example:
        >>> m = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1, activation="sigmoid")])
        >>> detect_task(m)
        'binary'
    """
    layer = output_layers(model)[index]
    units = _units(model, index)
    declared = getattr(layer, "task", None)
    if declared in TASKS:
        return _sigmoid_task(units) if declared in ("binary", "multilabel") else declared
    activation = _activation(model, index, label)
    if activation == "softmax":
        return "multiclass"
    if activation == "sigmoid":
        return _sigmoid_task(units)
    shape = _output_shape(model, index)
    if len(shape) == 1 and units is not None and units >= 2:
        return "multiclass"
    name = label or f"Model {getattr(model, 'name', '?')!r}"
    layer_name = getattr(layer, "name", "?")
    output = output_names(model)[index] if isinstance(model, keras.Model) else index
    raise ValueError(
        f"{name}: output {output!r} (layer {layer_name!r}, shape {(None, *shape)}) ends without a "
        "softmax or sigmoid, so its task cannot be told; pass task='binary' or 'multilabel' "
        "(logits), 'multiclass' (logits) or 'regression'."
    )


def _sigmoid_task(units):
    return "binary" if units == 1 else "multilabel"


def _output_shape(model, index):
    outputs = getattr(model, "outputs", None)
    if outputs:
        return tuple(outputs[index].shape[1:])
    return ()


def _units(model, index):
    shape = _output_shape(model, index)
    return shape[-1] if shape else None


def check_task(task, names=None):
    """Normalise ``task=`` (None/"auto", one task, or ``{output name: task}``) to a per-output list.

    ``None`` entries mean "detect". ``names`` are the output names (default: one output).

    Example:
        >>> check_task("binary")
        ['binary']
        >>> check_task({"value": "regression"}, ["label", "value"])
        [None, 'regression']
    """
    names = list(names or ["output"])
    if isinstance(task, dict):
        unknown = sorted(set(task) - set(names))
        if unknown:
            raise ValueError(f"task names output {unknown[0]!r}, but the outputs are {names}.")
        tasks = [task.get(name) for name in names]
    else:
        tasks = [task] * len(names)
    for name, value in zip(names, tasks):
        if value is not None and value != "auto" and value not in TASKS:
            options = ", ".join(repr(t) for t in ("auto", *TASKS))
            raise ValueError(f"Unknown task {value!r} for output {name!r}; expected one of {options}.")
    return [None if value == "auto" else value for value in tasks]


def detect_output_kind(model, index=0, label=None):
    """``"probs"`` if ``model``'s output ends in a softmax or sigmoid, else ``"logits"``.

    Looks at the layer producing output ``index`` (recursing into nested
    models): a ``Softmax`` layer, an ``Activation("softmax")`` or
    ``"sigmoid"``, any layer whose ``activation`` is one of them, or a layer
    that declares ``output_kind`` (ensemblekit's combiners,
    ``TemperatureScaling`` and ``PackedOutput``). Where that layer is opaque (a
    ``TFSMLayer``, a ``Lambda``, a custom layer, a custom activation), the model
    is run on a probe batch instead and a warning says so
    (:func:`probe_activation`).

    Args:
        model: a ``keras.Model`` (or a layer).
        index: which output.
        label: how warnings and errors name the model (default: its name).

    Returns:
        ``"probs"`` or ``"logits"``.

    Example:
        >>> import keras
        >>> import ensemblekit as ek
        >>> ek.detect_output_kind(keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)]))
        'logits'
        >>> ek.detect_output_kind(keras.Sequential([keras.Input((4,)), keras.layers.Dense(3),
        ...                                         keras.layers.Softmax()]))
        'probs'
    """
    layer = output_layers(model)[index] if isinstance(model, keras.Model) else model
    declared = getattr(layer, "output_kind", None)
    if declared in OUTPUT_KINDS:
        return declared
    return "probs" if _activation(model, index, label) in ("softmax", "sigmoid") else "logits"


def check_output_kinds(output_kind, n_members):
    """Normalise ``output_kind=`` (None, one kind, or one kind per member) to a list.

    Example:
        >>> check_output_kinds("logits", 2)
        ['logits', 'logits']
    """
    if output_kind is None or isinstance(output_kind, str):
        output_kind = [output_kind] * n_members
    output_kind = list(output_kind)
    if len(output_kind) != n_members:
        raise ValueError(
            f"output_kind has {len(output_kind)} entries but there are {n_members} members."
        )
    for i, kind in enumerate(output_kind):
        if kind is not None and kind not in OUTPUT_KINDS:
            raise ValueError(
                f"output_kind[{i}] is {kind!r}; expected 'logits', 'probs' or None (detect)."
            )
    return output_kind


def to_log_probs(output, kind):
    """Log-probabilities (a backend tensor) from a member output that is ``"logits"`` or ``"probs"``.

    Example:
        >>> import numpy as np
        >>> out = to_log_probs(np.log(np.array([[0.25, 0.75]], "float32")), "logits")
        >>> np.round(np.exp(keras.ops.convert_to_numpy(out)), 2).tolist()
        [[0.25, 0.75]]
    """
    if kind == "logits":
        return ops.log_softmax(output, axis=-1)
    return ops.log(ops.clip(output, _LOG_EPSILON, 1.0))


def as_probs(raw, model, output_kind=None):
    """``model``'s raw outputs (numpy) as float64 probabilities: softmax if it outputs logits.

    ``output_kind`` (``"logits"``/``"probs"``) overrides ``detect_output_kind(model)``.

    Example:
        >>> import keras
        >>> m = keras.Sequential([keras.Input((2,)), keras.layers.Dense(2)])
        >>> as_probs(np.zeros((1, 2)), m).tolist()
        [[0.5, 0.5]]
    """
    raw = np.asarray(raw, dtype="float64")
    if (output_kind or detect_output_kind(model)) == "logits":
        raw = np.exp(raw - raw.max(axis=-1, keepdims=True))
        raw /= raw.sum(axis=-1, keepdims=True)
    return raw
