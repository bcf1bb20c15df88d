"""Metrics per task (multiclass, binary, multilabel, regression), OOD detection, Pareto fronts.

One table of metric functions per task, each ``fn(prediction, y) -> float`` on numpy
(float64):

- ``"multiclass"`` (``METRICS``): accuracy, NLL, Brier, ECE of ``(n, classes)`` probabilities.
- ``"binary"`` (``BINARY_METRICS``): accuracy at 0.5, AUROC, Bernoulli NLL, Brier, ECE of
  positive-class probabilities of shape ``(n,)`` or ``(n, 1)``.
- ``"multilabel"`` (:func:`multilabel_metrics`): the binary metrics of each label
  (``"per_label"``) and their macro averages under the binary names.
- ``"regression"`` (``REGRESSION_METRICS``): RMSE, MAE; with a predictive standard
  deviation also the Gaussian NLL and the coverage of the ±1.96σ interval
  (``REGRESSION_STD_METRICS``).
- OOD detection (``OOD_METRICS``): AUROC, AUPR and FPR at 95% TPR with the OOD samples as
  the positive class, on the per-sample scores of :func:`ood_scores` (higher = more OOD).

:func:`evaluate` predicts once, reads each output's task (``ensemblekit._outputs``) and
the uncertainty outputs of ``ensemble(..., uncertainty=True)``, and scores every output.
"""

from __future__ import annotations

import numbers
import warnings

import keras
import numpy as np
from scipy.special import expit
from scipy.stats import rankdata

from ensemblekit._data import Collected, collect, predict
from ensemblekit._graph import graph_operations, is_container, own_nodes
from ensemblekit._outputs import (
    TASKS,
    as_probs,
    check_task,
    detect_output_kind,
    detect_task,
    output_names,
)
from ensemblekit._validate import check_choice, check_labels, member_label

_EPSILON = 1e-12


def _check_probs(probs):
    probs = np.asarray(probs, dtype="float64")
    if probs.ndim != 2:
        raise ValueError(f"probabilities must have shape (n, classes); got {probs.shape}.")
    bad = np.flatnonzero(~np.isfinite(probs).all(axis=1))
    if bad.size:  # argmax would read a NaN row as class 0
        raise ValueError(f"probabilities must be finite; {bad.size} of {len(probs)} rows are not (first: row "
                         f"{bad[0]}). ek.evaluate scores the finite rows and reports non_finite_rows.")
    return probs


