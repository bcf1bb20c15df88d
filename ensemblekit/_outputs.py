"""Output kinds: what a classifier outputs (logits or probabilities) and conversions between them.

Every composition turns member outputs into log-probabilities before combining
them; every metric turns a model's raw outputs into probabilities. Both read
the kind from here: detected from the model's last layer, or given with
``output_kind=`` (one for all members or one per member).
"""

from __future__ import annotations

import keras
import numpy as np
from keras import ops

OUTPUT_KINDS = ("probs", "logits")
_LOG_EPSILON = 1e-12


def detect_output_kind(model):
    """``"probs"`` if ``model`` ends in a softmax, else ``"logits"``.

    Looks at the last layer (recursing into a nested final model): a
    ``Softmax`` layer, an ``Activation("softmax")``, any layer whose
    ``activation`` is softmax, or a layer that declares ``output_kind``
    (ensemblekit's combiners, ``TemperatureScaling`` and ``PackedOutput``).

    Args:
        model: a ``keras.Model`` (or a layer).

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
    layer = model
    while isinstance(layer, keras.Model) and layer.layers:
        layer = layer.layers[-1]
    declared = getattr(layer, "output_kind", None)
    if declared in OUTPUT_KINDS:
        return declared
    if isinstance(layer, keras.layers.Softmax):
        return "probs"
    activation = getattr(layer, "activation", None)
    name = getattr(activation, "__name__", str(activation))
    return "probs" if name == "softmax" else "logits"


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
