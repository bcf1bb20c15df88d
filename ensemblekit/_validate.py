"""Shared input checks and their error messages.

Every public function validates through these helpers so that one kind of
mistake always gets the same one-line message, naming the member, the layer
and the shapes involved.
"""

from __future__ import annotations

import numbers

import numpy as np


def member_label(index, model=None):
    """Return ``"member 2 ('cnn_b')"``: how errors name a member."""
    name = getattr(model, "name", None)
    return f"member {index} ({name!r})" if name else f"member {index}"


def check_choice(value, choices, param):
    """Raise ``ValueError`` unless ``value`` is one of ``choices``."""
    if value not in choices:
        options = ", ".join(repr(c) for c in choices)
        raise ValueError(f"Unknown {param} {value!r}; expected one of {options}.")
    return value


def check_weights(weights, n_members, param="weights", normalize=True):
    """Validate per-member weights and return them as a float64 array.

    Args:
        weights: sequence of ``n_members`` finite, non-negative numbers, not all zero.
        n_members: how many members there are.
        param: the parameter name used in error messages.
        normalize: divide by the sum so the weights add up to one.

    Returns:
        ``np.ndarray`` of shape ``(n_members,)``.
    """
    if isinstance(weights, (str, bytes)) or not hasattr(weights, "__len__"):
        raise TypeError(f"{param} must be a sequence of numbers, got {type(weights).__name__}.")
    if len(weights) != n_members:
        raise ValueError(
            f"{param} has {len(weights)} entries but there are {n_members} members."
        )
    for i, w in enumerate(weights):
        if not isinstance(w, numbers.Real) and not (
            isinstance(w, np.generic) and np.issubdtype(type(w), np.number)
        ):
            raise TypeError(f"{param}[{i}] must be a number, got {type(w).__name__}.")
    array = np.asarray(weights, dtype="float64")
    bad = np.flatnonzero(~np.isfinite(array))
    if bad.size:
        raise ValueError(f"{param}[{bad[0]}] is {array[bad[0]]}; weights must be finite.")
    negative = np.flatnonzero(array < 0)
    if negative.size:
        i = negative[0]
        raise ValueError(f"{param}[{i}] is {array[i]:g}; weights must be non-negative.")
    if array.sum() <= 0:
        raise ValueError(f"{param} are all zero; at least one member needs a positive weight.")
    return array / array.sum() if normalize else array


def check_labels(y, n_samples, n_classes, param="y"):
    """Return integer class labels of shape ``(n,)`` from labels or one-hot rows."""
    y = np.asarray(y)
    if y.ndim == 2 and y.shape[1] == n_classes:
        y = y.argmax(axis=1)
    if y.ndim != 1:
        raise ValueError(
            f"{param} must be integer labels of shape ({n_samples},) or one-hot of shape "
            f"({n_samples}, {n_classes}); got shape {y.shape}."
        )
    if y.shape[0] != n_samples:
        raise ValueError(f"{param} has {y.shape[0]} labels but x has {n_samples} samples.")
    if not np.issubdtype(y.dtype, np.integer):
        if not np.all(np.equal(np.mod(y, 1), 0)):
            raise ValueError(f"{param} must hold integer class labels; got dtype {y.dtype}.")
        y = y.astype("int64")
    if y.size and (y.min() < 0 or y.max() >= n_classes):
        raise ValueError(
            f"{param} holds labels in [{y.min()}, {y.max()}] but the models have "
            f"{n_classes} classes."
        )
    return y


def check_targets(y, n_samples, output_shape, task, param="y"):
    """Targets for a model's output of ``task``, validated against its shape.

    Multiclass: integer labels ``(n,)`` (from labels or one-hot rows, as
    ``check_labels``); binary: labels 0/1 ``(n,)``; multilabel: 0/1 values of the
    output's shape ``(n, *output_shape)``; regression: float values of that shape.

    Example:
        >>> check_targets([0.5, 1.5], 2, (1,), "regression").tolist()
        [[0.5], [1.5]]
    """
    output_shape = tuple(output_shape)
    if task == "multiclass":
        return check_labels(y, n_samples, output_shape[-1], param=param)
    if task == "binary":
        return check_labels(y, n_samples, 2, param=param)
    values = np.asarray(y, dtype="float64")
    shape = (n_samples, *output_shape)
    zero_one = task != "multilabel" or np.isin(values, (0.0, 1.0)).all()
    if values.size != int(np.prod(shape)) or not zero_one:
        what = "0/1 targets" if task == "multilabel" else "values"
        found = f"; got values {np.unique(values)[:5].tolist()}" if not zero_one else ""
        raise ValueError(f"{param} must hold {what} of shape {shape}, got shape {values.shape}{found}.")
    return values.reshape(shape)
