"""Learning from validation data: ensemble weights, greedy selection, temperature."""

from __future__ import annotations

import dataclasses
import functools

import keras
import numpy as np
from scipy import optimize, special

from ensemblekit import metrics
from ensemblekit._data import collect, refuse_sample_weight
from ensemblekit._io import load_members
from ensemblekit._outputs import output_names
from ensemblekit._validate import check_choice, check_labels, check_targets, member_label
from ensemblekit.compose._members import MemberSet, fresh_inputs
from ensemblekit.compose.layers import PlattScaling, StdScaling, TemperatureScaling

REGRESSION_METRICS = {"mse": lambda v, y: float(np.mean((v - y) ** 2)),
                      "rmse": lambda v, y: float(np.sqrt(np.mean((v - y) ** 2))),
                      "mae": lambda v, y: float(np.mean(np.abs(v - y)))}
# What learning from validation data can score, per task (first: the default). Binary and
# multilabel members are scored as ek.evaluate scores them: the binary metrics of the positive-class
# probability (per label, then the unweighted mean over labels, sklearn's average="macro").
TASK_METRICS = {
    "multiclass": ("nll", "brier", "accuracy", "ece"),
    "binary": ("nll", "brier", "accuracy", "ece", "auroc"),
    "multilabel": ("nll", "brier", "accuracy", "ece", "auroc"),
    "regression": tuple(REGRESSION_METRICS),
}
SCORED_METRICS = TASK_METRICS["multiclass"]


def validation_predictions(models, x, y, what, min_count=2, task=None, batch_size=None, steps=None):
    """Validated members, their predictions on ``x`` ``(n, K, ...)``, targets and the task.

    ``x`` is any data Keras reads (``ensemblekit._data``), read once; labels come
    from ``y`` or from the dataset.

    The predictions are in :func:`task_loss`'s form: class probabilities
    ``(n, K, classes)`` and integer labels (multiclass); positive-class
    probabilities ``(n, K)`` and 0/1 labels (binary); per-label probabilities
    ``(n, K, labels)`` and 0/1 targets ``(n, labels)`` (multilabel); values and
    targets of the output's shape (regression). Several outputs are refused with
    one clear error.

    Example:
        >>> import keras
        >>> ms = [keras.Sequential([keras.Input((4,)), keras.layers.Dense(1, "sigmoid")]) for _ in range(3)]
        >>> _, p, y, task = validation_predictions(ms, np.zeros((5, 4)), [0, 1, 0, 1, 1], "a test")
        >>> p.shape, y.shape, task
        ((5, 3), (5,), 'binary')
    """
    members = MemberSet(models, min_count=min_count, what=what, task=task)
    if not members.single_output:
        raise ValueError(f"{what} supports members with one output; {members.labels[0]} "
                         f"has outputs {members.output_names}.")
    stacked, data = members.collect_stacked(x, y, batch_size=batch_size, steps=steps, function=what,
                                            needs_labels=True)
    refuse_sample_weight(data, what)
    metrics.check_finite_members(members.models, data, [stacked[:, k] for k in range(len(members))], what,
                                 "x", members.labels)
    y = check_targets(data.y, stacked.shape[0], stacked.shape[2:], members.task, param="y")
    if members.task == "regression":
        return members, stacked, y, "regression"
    if members.task == "multiclass":
        return members, np.exp(stacked), y, "multiclass"
    p = special.expit(stacked)  # binary and multilabel members are canonically logits
    return members, p[..., 0] if members.task == "binary" else p, y, members.task


def check_metric(metric, task, choices=None):
    """``metric`` if it is one of ``choices`` (default ``TASK_METRICS[task]``), else one ``ValueError``
    naming the metric, the task and the choices.

    Example:
        >>> check_metric("mse", "binary")
        Traceback (most recent call last):
        ...
        ValueError: Unknown metric 'mse' for binary members; expected one of 'nll', 'brier', 'accuracy', 'ece', 'auroc'.
    """
    check_choice(task, tuple(TASK_METRICS), "task")
    choices = TASK_METRICS[task] if choices is None else choices
    if metric not in choices:
        options = ", ".join(map(repr, choices))
        raise ValueError(f"Unknown metric {metric!r} for {task} members; expected one of {options}.")
    return metric