def _sample_weight(sample_weight, rows):
    """``sample_weight`` as ``(rows,)`` float64 (non-negative, finite, positive sum), or ``None``.

    Weights given per sample of a dense output (``rows`` positions per sample) are
    repeated over the positions.
    """
    if sample_weight is None:
        return None
    weights = np.asarray(sample_weight, dtype="float64").reshape(-1)
    if weights.size and rows % weights.size == 0 and weights.size != rows:
        weights = np.repeat(weights, rows // weights.size)
    if weights.shape != (rows,):
        raise ValueError(f"sample_weight has {weights.size} values; expected one per row ({rows}).")
    if not np.all(np.isfinite(weights)) or np.any(weights < 0) or not weights.sum() > 0:
        raise ValueError("sample_weight must be finite, non-negative numbers with a positive sum.")
    return weights


def _mean(values, weights):
    """The (weighted) mean of per-row ``values``."""
    values = np.asarray(values, dtype="float64")
    return float(np.mean(values)) if weights is None else float(np.sum(values * weights) / np.sum(weights))


def accuracy(probs, y, sample_weight=None):
    """Fraction of rows whose argmax equals the label (weighted by ``sample_weight``)."""
    probs = _check_probs(probs)
    y = check_labels(y, probs.shape[0], probs.shape[1])
    return _mean(probs.argmax(axis=1) == y, _sample_weight(sample_weight, len(y)))


def nll(probs, y, sample_weight=None):
    """Mean negative log-likelihood of the labels (natural log)."""
    probs = _check_probs(probs)
    y = check_labels(y, probs.shape[0], probs.shape[1])
    return _mean(-np.log(np.clip(probs[np.arange(len(y)), y], _EPSILON, 1.0)),
                 _sample_weight(sample_weight, len(y)))


def brier(probs, y, sample_weight=None):
    """Multi-class Brier score: mean over rows of ``Σ_c (p_c - 1[y=c])²``."""
    probs = _check_probs(probs)
    y = check_labels(y, probs.shape[0], probs.shape[1])
    onehot = np.eye(probs.shape[1])[y]
    return _mean(np.sum((probs - onehot) ** 2, axis=1), _sample_weight(sample_weight, len(y)))


def calibration_bins(probs, y, bins=15, sample_weight=None):
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
    return _confidence_bins(probs.max(axis=1), probs.argmax(axis=1) == y, bins,
                            _sample_weight(sample_weight, len(y)))


def _confidence_bins(confidence, correct, bins, weights=None):
    """Per equal-width confidence bin: count, (weighted) mean confidence and accuracy (``None`` when
    empty); with weights also ``"weight"``, each bin's total weight."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    result = {"edges": edges.tolist(), "count": [], "confidence": [], "accuracy": []}
    if weights is not None:
        result["weight"] = []
    for b in range(bins):
        in_bin = which == b
        result["count"].append(int(in_bin.sum()))
        w = None if weights is None else weights[in_bin]
        filled = in_bin.any() and (w is None or w.sum() > 0)
        result["confidence"].append(_mean(confidence[in_bin], w) if filled else None)
        result["accuracy"].append(_mean(correct[in_bin], w) if filled else None)
        if weights is not None:
            result["weight"].append(float(w.sum()))
    return result


def ece(probs, y, bins=15, sample_weight=None):
    """Expected calibration error with ``bins`` equal-width confidence bins.

    ``Σ_b (n_b / n) |accuracy_b - confidence_b|`` (Guo et al., 2017).

    Example:
        >>> import numpy as np
        >>> round(ece(np.array([[0.9, 0.1], [0.9, 0.1]]), [0, 1]), 2)
        0.4
    """
    return _ece_of_bins(calibration_bins(probs, y, bins, sample_weight))


def _ece_of_bins(table):
    mass = table.get("weight", table["count"])
    total = sum(mass)
    return float(sum(m / total * abs(acc - conf) for m, acc, conf in
                     zip(mass, table["accuracy"], table["confidence"], strict=True) if m and acc is not None))


METRICS = {"accuracy": accuracy, "nll": nll, "brier": brier, "ece": ece}
# Lower is better for all but these (coverage is neither: its target is the interval's level).
HIGHER_IS_BETTER = {"accuracy", "auroc", "aupr"}


def score_probs(probs, y, sample_weight=None):
    """All four metrics of ``probs`` against ``y`` as a dict (weighted by ``sample_weight``)."""
    return {name: fn(probs, y, sample_weight=sample_weight) for name, fn in METRICS.items()}


def predict_probs(model, x, output_kind=None, batch_size=256):
    """Probabilities of a classifier on ``x`` (softmax applied to logit outputs)."""
    return as_probs(predict(model, x, batch_size), model, output_kind)


# --- binary: one probability of the positive class per label -------------------------------


def _check_binary(p, y, name="p", probabilities=True, sample_weight=None, with_weights=False):
    """``(p, y)`` flattened: float64 scores and int64 0/1 labels of one shape.

    ``p`` of shape ``(n, 1)`` goes with ``y`` of shape ``(n,)`` and the other way round.
    """
    p, y = np.asarray(p, dtype="float64"), np.asarray(y)
    if p.ndim and p.shape[-1] == 1 and y.shape == p.shape[:-1]:
        p = p[..., 0]
    elif y.ndim and y.shape[-1] == 1 and p.shape == y.shape[:-1]:
        y = y[..., 0]
    if p.shape != y.shape or p.size == 0:
        raise ValueError(f"{name} has shape {p.shape} but y has shape {y.shape}; binary metrics "
                         "need one score per 0/1 label.")
    p, y = p.ravel(), y.ravel()
    not_binary = ~np.isin(y, (0, 1))
    if not_binary.any():
        raise ValueError(f"y must hold binary labels 0/1; got {y[not_binary][0].item()!r}.")
    if probabilities and (p.min() < 0 or p.max() > 1 or np.isnan(p).any()):
        raise ValueError(f"{name} must be probabilities in [0, 1] (apply a sigmoid to logits); "
                         f"got values in [{p.min():g}, {p.max():g}].")
    if with_weights:
        return p, y.astype("int64"), _sample_weight(sample_weight, p.size)
    return p, y.astype("int64")


def binary_accuracy(p, y, threshold=0.5, sample_weight=None):
    """Fraction of labels with ``(p > threshold) == y`` (``keras.metrics.BinaryAccuracy``'s rule).

    Example:
        >>> binary_accuracy([0.9, 0.4, 0.6], [1, 0, 0])
        0.6666666666666666
    """
    p, y, w = _check_binary(p, y, sample_weight=sample_weight, with_weights=True)
    return _mean((p > threshold) == y, w)


def binary_nll(p, y, sample_weight=None):
    """Mean Bernoulli negative log-likelihood ``-[y log p + (1 - y) log(1 - p)]`` (natural log).

    Example:
        >>> round(binary_nll([0.8, 0.25], [1, 0]), 4)  # -(log 0.8 + log 0.75) / 2
        0.2554
    """
    p, y, w = _check_binary(p, y, sample_weight=sample_weight, with_weights=True)
    likelihood = np.where(y == 1, p, 1.0 - p)
    return _mean(-np.log(np.clip(likelihood, _EPSILON, 1.0)), w)


def binary_brier(p, y, sample_weight=None):
    """Mean squared error of the positive-class probability, ``mean((p - y)²)``.

    (Half the two-class :func:`brier`, as in ``sklearn.metrics.brier_score_loss``.)

    Example:
        >>> round(binary_brier([0.8, 0.3], [1, 0]), 4)  # (0.2² + 0.3²) / 2
        0.065
    """
    p, y, w = _check_binary(p, y, sample_weight=sample_weight, with_weights=True)
    return _mean((p - y) ** 2, w)


def binary_calibration_bins(p, y, bins=15, sample_weight=None):
    """:func:`calibration_bins` of binary probabilities: confidence ``max(p, 1 - p)``.

    Example:
        >>> binary_calibration_bins([0.9, 0.2], [1, 1], bins=5)["count"]
        [0, 0, 0, 1, 1]
    """
    p, y, w = _check_binary(p, y, sample_weight=sample_weight, with_weights=True)
    return _confidence_bins(np.maximum(p, 1.0 - p), (p > 0.5) == y, bins, w)


def binary_ece(p, y, bins=15, sample_weight=None):
    """Expected calibration error of binary probabilities (confidence ``max(p, 1 - p)``).

    ``Σ_b (n_b / n) |accuracy_b - confidence_b|`` over ``bins`` equal-width bins (Guo et al., 2017).

    Example:
        >>> round(binary_ece([0.9, 0.9], [1, 0]), 2)
        0.4
    """
    return _ece_of_bins(binary_calibration_bins(p, y, bins, sample_weight))


def _check_two_classes(y, name):
    positives = int(y.sum())
    if positives in (0, len(y)):
        raise ValueError(f"{name} needs both classes in y; all {len(y)} labels are {int(y[0])}.")
    return positives, len(y) - positives


def auroc(scores, y, sample_weight=None):
    """Area under the ROC curve: the chance a random positive outscores a random negative.

    Rank-based (Mann-Whitney U; Hanley & McNeil, 1982), ties counted as one half.

    Args:
        scores: one score per label (probabilities or any real numbers; higher = positive).
        y: 0/1 labels of the same shape; both classes must occur.

    Example:
        >>> auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1])
        0.75
    """
    if sample_weight is not None:  # the weighted Mann-Whitney statistic: the ROC curve's area
        true_positives, false_positives, positives, negatives = _ranked_counts(
            scores, y, "auroc", sample_weight)
        tpr = np.r_[0.0, true_positives / positives]
        fpr = np.r_[0.0, false_positives / negatives]
        return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))
    scores, y = _check_binary(scores, y, "scores", probabilities=False)
    positives, negatives = _check_two_classes(y, "auroc")
    ranks = rankdata(scores)  # ties get their average rank
    return float((ranks[y == 1].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def _ranked_counts(scores, y, name, sample_weight=None):
    """True and false positives (weighted counts with ``sample_weight``) above each distinct
    score, highest score first, and the positives' and negatives' totals."""
    scores, y, w = _check_binary(scores, y, "scores", probabilities=False, sample_weight=sample_weight,
                                 with_weights=True)
    _check_two_classes(y, name)
    w = np.ones(len(y)) if w is None else w
    order = np.argsort(-scores, kind="mergesort")
    scores, y, w = scores[order], y[order], w[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(scores)), len(scores) - 1]
    true_positives = np.cumsum(w * y)[last_of_tie]
    false_positives = np.cumsum(w * (1 - y))[last_of_tie]
    positives, negatives = float(np.sum(w * y)), float(np.sum(w * (1 - y)))
    if positives <= 0 or negatives <= 0:
        raise ValueError(f"{name} needs both classes with positive sample weight.")
    return true_positives, false_positives, positives, negatives


def aupr(scores, y):
    """Area under the precision-recall curve as average precision, ``Σ_n (R_n - R_{n-1}) P_n``.

    The step-wise sum over the distinct thresholds (no interpolation), as
    ``sklearn.metrics.average_precision_score``.

    Example:
        >>> round(aupr([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]), 4)  # (1/2)·1 + (1/2)·(2/3)
        0.8333
    """
    true_positives, false_positives, positives, _ = _ranked_counts(scores, y, "aupr")
    precision = true_positives / (true_positives + false_positives)
    recall = true_positives / positives
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def fpr_at_tpr(scores, y, tpr=0.95):
    """False-positive rate at the highest threshold whose true-positive rate reaches ``tpr``.

    Example:
        >>> fpr_at_tpr([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1])  # catching both positives lets 0.4 in
        0.5
    """
    true_positives, false_positives, positives, negatives = _ranked_counts(scores, y, "fpr_at_tpr")
    first = int(np.searchsorted(true_positives / positives, tpr, side="left"))
    return float(false_positives[first] / negatives)


BINARY_METRICS = {"accuracy": binary_accuracy, "auroc": auroc, "nll": binary_nll,
                  "brier": binary_brier, "ece": binary_ece}


def score_binary(p, y, sample_weight=None):
    """All of ``BINARY_METRICS`` of positive-class probabilities ``p`` against 0/1 labels ``y``.

    Example:
        >>> sorted(score_binary([0.9, 0.2, 0.6], [1, 0, 0]))
        ['accuracy', 'auroc', 'brier', 'ece', 'nll']
    """
    return {name: fn(p, y, sample_weight=sample_weight) for name, fn in BINARY_METRICS.items()}


def multilabel_metrics(p, y, sample_weight=None):
    """The binary metrics of every label and their unweighted (macro) means.

    Returns ``{"accuracy", "auroc", "nll", "brier", "ece"}`` (each the mean over
    labels, as sklearn's ``average="macro"``) plus ``"per_label"``: one such dict per
    label. Labels are the last axis; leading axes (dense outputs) are samples.

    Example:
        >>> p = np.array([[0.9, 0.2], [0.3, 0.6], [0.8, 0.7]])
        >>> result = multilabel_metrics(p, np.array([[1, 0], [1, 1], [0, 1]]))
        >>> result["auroc"], [row["auroc"] for row in result["per_label"]]
        (0.75, [0.5, 1.0])
    """
    p, y = np.asarray(p, dtype="float64"), np.asarray(y)
    if p.ndim < 2 or p.shape != y.shape:
        raise ValueError(f"multilabel probabilities have shape {p.shape} but y has shape {y.shape}; "
                         "both must be (n, labels).")
    p, y = p.reshape(-1, p.shape[-1]), y.reshape(-1, y.shape[-1])
    weights = _sample_weight(sample_weight, len(p))
    per_label = []
    for label in range(p.shape[1]):
        try:
            per_label.append(score_binary(p[:, label], y[:, label], sample_weight=weights))
        except ValueError as error:
            raise ValueError(f"label {label}: {error}") from None
    macro = {name: float(np.mean([row[name] for row in per_label])) for name in BINARY_METRICS}
    return {**macro, "per_label": per_label}


# --- regression: values, and optionally a predictive standard deviation --------------------


def _check_values(prediction, y, name="prediction"):
    prediction, y = np.asarray(prediction, dtype="float64"), np.asarray(y, dtype="float64")
    if prediction.ndim and prediction.shape[-1] == 1 and y.shape == prediction.shape[:-1]:
        y = y[..., None]
    if prediction.shape != y.shape or prediction.size == 0:
        raise ValueError(f"{name} has shape {prediction.shape} but y has shape {y.shape}.")
    return prediction, y


def _check_std(std, mean):
    std = np.asarray(std, dtype="float64").reshape(mean.shape) if np.size(std) == mean.size else None
    if std is None:
        raise ValueError(f"std must have the prediction's shape {mean.shape}.")
    if std.min() < 0 or np.isnan(std).any():
        raise ValueError(f"std must be non-negative; got a minimum of {std.min():g}.")
    return std


def rmse(prediction, y, sample_weight=None):
    """Root mean squared error over every value.

    Example:
        >>> rmse([1.0, 2.0], [1.0, 4.0])
        1.4142135623730951
    """
    prediction, y = _check_values(prediction, y)
    return float(np.sqrt(_mean((prediction - y).ravel() ** 2, _sample_weight(sample_weight, prediction.size))))


def mae(prediction, y, sample_weight=None):
    """Mean absolute error over every value.

    Example:
        >>> mae([1.0, 2.0], [1.0, 4.0])
        1.0
    """
    prediction, y = _check_values(prediction, y)
    return _mean(np.abs(prediction - y).ravel(), _sample_weight(sample_weight, prediction.size))


def gaussian_nll(mean, std, y, sample_weight=None):
    """Mean negative log-likelihood of ``y`` under ``N(mean, std²)``, per value (natural log).

    ``½ log(2π σ²) + (y - μ)² / (2σ²)``, with ``σ²`` floored at 1e-12.

    Example:
        >>> round(gaussian_nll([0.0], [1.0], [1.0]), 4)  # ½ log 2π + ½
        1.4189
    """
    mean, y = _check_values(mean, y, "mean")
    variance = np.maximum(_check_std(std, mean) ** 2, _EPSILON)
    values = 0.5 * np.log(2 * np.pi * variance) + (y - mean) ** 2 / (2 * variance)
    return _mean(values.ravel(), _sample_weight(sample_weight, mean.size))


def coverage(mean, std, y, z=1.96, sample_weight=None):
    """Fraction of values inside ``mean ± z·std`` (0.95 for a calibrated Gaussian at z = 1.96).

    Example:
        >>> coverage([0.0, 0.0], [1.0, 1.0], [1.5, 2.5])
        0.5
    """
    mean, y = _check_values(mean, y, "mean")
    inside = np.abs(y - mean) <= z * _check_std(std, mean)
    return _mean(inside.ravel(), _sample_weight(sample_weight, mean.size))


REGRESSION_METRICS = {"rmse": rmse, "mae": mae}
REGRESSION_STD_METRICS = {"nll": gaussian_nll, "coverage": coverage}


def score_task(prediction, y, task="multiclass", std=None, sample_weight=None):
    """Every metric of ``task`` on one output's predictions (probabilities or values).

    Args:
        prediction: probabilities (classification tasks) or values (regression).
            Multiclass dense outputs ``(n, ..., classes)`` are scored per position.
        y: labels: class indices or one-hot (multiclass), 0/1 of the prediction's
            shape (binary, multilabel), values (regression).
        task: one of ``"multiclass"``, ``"binary"``, ``"multilabel"``, ``"regression"``.
        std: regression only: a predictive standard deviation per value, which adds
            ``"nll"`` (Gaussian) and ``"coverage"`` (±1.96σ).
        sample_weight: one weight per sample (repeated over a dense output's positions
            and a sample's values); every metric becomes its weighted version.

    Returns:
        The task's metrics as a dict (see the module docstring).

    Example:
        >>> score_task(np.array([1.0, 3.0]), np.array([1.0, 2.0]), "regression", std=[1.0, 1.0])["coverage"]
        1.0
    """
    check_choice(task, TASKS, "task")
    w = sample_weight
    if task == "multiclass":
        return score_probs(*_flatten_dense(np.asarray(prediction, dtype="float64"), np.asarray(y)),
                           sample_weight=w)
    if task == "binary":
        return score_binary(prediction, y, sample_weight=w)
    if task == "multilabel":
        return multilabel_metrics(prediction, y, sample_weight=w)
    result = {name: fn(prediction, y, sample_weight=w) for name, fn in REGRESSION_METRICS.items()}
    if std is not None:
        result.update({name: fn(prediction, std, y, sample_weight=w)
                       for name, fn in REGRESSION_STD_METRICS.items()})
    return result


def _flatten_dense(probs, y):
    """Dense multiclass outputs ``(n, ..., classes)`` as rows ``(n·..., classes)``, labels alike."""
    if probs.ndim <= 2:
        return probs, y
    if y.shape == probs.shape[:-1]:
        return probs.reshape(-1, probs.shape[-1]), y.reshape(-1)
    if y.shape == probs.shape:
        return probs.reshape(-1, probs.shape[-1]), y.reshape(-1, y.shape[-1])
    raise ValueError(f"y has shape {y.shape} but the probabilities have shape {probs.shape}; "
                     f"expected labels of shape {probs.shape[:-1]} or one-hot of shape {probs.shape}.")


# --- out-of-distribution detection -----------------------------------------------------------


def entropy(probs, task="multiclass"):
    """Entropy (nats) of each sample's predicted distribution.

    Multiclass: ``-Σ_c p_c log p_c`` over the last axis; binary and multilabel: the
    Bernoulli entropies of every label; dense outputs: summed over all non-batch
    axes (the joint entropy of independent positions/labels).

    Example:
        >>> np.round(entropy(np.array([[0.5, 0.5], [1.0, 0.0]])), 4).tolist()
        [0.6931, 0.0]
    """
    probs = np.clip(np.asarray(probs, dtype="float64"), 0.0, 1.0)
    if task == "multiclass":
        per_position = -np.sum(probs * np.log(np.clip(probs, _EPSILON, 1.0)), axis=-1)
    else:
        per_position = -(probs * np.log(np.clip(probs, _EPSILON, 1.0))
                         + (1 - probs) * np.log(np.clip(1 - probs, _EPSILON, 1.0)))
    return _per_sample(per_position, np.sum) + 0.0  # no -0.0 for certain predictions


def _per_sample(values, reduce):
    values = np.asarray(values, dtype="float64")
    return reduce(values.reshape(len(values), -1), axis=1) if values.ndim > 1 else values


def ood_scores(probs, task="multiclass", mutual_information=None):
    """Per-sample OOD scores, higher meaning "more likely out of distribution".

    ``"max_prob"``: minus the confidence (max class probability; ``max(p, 1 - p)``
    for sigmoid outputs; averaged over labels/positions); ``"entropy"``: the entropy
    of the prediction (:func:`entropy`); ``"mutual_information"`` (when given: the
    ``mutual_information`` output of ``ensemble(..., uncertainty=True)``, summed over
    non-batch axes): the members' disagreement (Depeweg et al., 2018).

    Example:
        >>> scores = ood_scores(np.array([[0.9, 0.1], [0.5, 0.5]]))
        >>> scores["max_prob"].tolist(), sorted(scores)
        ([-0.9, -0.5], ['entropy', 'max_prob'])
    """
    probs = np.asarray(probs, dtype="float64")
    confidence = probs.max(axis=-1) if task == "multiclass" else np.maximum(probs, 1 - probs)
    scores = {"max_prob": -_per_sample(confidence, np.mean), "entropy": entropy(probs, task)}
    if mutual_information is not None:
        scores["mutual_information"] = _per_sample(mutual_information, np.sum)
    return scores


OOD_METRICS = {"auroc": auroc, "aupr": aupr, "fpr95": fpr_at_tpr}


def ood_detection(scores_in, scores_out):
    """AUROC, AUPR and FPR at 95% TPR of telling ``scores_out`` (positive) from ``scores_in``.

    Example:
        >>> ood_detection([0.1, 0.2, 0.3], [0.25, 0.9])
        {'auroc': 0.8333333333333334, 'aupr': 0.8333333333333333, 'fpr95': 0.3333333333333333}
    """
    scores_in, scores_out = np.ravel(scores_in), np.ravel(scores_out)
    scores = np.concatenate([scores_in, scores_out])
    is_ood = np.r_[np.zeros(len(scores_in), "int64"), np.ones(len(scores_out), "int64")]
    return {name: fn(scores, is_ood) for name, fn in OOD_METRICS.items()}


# --- non-finite outputs: found, traced to a member, never scored -------------------------------


def _several_inputs(x):
    """Whether ``x`` is a dict or list of arrays (several inputs), as ``inference.pad_to_batches`` reads it."""
    return isinstance(x, dict) or (isinstance(x, (list, tuple)) and bool(x) and all(hasattr(a, "shape") for a in x))


def _input_arrays(x):
    """The arrays of ``x`` (an array, or a dict/list of arrays), or ``None`` for data that is not arrays."""
    leaves = keras.tree.flatten(x) if _several_inputs(x) else [x]
    if not all(isinstance(a, (list, tuple)) or hasattr(a, "__array__") for a in leaves):
        return None
    arrays = [np.asarray(a) for a in leaves]
    return arrays if all(a.ndim for a in arrays) else None


def _take_rows(x, rows):
    """``x`` (an array, a dict/list of arrays, or a pass's :class:`Collected`) restricted to ``rows``."""
    if isinstance(x, Collected):
        return x.inputs_at(rows)
    if _several_inputs(x):
        return keras.tree.map_structure(lambda a: np.asarray(a)[rows], x)
    return np.asarray(x)[rows]


def _rows_not_finite(values):
    """``(n,)`` bool: the rows (first axis) where a numeric array of ``values`` holds NaN or inf."""
    arrays = [np.asarray(keras.ops.convert_to_numpy(a)) for a in keras.tree.flatten(values)]
    bad = np.zeros(len(arrays[0]), dtype=bool)
    for array in arrays:
        if np.issubdtype(array.dtype, np.number) and array.ndim:
            bad |= ~np.isfinite(array.reshape(len(array), -1)).all(axis=1)
    return bad


def _eager(model, x, rows, batch_size):
    """``model`` called op by op (no traced graph) on ``x``'s ``rows``: numpy, in its output structure."""
    parts = [keras.tree.map_structure(keras.ops.convert_to_numpy,
                                      model(_take_rows(x, rows[start:start + batch_size]), training=False))
             for start in range(0, len(rows), batch_size)]
    return keras.tree.map_structure(lambda *arrays: np.concatenate(arrays), *parts)


def non_finite_rows(model, x, outputs, batch_size=256):
    """The rows of ``x`` on which ``model``'s outputs are non-finite (NaN or inf), as an ``(n,)`` bool array.

    ``outputs`` are ``model``'s predictions on ``x`` (any structure of arrays, rows
    first); ``x`` is arrays or the :class:`ensemblekit._data.Collected` of the pass
    that made them. Rows whose inputs hold NaN or inf are run again through ``model`` op by
    op: on CPU, TensorFlow's graph optimiser fuses ``Dense`` (or a convolution), its
    bias and a ReLU into one oneDNN kernel that turns NaN into 0, so a traced
    prediction can be finite where the model's function is not. A model that
    handles non-finite inputs itself (imputes them) keeps those rows.

    Example:
        >>> import keras
        >>> m = keras.Sequential([keras.Input((2,)), keras.layers.Dense(4, activation="relu"), keras.layers.Dense(1)])
        >>> x = np.array([[0.0, 1.0], [np.nan, 1.0]], "float32")
        >>> non_finite_rows(m, x, m.predict(x, verbose=0)).tolist()
        [False, True]
    """
    bad = _rows_not_finite(outputs)
    suspects = np.zeros_like(bad)
    if isinstance(x, Collected):  # one pass over any data kept the rows with non-finite inputs
        suspects[x.suspect_rows] = True
    else:
        arrays = _input_arrays(x)
        if arrays is None:
            return bad
        for array in arrays:
            if np.issubdtype(array.dtype, np.number) and len(array) == len(bad):
                suspects |= ~np.isfinite(array.reshape(len(array), -1)).all(axis=1)
    suspects = np.flatnonzero(suspects & ~bad)
    if suspects.size:
        bad[suspects] = _rows_not_finite(_eager(model, x, suspects, batch_size))
    return bad


def _source_members(model):
    """``[(member, its output tensors, fed by the inputs)]``: the nested models of ``model``'s graph that
    no other nested model feeds (an ensemble's members, not a stack's meta-learner), in graph order."""
    try:
        operations, calls = graph_operations(model), own_nodes(model)
    except ValueError:  # no functional graph: no members to name
        return []
    downstream, members = set(), []
    for operation, parents in operations:
        if any(is_container(parent) or id(parent) in downstream for parent in parents):
            downstream.add(id(operation))
        elif is_container(operation) and len(calls.get(id(operation), ())) == 1:
            direct = all(isinstance(parent, keras.layers.InputLayer) for parent in parents)
            members.append((operation, calls[id(operation)][0].output_tensors, direct))
    return members


def non_finite_members(model, x, rows, batch_size=256):
    """The members of a composition ``model`` whose outputs are non-finite on ``rows`` of ``x``.

    Members are the nested models that no other nested model feeds (``ek.ensemble``'s
    members, ``ek.stack``'s members without its meta-learner); a model wrapping ONE
    composition (a calibrated ensemble) is searched inside. Each runs op by op on
    those rows (see :func:`non_finite_rows`).

    Args:
        model: a ``keras.Model``.
        x: its inputs (an array, or a dict/list of arrays).
        rows: ``(n,)`` bool array or row indices of ``x``.
        batch_size: rows per call.

    Returns:
        ``[(label, count)]``: ``"member 1 ('mlp_1')"`` and on how many of the rows it is
        non-finite; empty when ``model`` holds no nested members (or none is non-finite).
    """
    rows = np.flatnonzero(rows) if np.asarray(rows).dtype == bool else np.asarray(rows)
    members = _source_members(model)
    if not members or not rows.size:
        return []
    if len(members) == 1 and members[0][2]:
        found = non_finite_members(members[0][0], x, rows, batch_size)
        if found:
            return found
    graph = getattr(model, "_functional", None) or model  # Sequential's functional form
    inputs = getattr(graph, "_inputs_struct", None)  # as the model takes them: one, a dict or a list
    inputs = model.inputs if inputs is None else inputs
    probe = keras.Model(inputs, [tensor for _, tensors, _ in members for tensor in tensors])
    outputs, found, start = keras.tree.flatten(_eager(probe, x, rows, batch_size)), [], 0
    for index, (member, tensors, _) in enumerate(members):
        count = int(_rows_not_finite(outputs[start:start + len(tensors)]).sum())
        start += len(tensors)
        if count:
            found.append((member_label(index, member), count))
    return found


def _rows_phrase(count):
    return f"{count} row{'' if count == 1 else 's'}"


def check_finite_members(models, x, predictions, what, param="x", labels=None, batch_size=256):
    """Refuse data on which a member's outputs are non-finite: one ``ValueError`` naming the member.

    What learns from data (``calibrate``, ``optimize_weights``, ``select``, ``stack``)
    cannot fit on NaN, and must not fit on rows a traced graph coerced to numbers
    (see :func:`non_finite_rows`).

    Args:
        models: the members (``keras.Model``).
        x: their inputs.
        predictions: per member, its predictions on ``x`` (rows first; e.g.
            ``stacked[:, k]`` of ``MemberSet.predict_stacked``).
        what: the function, as errors name it (``"optimize_weights"``).
        param: the argument holding ``x``.
        labels: how errors name the members (default ``"member 1 ('name')"``).
        batch_size: rows per call.

    Example:
        >>> import keras
        >>> m = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)], name="m")
        >>> x = np.array([[0.0, 1.0], [np.nan, 1.0]], "float32")
        >>> check_finite_members([m], x, [m.predict(x, verbose=0)], "fit")
        Traceback (most recent call last):
        ...
        ValueError: fit: member 0 ('m') outputs non-finite values on 1 row of x (first: row 1); fit needs finite member outputs: drop or repair those rows (NaN or inf inputs?) or fix the member.
    """
    labels = labels or [member_label(index, model) for index, model in enumerate(models)]
    found = [(label, model, rows) for label, model, prediction in zip(labels, models, predictions, strict=True)
             if (rows := non_finite_rows(model, x, prediction, batch_size)).any()]
    if not found:
        return
    label, model, rows = found[0]
    inner = non_finite_members(model, x, rows, batch_size)
    via = f", from its {', '.join(name for name, _ in inner)}" if inner else ""
    also = f" (also {', '.join(other for other, _, _ in found[1:])})" if len(found) > 1 else ""
    raise ValueError(
        f"{what}: {label} outputs non-finite values on {_rows_phrase(int(rows.sum()))} of {param} "
        f"(first: row {int(np.flatnonzero(rows)[0])}){via}{also}; {what} needs finite member outputs: "
        "drop or repair those rows (NaN or inf inputs?) or fix the member."
    )


def _finite_outputs(model, x, outputs, param, batch_size):
    """``(outputs on the finite rows, kept rows or None, non-finite count)``; warns when rows are dropped."""
    bad = non_finite_rows(model, x, outputs, batch_size)
    count = int(bad.sum())
    if not count:
        return outputs, None, 0
    members = non_finite_members(model, x, bad, batch_size)
    source = ", ".join(f"{label} ({_rows_phrase(n)})" for label, n in members) or f"model {model.name!r}"
    where = (f"{count} of {len(bad)} rows of {param} have non-finite outputs "
             f"(first: row {int(np.flatnonzero(bad)[0])}), from {source}")
    if count == len(bad):
        raise ValueError(f"evaluate: {where}; there is nothing to score.")
    warnings.warn(f"evaluate: {where}; the metrics are over the {len(bad) - count} finite rows "
                  f"(non_finite_rows={count}).", UserWarning, stacklevel=3)
    return {name: value[~bad] for name, value in outputs.items()}, ~bad, count


# --- evaluate: predict once, score every output by its task ----------------------------------

UNCERTAINTY_KEYS = ("predictive_entropy", "expected_entropy", "mutual_information", "disagreement", "std",
                    "variance", "aleatoric", "epistemic")


def predict_outputs(model, x, batch_size=256):
    """``{output name: numpy array}`` of ``model`` on ``x``, batched as ``_data.predict``.

    Single-output models give one entry named after their output layer; dict-output
    models (``ensemble(..., uncertainty=True)``, several heads) one per key.

    Example:
        >>> import keras
        >>> m = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1, name="value")])
        >>> {name: a.shape for name, a in predict_outputs(m, np.ones((3, 2))).items()}
        {'value': (3, 1)}
    """
    return named_outputs(model, predict(model, x, batch_size))


def named_outputs(model, raw):
    """``model``'s raw outputs (numpy, in its output structure) as ``{output name: array}``."""
    arrays = keras.tree.flatten(raw)
    names = sorted(map(str, raw)) if isinstance(raw, dict) else output_names(model)
    if len(names) != len(arrays):
        names = [f"output_{index}" for index in range(len(arrays))]
    return dict(zip(names, arrays, strict=True))


def _group_outputs(names):
    """``{prediction output: {uncertainty key: output name}}``.

    ``ensemble(..., uncertainty=True)`` names them ``"prediction"`` and
    ``"mutual_information"`` (one output) or ``NAME`` and ``NAME_mutual_information``.
    """
    present, owners = set(names), {}
    for name in names:
        if "prediction" in present and name in UNCERTAINTY_KEYS:
            owners[name] = ("prediction", name)
            continue
        for key in UNCERTAINTY_KEYS:
            base = name[: -len(key) - 1]
            if name.endswith(f"_{key}") and base in present:
                owners[name] = (base, key)
                break
    groups = {name: {} for name in names if name not in owners}
    for name, (base, key) in owners.items():
        groups[base][key] = name
    return groups


def _per_output(value, names, param):
    if not isinstance(value, dict):
        return [value] * len(names)
    unknown = sorted(set(value) - set(names))
    if unknown:
        raise ValueError(f"{param} names output {unknown[0]!r}, but the outputs are {names}.")
    return [value.get(name) for name in names]


def _output_task(model, index, raw, label):
    """The task of output ``index``; a graph-less model's 2-D output reads as multiclass (0.1)."""
    try:
        return detect_task(model, index, label=label)
    except ValueError:
        if raw.ndim == 2 and raw.shape[1] >= 2 and not getattr(model, "outputs", None):
            return "multiclass"
        raise


def _to_probs(raw, task, kind):
    """Raw outputs as probabilities: softmax (multiclass) or sigmoid of logits; values as they are."""
    raw = np.asarray(raw, dtype="float64")
    if task == "regression" or kind == "probs":
        return raw
    if task == "multiclass":
        raw = np.exp(raw - raw.max(axis=-1, keepdims=True))
        return raw / raw.sum(axis=-1, keepdims=True)
    return expit(raw)


def _score_output(outputs, extras, name, task, y, ood_outputs, sample_weight=None):
    """One output's metrics (and ``"ood"`` when ``ood_outputs`` is given).

    A regression output's predictive σ is ``sqrt(variance)`` when the model outputs a
    (mixture's total) ``"variance"``, else its ``"std"``.
    """
    std = outputs[extras["std"]] if "std" in extras else None
    if "variance" in extras:
        std = np.sqrt(np.maximum(np.asarray(outputs[extras["variance"]], dtype="float64"), 0.0))
    result = score_task(outputs[name], y, task, std=std, sample_weight=sample_weight)
    if ood_outputs is None:
        return result
    if task == "regression":
        spread = [key for key in ("std", "variance") if key in extras]
        if not spread:
            raise ValueError("x_ood on a regression output needs the model's 'std' output "
                             "(ensemble(..., task='regression', uncertainty=True)) or 'variance' output "
                             "(ensemble(..., variance=...)).")
        in_scores = {key: _per_sample(outputs[extras[key]], np.mean) for key in spread}
        out_scores = {key: _per_sample(ood_outputs[extras[key]], np.mean) for key in spread}
    else:
        mi = extras.get("mutual_information")
        in_scores = ood_scores(outputs[name], task, outputs[mi] if mi else None)
        out_scores = ood_scores(ood_outputs[name], task, ood_outputs[mi] if mi else None)
    result["ood"] = {key: ood_detection(in_scores[key], out_scores[key]) for key in in_scores}
    return result


def evaluate(model, x, y=None, task=None, output_kind=None, batch_size=None, x_ood=None, *,
             sample_weight=None, steps=None, verbose=0):
    """Score a model on ``(x, y)`` with its task's metrics (see the module docstring).

    Multiclass classifiers give exactly ``{"accuracy", "nll", "brier", "ece"}``
    (ECE with 15 bins). Binary outputs add ``"auroc"``; multilabel outputs give the
    macro means and ``"per_label"``; regression gives ``{"rmse", "mae"}`` and, when
    the model also outputs ``"std"`` (``ensemble(..., uncertainty=True)``) or a
    ``"variance"`` (``ensemble(..., variance=...)``: σ² is the mixture's total
    variance, preferred), ``"nll"`` (Gaussian) and ``"coverage"`` (±1.96σ).

    Args:
        model: a ``keras.Model``. Its task per output is read from the layer producing
            it (``ensemblekit._outputs.detect_task``); outputs of
            ``ensemble(..., uncertainty=True)`` are paired with their prediction.
        x: anything ``model.predict`` accepts: arrays, a dict/list of arrays (several
            inputs), a ``tf.data.Dataset`` of ``(x, y)``, a ``keras.utils.PyDataset``, a
            generator (``steps=`` when endless); read once, batch by batch, the
            predictions and labels kept (never the inputs). Rows on which the outputs are
            non-finite are counted (``"non_finite_rows"``) and left out of the metrics,
            with a warning.
        y: labels or values (for several prediction outputs a dict by output name);
            ``None`` when ``x`` is a dataset that yields them.
        task: ``None`` (detect), one task, or ``{output name: task}``; needed for
            linear outputs (binary logits, regression).
        output_kind: ``"logits"`` or ``"probs"`` (or a dict by output name) when the
            final softmax/sigmoid cannot be detected.
        batch_size: rows per prediction batch for arrays (default 256); datasets keep theirs.
        x_ood: out-of-distribution inputs (any kind of data, as ``x``): adds ``"ood"``: for each score of
            :func:`ood_scores` (``"max_prob"``, ``"entropy"``, and
            ``"mutual_information"`` when the model outputs it; ``"std"`` and/or
            ``"variance"`` for regression)
            ``{"auroc", "aupr", "fpr95"}`` with the OOD samples as positives.
        sample_weight: per-row weights for arrays (a dataset yields its own as ``(x, y,
            sample_weight)``): every metric becomes its weighted version (ECE's bins by
            weight, AUROC the weighted ROC area). The OOD scores are unweighted.
        steps: batches to read from ``x`` (required when it is endless).
        verbose: 1 shows Keras' progress bar over the batches.

    Returns:
        The metric dict of the one prediction output, or ``{output name: metric dict}``.
        Rows on which the model's outputs are NaN or inf are not scored: the metrics
        are over the finite rows, each metric dict then holds ``"non_finite_rows"`` (how
        many rows of ``x`` were left out; ``"non_finite_ood_rows"`` for ``x_ood``) and a
        ``UserWarning`` names the count, the first row and the members of a composition
        that are non-finite there (else the model). Rows whose inputs are non-finite are
        run again op by op, since TensorFlow's fused CPU kernels can turn NaN into 0
        (:func:`non_finite_rows`). No finite row at all: ``ValueError``.

    Example:
        >>> import keras, numpy as np
        >>> m = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, activation="softmax")])
        >>> sorted(evaluate(m, np.zeros((5, 4)), np.zeros(5, dtype=int)))
        ['accuracy', 'brier', 'ece', 'nll']
        >>> b = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1, activation="sigmoid")])
        >>> sorted(evaluate(b, np.eye(4), [0, 1, 0, 1], x_ood=np.ones((3, 4)))["ood"])
        ['entropy', 'max_prob']
    """
    label = f"Model {getattr(model, 'name', '?')!r}"
    data = collect([model], x, y, sample_weight, batch_size=batch_size, steps=steps, function="evaluate",
                   needs_labels=True, verbose=verbose)
    batch_size = batch_size or 256
    outputs, kept, dropped = _finite_outputs(model, data, named_outputs(model, data.outputs[0]), "x",
                                             batch_size)
    names, groups = list(outputs), _group_outputs(list(outputs))
    predictions = list(groups)
    tasks, kinds = check_task(task, predictions), _per_output(output_kind, predictions, "output_kind")
    targets = {name: _rows_of(target, kept) for name, target in _targets(data.y, predictions, label).items()}
    weights = None if data.sample_weight is None else _rows_of(data.sample_weight, kept)
    ood_outputs, ood_dropped = None, 0
    if x_ood is not None:
        ood = collect([model], x_ood, batch_size=batch_size, function="evaluate", argument="x_ood")
        ood_outputs, _, ood_dropped = _finite_outputs(model, ood, named_outputs(model, ood.outputs[0]),
                                                      "x_ood", batch_size)
    counts = {"non_finite_rows": dropped, "non_finite_ood_rows": ood_dropped}
    results = {}
    for name, output_task, kind in zip(predictions, tasks, kinds, strict=True):
        index = names.index(name)
        output_task = output_task or _output_task(model, index, outputs[name], label)
        kind = kind or detect_output_kind(model, index)
        converted = {**outputs, name: _to_probs(outputs[name], output_task, kind)}
        if ood_outputs is not None:
            ood_outputs = {**ood_outputs, name: _to_probs(ood_outputs[name], output_task, kind)}
        try:
            results[name] = _score_output(converted, groups[name], name, output_task, targets[name],
                                          ood_outputs, weights)
        except ValueError as error:
            raise ValueError(f"{label}, output {name!r} ({output_task}, shape "
                             f"{outputs[name].shape}): {error}") from None
        results[name].update({key: count for key, count in counts.items() if count})
    return results[predictions[0]] if len(predictions) == 1 else results


def _rows_of(target, kept):
    """``target`` on the ``kept`` rows (all when ``None``; a target of another length is left to the checks)."""
    if kept is None:
        return target
    target = np.asarray(target)
    return target[kept] if target.ndim and len(target) == len(kept) else target


def _targets(y, predictions, label):
    if len(predictions) == 1:
        return {predictions[0]: y[predictions[0]] if isinstance(y, dict) and predictions[0] in y else y}
    if not isinstance(y, dict) or set(y) != set(predictions):
        given = sorted(y) if isinstance(y, dict) else type(y).__name__
        raise ValueError(f"{label} has outputs {predictions}; y must be a dict with exactly those "
                         f"keys, got {given}.")
    return y


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


def register_cli(subparsers):
    """Add ``ensemblekit evaluate MODEL --data D [--image-size H W] [--json]``.

    Example:
        >>> import argparse
        >>> parser = argparse.ArgumentParser()
        >>> register_cli(parser.add_subparsers())
        >>> args = parser.parse_args(["evaluate", "m.keras", "--data", "images/", "--image-size", "64", "64"])
        >>> args.model, args.data, args.image_size
        ('m.keras', 'images/', [64, 64])
    """
    parser = subparsers.add_parser(
        "evaluate", help="score a model on labelled data (its task's metrics)",
        description="Score one .keras/.h5 model (or SavedModel folder) on labelled data and print its "
                    "metrics; the data is streamed, never materialised.")
    parser.add_argument("model", help="the model: a .keras/.h5 file or a SavedModel folder")
    parser.add_argument("--data", required=True,
                        help="mnist1d, digits, an .npz file (x_val/y_val or x/y), a folder of images in "
                             "class subfolders, or a folder written by tf.data.Dataset.save")
    parser.add_argument("--image-size", type=int, nargs=2, metavar=("HEIGHT", "WIDTH"), default=None,
                        help="size image folders are read at (default: the model's input size)")
    parser.add_argument("--batch-size", type=int, default=None, help="rows per batch for arrays")
    parser.add_argument("--json", action="store_true", help="print the metrics as JSON")
    parser.set_defaults(run=_run_cli)


def _run_cli(args):
    import json

    from ensemblekit._io import load_model
    from ensemblekit.datasets import load_data_spec

    model = load_model(args.model, label="model")
    shape = tuple(model.inputs[0].shape[1:]) if len(model.inputs) == 1 else None
    x, y = load_data_spec(args.data, shape, split="test", datasets=True, image_size=args.image_size)
    scores = evaluate(model, x, y, batch_size=args.batch_size)
    if args.json:
        print(json.dumps(scores, indent=2, sort_keys=True, default=float))
    else:
        for name, value in scores.items():
            print(f"{name:<20} {value:.4f}" if isinstance(value, numbers.Real) else f"{name:<20} {value}")
    return 0
