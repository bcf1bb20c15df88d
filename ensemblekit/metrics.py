"""Classification metrics on predicted probabilities: accuracy, NLL, Brier, ECE; Pareto fronts."""

from __future__ import annotations

import numbers

import numpy as np

from ensemblekit._io import predict
from ensemblekit._outputs import as_probs
from ensemblekit._validate import check_labels

_EPSILON = 1e-12


def _check_probs(probs):
    probs = np.asarray(probs, dtype="float64")
    if probs.ndim != 2:
        raise ValueError(f"probabilities must have shape (n, classes); got {probs.shape}.")
    return probs


def accuracy(probs, y):
    """Fraction of rows whose argmax equals the label."""
    probs = _check_probs(probs)
    y = check_labels(y, probs.shape[0], probs.shape[1])
    return float(np.mean(probs.argmax(axis=1) == y))


def nll(probs, y):
    """Mean negative log-likelihood of the labels (natural log)."""
    probs = _check_probs(probs)
    y = check_labels(y, probs.shape[0], probs.shape[1])
    return float(-np.mean(np.log(np.clip(probs[np.arange(len(y)), y], _EPSILON, 1.0))))


def brier(probs, y):
    """Multi-class Brier score: mean over rows of ``Σ_c (p_c - 1[y=c])²``."""
    probs = _check_probs(probs)
    y = check_labels(y, probs.shape[0], probs.shape[1])
    onehot = np.eye(probs.shape[1])[y]
    return float(np.mean(np.sum((probs - onehot) ** 2, axis=1)))


def calibration_bins(probs, y, bins=15):
    """Equal-width confidence bins: per bin the sample count, mean confidence and accuracy.

    The bins of :func:`ece` (a reliability diagram plots ``accuracy`` against
    ``confidence``); empty bins have ``None`` for both.

    Example:
        >>> import numpy as np
        >>> b = calibration_bins(np.array([[0.9, 0.1], [0.9, 0.1]]), [0, 1], bins=5)
        >>> b["count"], b["accuracy"][-1], round(b["confidence"][-1], 2)
        ([0, 0, 0, 0, 2], 0.5, 0.9)
    """
    probs = _check_probs(probs)
    y = check_labels(y, probs.shape[0], probs.shape[1])
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == y
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    result = {"edges": edges.tolist(), "count": [], "confidence": [], "accuracy": []}
    for b in range(bins):
        in_bin = which == b
        result["count"].append(int(in_bin.sum()))
        result["confidence"].append(float(confidence[in_bin].mean()) if in_bin.any() else None)
        result["accuracy"].append(float(correct[in_bin].mean()) if in_bin.any() else None)
    return result


def ece(probs, y, bins=15):
    """Expected calibration error with ``bins`` equal-width confidence bins.

    ``Σ_b (n_b / n) |accuracy_b - confidence_b|`` (Guo et al., 2017).

    Example:
        >>> import numpy as np
        >>> round(ece(np.array([[0.9, 0.1], [0.9, 0.1]]), [0, 1]), 2)
        0.4
    """
    table = calibration_bins(probs, y, bins)
    total = sum(table["count"])
    return float(sum(count / total * abs(acc - conf) for count, acc, conf in
                     zip(table["count"], table["accuracy"], table["confidence"], strict=True) if count))


METRICS = {"accuracy": accuracy, "nll": nll, "brier": brier, "ece": ece}
# Lower is better for all but accuracy.
HIGHER_IS_BETTER = {"accuracy"}


def score_probs(probs, y):
    """All four metrics of ``probs`` against ``y`` as a dict."""
    return {name: fn(probs, y) for name, fn in METRICS.items()}


def predict_probs(model, x, output_kind=None, batch_size=256):
    """Probabilities of a classifier on ``x`` (softmax applied to logit outputs)."""
    return as_probs(predict(model, x, batch_size), model, output_kind)


def evaluate(model, x, y, output_kind=None, batch_size=256):
    """Accuracy, NLL, Brier score and ECE (15 bins) of a classifier on ``(x, y)``.

    Args:
        model: a ``keras.Model`` (probabilities or logits out; ``output_kind`` says
            which if detection of a final softmax is not enough).
        x: inputs.
        y: integer labels or one-hot rows.

    Returns:
        ``{"accuracy": ..., "nll": ..., "brier": ..., "ece": ...}``.

    Example:
        >>> import keras, numpy as np
        >>> m = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, activation="softmax")])
        >>> sorted(evaluate(m, np.zeros((5, 4)), np.zeros(5, dtype=int)))
        ['accuracy', 'brier', 'ece', 'nll']
    """
    return score_probs(predict_probs(model, x, output_kind=output_kind, batch_size=batch_size), y)


def _objective(row, index, key, higher_is_better):
    """``row[key]`` as a float oriented so that larger is better; clear errors otherwise."""
    if not hasattr(row, "keys"):
        raise TypeError(f"pareto: row {index} must be a mapping, got {type(row).__name__}.")
    if key not in row:
        raise ValueError(f"pareto: row {index} has no key {key!r} (keys: {sorted(map(str, row))}).")
    value = row[key]
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or np.isnan(value):
        raise ValueError(f"pareto: row {index} {key!r} must be a number, got {value!r}.")
    return float(value) if higher_is_better else -float(value)


def pareto(rows, x="throughput", y="accuracy", x_higher_is_better=True, y_higher_is_better=True):
    """The rows on the Pareto front of ``x`` and ``y``: those no other row dominates.

    Row ``a`` dominates row ``b`` when ``a`` is at least as good as ``b`` on
    both keys and strictly better on one ("good" is higher, or lower for a key
    whose ``*_higher_is_better`` is ``False``, e.g. parameters or latency).
    Rows with equal values on both keys do not dominate each other, so ties on
    the front are all kept.

    Args:
        rows: a sequence of mappings (e.g. the benchmark's result rows).
        x, y: the two keys compared; every row must hold a number under each.
        x_higher_is_better, y_higher_is_better: the direction of each key.

    Returns:
        A new list of the non-dominated rows (the same objects), sorted by
        ``x`` ascending (input order among equal ``x``).

    Example:
        >>> rows = [{"name": "a", "throughput": 100, "accuracy": 0.90},
        ...         {"name": "b", "throughput": 50, "accuracy": 0.95},
        ...         {"name": "c", "throughput": 40, "accuracy": 0.93}]
        >>> [r["name"] for r in pareto(rows)]
        ['b', 'a']
    """
    rows = list(rows)
    points = [(_objective(r, i, x, x_higher_is_better), _objective(r, i, y, y_higher_is_better))
              for i, r in enumerate(rows)]

    def dominated(p):
        return any(q[0] >= p[0] and q[1] >= p[1] and q != p for q in points)

    front = [i for i, p in enumerate(points) if not dominated(p)]
    front.sort(key=lambda i: float(rows[i][x]))
    return [rows[i] for i in front]