def task_loss(metric, task):
    """``(metric, loss)``: ``loss(predictions, y)`` of ``metric`` on ``task``'s predictions, lower is better.

    The one scoring rule of everything learned from validation data (weights,
    greedy and budgeted selection, the best member of a composition). Predictions
    are in :func:`validation_predictions`'s form: class probabilities
    ``(n, classes)`` (multiclass, :data:`ensemblekit.metrics.METRICS`); the
    positive-class probability ``(n,)`` (binary,
    :data:`ensemblekit.metrics.BINARY_METRICS`: Brier is ``mean((p - y)²)``, as
    ``ek.evaluate``); per-label probabilities ``(n, labels)`` (multilabel: each
    label's binary metric, averaged over labels as ``ek.evaluate``'s macro means);
    values (regression). Accuracy and AUROC are negated.

    Args:
        metric: one of ``TASK_METRICS[task]``; ``None``: the first (``"nll"``, or
            ``"mse"`` for regression).
        task: ``"multiclass"``, ``"binary"``, ``"multilabel"`` or ``"regression"``.

    Returns:
        ``(metric, loss)``, the metric's name (``None`` resolved) and the function.

    Example:
        >>> task_loss(None, "multilabel")[0]
        'nll'
        >>> task_loss("accuracy", "binary")[1](np.array([0.9, 0.2]), np.array([1, 1]))
        -0.5
        >>> loss = task_loss("auroc", "multilabel")[1]   # label 0 ranked right, label 1 wrong
        >>> loss(np.array([[0.9, 0.2], [0.1, 0.8]]), np.array([[1, 1], [0, 0]]))
        -0.5
    """
    check_choice(task, tuple(TASK_METRICS), "task")
    metric = TASK_METRICS[task][0] if metric is None else check_metric(metric, task)
    if task == "regression":
        return metric, REGRESSION_METRICS[metric]
    if task == "multiclass":
        fn = metrics.METRICS[metric]
    elif task == "binary":
        fn = metrics.BINARY_METRICS[metric]
    else:
        fn = functools.partial(_macro, metrics.BINARY_METRICS[metric])
    return metric, (lambda p, y: -fn(p, y)) if metric in metrics.HIGHER_IS_BETTER else fn


def _macro(fn, p, y):
    """The unweighted mean over labels (the last axis) of ``fn`` on each label (sklearn's ``"macro"``)."""
    p, y = np.asarray(p), np.asarray(y)
    return float(np.mean([fn(p[..., label], y[..., label]) for label in range(p.shape[-1])]))


def metric_loss(metric):
    """``loss(probs, y)`` of multiclass probabilities, lower is better: ``task_loss(metric, "multiclass")``'s.

    Example:
        >>> round(metric_loss("nll")(np.array([[0.5, 0.5]]), np.array([0])), 4)
        0.6931
    """
    return task_loss(metric, "multiclass")[1]


def optimize_weights(models, x, y=None, metric=None, task=None, *, batch_size=None, steps=None):
    """Find the member weights (on the simplex) that minimise ``metric`` on validation data.

    The weighted mean of member probabilities (values, for regression) is
    scored by :func:`task_loss`; weights are ``softmax(θ)`` and ``θ`` is
    optimised with L-BFGS (scipy), so they stay non-negative and sum to one.
    ``"nll"``, ``"brier"``, ``"mse"`` and ``"rmse"`` are smooth; for the others
    (``"accuracy"``, ``"ece"``, ``"auroc"``, ``"mae"``) a Nelder-Mead search is used instead.

    Args:
        models: list of members (models or paths).
        x: held-out data the members were not trained on: anything ``model.predict``
            accepts (arrays, a dict/list of arrays, a ``tf.data.Dataset`` of ``(x, y)``,
            a ``keras.utils.PyDataset``, a generator), read once.
        y: labels (0/1 targets of shape ``(n, labels)`` for multilabel members), or
            ``None`` when ``x`` yields them. Rows on which a member's
            outputs are NaN or inf are refused (``ValueError`` naming the member).
        metric: one of ``TASK_METRICS[task]``: ``"nll"`` (default for classifiers),
            ``"brier"``, ``"accuracy"`` or ``"ece"``, and ``"auroc"`` for binary and
            multilabel members (multilabel: each label's metric, averaged over labels);
            for regression ``"mse"`` (default), ``"rmse"`` or ``"mae"``.
        task: the members' task as in ``ek.ensemble`` (``None`` detects it);
            multiclass, binary, multilabel and regression are supported.
        batch_size: rows per batch for arrays (default 256); datasets keep theirs.
        steps: batches to read from ``x`` (required when it is endless).

    Returns:
        ``np.ndarray`` of shape ``(K,)``, non-negative, summing to one; pass it
        to ``ek.ensemble(models, "weighted", weights=...)``.

    Example:
        >>> import keras, numpy as np
        >>> import ensemblekit as ek
        >>> ms = [keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)]) for _ in range(2)]
        >>> w = ek.optimize_weights(ms, np.random.rand(20, 4), np.arange(20) % 3)
        >>> bool(np.isclose(w.sum(), 1.0))
        True
    """
    _, probs, y, task = validation_predictions(models, x, y, "optimize_weights", task=task,
                                               batch_size=batch_size, steps=steps)
    return fit_weights(probs, y, metric, task)


def fit_weights(probs, y, metric, task):
    """:func:`optimize_weights` on the members' predictions ``(n, K, ...)`` in :func:`task_loss`'s form."""
    metric, loss = task_loss(metric, task)

    def objective(theta):
        return loss(np.einsum("k,nk...->n...", special.softmax(theta), probs), y)

    theta0 = np.zeros(probs.shape[1])
    smooth = metric in ("nll", "brier", "mse", "rmse")
    result = optimize.minimize(objective, theta0, method="L-BFGS-B" if smooth else "Nelder-Mead")
    best = result.x if objective(result.x) <= objective(theta0) else theta0
    return special.softmax(best)


def _check_steps(steps, param):
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"{param} must be a positive integer, got {steps!r}.")
    return int(steps)


@dataclasses.dataclass
class GreedySelection:
    """The result of :func:`greedy_selection`.

    Attributes:
        chosen: member indices in the order they were added, with repeats
            (the best prefix of the greedy run).
        counts: ``(K,)`` int array, how often each member was chosen; the
            selected ensemble weights its members by these counts.
        score: loss of the chosen members' averaged probabilities.
    """

    chosen: list
    counts: np.ndarray
    score: float


def greedy_selection(probs, y, loss, size=None, costs=None, limit=None):
    """Forward ensemble selection with replacement (Caruana et al., 2004), optionally under a cost limit.

    Caruana, Niculescu-Mizil, Crew & Ksikes, "Ensemble Selection from
    Libraries of Models", ICML 2004. Starting from the empty ensemble, each
    step adds the member (possibly one already chosen) whose addition gives the
    lowest ``loss`` of the averaged probabilities; ties go to the lower index.
    After ``size`` steps the prefix with the lowest loss is returned, so extra
    steps never hurt. With ``costs`` and ``limit``, a member's cost is paid the
    first time it is chosen (repeats are free), and only members whose cost
    still fits ``limit`` are candidates.

    Args:
        probs: ``(n, K, ...)`` member predictions on validation data in
            :func:`task_loss`'s form (e.g. ``(n, K, classes)`` probabilities).
        y: the targets ``loss`` takes (e.g. ``(n,)`` integer labels).
        loss: ``loss(predictions, y)`` of the averaged ``(n, ...)`` predictions,
            lower is better (e.g. ``task_loss("nll", task)[1]``).
        size: greedy steps (default ``2 * K``).
        costs: ``None`` or ``(K,)`` positive costs of the members.
        limit: ``None`` (no limit) or the most the chosen members may cost in
            total, in the unit of ``costs``.

    Returns:
        A :class:`GreedySelection` (``chosen``, ``counts``, ``score``).

    Example:
        >>> y = np.array([0, 1])
        >>> probs = np.array([[[0.7, 0.3], [0.55, 0.45], [0.99, 0.01]],   # sample 0, members 0-2
        ...                   [[0.4, 0.6], [0.2, 0.8], [0.01, 0.99]]])     # sample 1
        >>> best = greedy_selection(probs, y, metric_loss("nll"))
        >>> np.flatnonzero(best.counts).tolist(), round(best.score, 3)   # member 2 alone
        ([2], 0.01)
        >>> cheap = greedy_selection(probs, y, metric_loss("nll"), costs=[1, 1, 4], limit=2)
        >>> np.flatnonzero(cheap.counts).tolist(), round(cheap.score, 3)  # member 2 does not fit
        ([0, 1], 0.41)
    """
    count = probs.shape[1]
    steps = _check_steps(2 * count if size is None else size, "size")
    costs, limit = _check_costs(count, costs, limit)
    running, counts = np.zeros_like(probs[:, 0]), np.zeros(count, dtype="int64")
    chosen, scores, paid = [], [], 0.0
    for step in range(1, steps + 1):
        candidates = [k for k in range(count) if counts[k] or paid + costs[k] <= limit]
        losses = [loss((running + probs[:, k]) / step, y) for k in candidates]
        best = candidates[int(np.argmin(losses))]
        paid += 0.0 if counts[best] else costs[best]
        counts[best] += 1
        chosen.append(best)
        scores.append(min(losses))
        running += probs[:, best]
    chosen = chosen[: int(np.argmin(scores)) + 1]
    return GreedySelection(chosen, np.bincount(chosen, minlength=count), float(min(scores)))


def _check_costs(count, costs, limit):
    """``(costs, limit)`` as a ``(K,)`` array and a float (zeros and infinity when there is no limit)."""
    if limit is None:
        return np.zeros(count), np.inf
    if costs is None:
        raise ValueError("limit needs costs: one cost per member.")
    costs = np.asarray(costs, dtype="float64")
    if costs.shape != (count,):
        raise ValueError(f"costs has shape {costs.shape} but there are {count} members.")
    if costs.min() > limit * (1 + 1e-9):
        raise ValueError(f"no member fits limit={limit:g}: the cheapest costs {costs.min():g}.")
    return costs, float(limit) * (1 + 1e-9)  # budget x mean cost may round just below the sum it allows


def select(models, x, y=None, size=None, metric=None, task=None, *, batch_size=None, steps=None):
    """Greedy forward ensemble selection with replacement (Caruana et al., 2004).

    Starting from the empty ensemble, each step adds the member (possibly one
    already chosen) whose addition gives the best validation ``metric`` of the
    averaged probabilities (:func:`task_loss`). After ``size`` steps (default
    ``2 * K``) the prefix with the best score is returned, so extra steps never
    hurt. The selection itself is :func:`greedy_selection` (no cost limit).

    Args:
        models: list of members.
        x: held-out data the members were not trained on: anything ``model.predict``
            accepts (arrays, a dict/list of arrays, a ``tf.data.Dataset`` of ``(x, y)``,
            a ``keras.utils.PyDataset``, a generator), read once.
        y: labels (0/1 targets of shape ``(n, labels)`` for multilabel members), or
            ``None`` when ``x`` yields them. Rows on which a member's
            outputs are NaN or inf are refused (``ValueError`` naming the member).
        size: number of greedy steps.
        metric: as in :func:`optimize_weights`: one of ``TASK_METRICS[task]``
            (default ``"nll"``, or ``"mse"`` for regression).
        task: the members' task as in ``ek.ensemble`` (``None`` detects it);
            multiclass, binary, multilabel and regression are supported.
        batch_size: rows per batch for arrays (default 256); datasets keep theirs.
        steps: batches to read from ``x`` (required when it is endless).

    Returns:
        ``list[int]`` of member indices, with repeats; weights of the selected
        ensemble are the counts (``np.bincount(indices, minlength=K)``).

    Example:
        >>> import keras, numpy as np
        >>> import ensemblekit as ek
        >>> ms = [keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)]) for _ in range(3)]
        >>> chosen = ek.select(ms, np.random.rand(20, 4), np.arange(20) % 3, size=4)
        >>> 1 <= len(chosen) <= 4
        True
    """
    _, probs, y, task = validation_predictions(models, x, y, "select", min_count=1, task=task,
                                               batch_size=batch_size, steps=steps)
    _, loss = task_loss(metric, task)
    size = None if size is None else _check_steps(size, "size")
    return greedy_selection(probs, y, loss, size).chosen


def fit_temperature(log_probs, y):
    """The temperature ``T`` minimising the NLL of ``softmax(log_probs / T)``."""

    def objective(log_t):
        scaled = special.log_softmax(log_probs / np.exp(log_t), axis=1)
        return -np.mean(scaled[np.arange(len(y)), y])

    result = optimize.minimize_scalar(objective, bounds=(np.log(0.01), np.log(100.0)), method="bounded")
    return float(np.exp(result.x))


def fit_platt(logits, y):
    """``(a, b)`` minimising the Bernoulli NLL of ``sigmoid(a · logits + b)`` (Platt, 1999).

    The targets are Platt's smoothed labels, ``(N₊ + 1) / (N₊ + 2)`` for positives and
    ``1 / (N₋ + 2)`` for negatives: on a validation set the classifier separates
    perfectly, hard 0/1 targets drive the slope to infinity (overconfident on new data).
    """
    y = np.asarray(y, dtype="float64")
    positives, negatives = float(y.sum()), float(y.size - y.sum())
    targets = np.where(y > 0.5, (positives + 1.0) / (positives + 2.0), 1.0 / (negatives + 2.0))

    def objective(params):
        z = params[0] * logits + params[1]
        return float(np.mean(np.logaddexp(0.0, z) - targets * z))

    result = optimize.minimize(objective, np.array([1.0, 0.0]), method="L-BFGS-B")
    best = result.x if objective(result.x) <= objective(np.array([1.0, 0.0])) else np.array([1.0, 0.0])
    return float(best[0]), float(best[1])


def _fit_platt_layer(logits, y, per_label):
    """``(slope, bias)`` for :class:`PlattScaling`: floats, or per label (the last axis) lists."""
    if not per_label:
        return fit_platt(logits, y)
    labels = logits.shape[-1]
    logits, y = logits.reshape(-1, labels), np.asarray(y).reshape(-1, labels)  # dense maps: every position
    pairs = [fit_platt(logits[:, label], y[:, label]) for label in range(labels)]
    return [a for a, _ in pairs], [b for _, b in pairs]


def fit_std_scale(mean, std, y):
    """The ``s`` making ``(y - mean) / (s · std)`` unit-variance: ``s² = mean(((y - mean) / std)²)``.

    The Gaussian NLL's optimum for one scale of the predicted std (variance scaling).
    """
    std = np.asarray(std, dtype="float64")
    if np.any(std <= 0):
        raise ValueError("the model's std is zero on some validation samples (identical members?); "
                         "variance scaling needs a positive std.")
    z = (np.asarray(y, dtype="float64").reshape(std.shape) - mean) / std
    return float(np.sqrt(np.mean(z ** 2)))


def calibrate(model, x, y=None, output_kind=None, name=None, task=None, per_label=False, *,
              batch_size=None, steps=None):
    """Calibrate a model on validation data, per task.

    * multiclass: temperature scaling (Guo et al., 2017) — one ``T`` fitted on
      validation NLL; the output becomes ``softmax(log p / T)``; accuracy unchanged.
    * binary / multilabel: Platt scaling — ``sigmoid(a · logit(p) + b)`` with one
      ``(a, b)`` fitted on validation NLL, shared by the labels; with
      ``per_label=True`` one ``(a, b)`` per label (each label's own NLL), as
      scikit-learn calibrates a one-vs-rest classifier — worth it when every label
      has enough positives in the validation data, else a rare label's fit overfits.
    * regression: variance scaling of the std of a model made by
      ``ek.ensemble(..., task="regression", uncertainty=True)`` (or ``ek.pack``):
      ``std`` becomes ``s · std`` with ``s² = mean(((y - μ) / σ)²)``, so that
      ``±1.96 std`` covers about 95% of held-out targets when errors are Gaussian.
      A mixture of members that predict a variance (``ek.ensemble(..., variance=...)``)
      has its total ``variance`` scaled instead: ``s² · variance``, ``s`` fitted alike.

    Args:
        model: a model (any composed model included) or a path.
        x: held-out data the members were not trained on: anything ``model.predict``
            accepts (arrays, a dict/list of arrays, a ``tf.data.Dataset`` of ``(x, y)``,
            a ``keras.utils.PyDataset``, a generator), read once.
        y: labels (0/1 targets of shape ``(n, labels)`` for multilabel members), or
            ``None`` when ``x`` yields them. Rows on which the model's
            outputs are NaN or inf are refused (``ValueError`` naming the model, and its
            member when it is a composition).
        output_kind: ``"logits"``/``"probs"`` if detection of a final softmax/sigmoid is not enough.
        name: name of the returned model (default ``"<model>_calibrated"``).
        task: the model's task (``None`` detects it; a model whose outputs include
            ``"prediction"`` and ``"std"`` is a regression ensemble).
        per_label: multilabel (and binary) models: fit Platt scaling per label
            instead of once for all labels.
        batch_size: rows per batch for arrays (default 256); datasets keep theirs.
        steps: batches to read from ``x`` (required when it is endless).

    Returns:
        A ``keras.Model`` with the model's inputs and outputs, calibrated. The
        fitted value is in its last layer: ``TemperatureScaling.temperature``,
        ``PlattScaling.slope``/``.bias`` or ``StdScaling.scale`` (``s``; ``s²`` on a variance).

    Example:
        >>> import keras, numpy as np
        >>> import ensemblekit as ek
        >>> m = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
        >>> cal = ek.calibrate(m, np.random.rand(30, 4), np.arange(30) % 3)
        >>> cal.layers[-1].temperature > 0
        True
    """
    loaded = load_members([model], min_count=1, what="calibrate")[0]
    if {"prediction", "variance"} <= set(output_names(loaded)) and task in (None, "auto", "regression"):
        return _scale_std(loaded, x, y, name, key="variance", batch_size=batch_size, steps=steps)
    if {"prediction", "std"} <= set(output_names(loaded)) and task in (None, "auto", "regression"):
        return _scale_std(loaded, x, y, name, batch_size=batch_size, steps=steps)
    members = MemberSet([loaded], output_kind=output_kind, min_count=1, what="calibrate", task=task)
    if not members.single_output:
        raise ValueError(f"calibrate supports one output (or a regression ensemble's prediction and std); "
                         f"{members.labels[0]} has outputs {members.output_names}.")
    if members.task == "regression":
        raise ValueError(
            f"calibrate scales a regression ensemble's std; {members.labels[0]} outputs values only. "
            "Calibrate ek.ensemble(members, task='regression', uncertainty=True) instead."
        )
    if per_label and members.task not in ("binary", "multilabel"):
        raise ValueError(f"per_label=True applies to binary and multilabel models (Platt scaling per label); "
                         f"{members.labels[0]} is {members.task}.")
    model, kind = members.models[0], members.output_kinds[0]
    stacked, data = members.collect_stacked(x, y, batch_size=batch_size, steps=steps, function="calibrate",
                                            needs_labels=True)
    refuse_sample_weight(data, "calibrate")
    stacked = stacked[:, 0]
    metrics.check_finite_members([model], data, [stacked], "calibrate", "x", members.labels)
    inputs = members.shared_input()
    layer = calibration_layer(stacked, data.y, members.task, kind, per_label)
    return keras.Model(inputs, layer(model(inputs)), name=name or f"{model.name}_calibrated")


def calibration_layer(stacked, y, task, kind, per_label=False):
    """The fitted calibration layer of :func:`calibrate` from one model's outputs in canonical form.

    ``stacked`` is the model's log-probabilities (multiclass) or logits (binary,
    multilabel) on the validation data, as ``ensemblekit._tasks.MemberStack``
    gives them for one member; ``kind`` is what the model outputs.
    """
    if task == "multiclass":
        y = check_labels(y, stacked.shape[0], stacked.shape[-1], param="y")
        return TemperatureScaling(fit_temperature(stacked, y), kind=kind, name="temperature_scaling")
    # 0/1 targets of the output's shape, binary too (a (n, 1) column is fine)
    y = check_targets(y, stacked.shape[0], stacked.shape[1:], "multilabel", param="y")
    return PlattScaling(*_fit_platt_layer(stacked, y, per_label), kind=kind, name="platt_scaling")


def _scale_std(model, x, y, name, key="std", batch_size=None, steps=None):
    """Variance scaling of output ``key``: ``"std"`` becomes ``s · std``, ``"variance"`` ``s² · variance``."""
    data = collect([model], x, y, batch_size=batch_size, steps=steps, function="calibrate", needs_labels=True)
    refuse_sample_weight(data, "calibrate")
    out = data.outputs[0]
    metrics.check_finite_members([model], data, [out], "calibrate", "x", [member_label(0, model)])
    layer = std_scaling_layer(out, data.y, key)
    inputs = fresh_inputs(model)
    outputs = dict(model(inputs))
    outputs[key] = layer(outputs[key])
    return keras.Model(inputs, outputs, name=name or f"{model.name}_calibrated")


def std_scaling_layer(outputs, y, key="std"):
    """The fitted ``StdScaling`` of output ``key`` from a regression ensemble's ``outputs`` (a dict)."""
    std = np.sqrt(np.maximum(outputs[key], 0.0)) if key == "variance" else outputs[key]
    scale = fit_std_scale(np.asarray(outputs["prediction"], "float64"), std, y)
    return StdScaling(scale ** 2 if key == "variance" else scale, name=f"{key}_scaling")
