"""Learning from validation data: ensemble weights, greedy selection, temperature."""

from __future__ import annotations

import dataclasses

import keras
import numpy as np
from scipy import optimize, special

from ensemblekit import metrics
from ensemblekit._validate import check_choice, check_labels
from ensemblekit.compose._members import MemberSet
from ensemblekit.compose.layers import TemperatureScaling

SCORED_METRICS = ("nll", "brier", "accuracy", "ece")


def validation_log_probs(models, x_val, y_val, what, min_count=2):
    """Validated members, their log-probabilities on ``x_val`` ``(n, K, classes)`` and labels.

    Shared by ``optimize_weights``, ``select`` and ``ensemblekit.prune.select_members``.
    """
    members = MemberSet(models, min_count=min_count, what=what)
    log_probs = members.predict_log_probs(x_val)
    y = check_labels(y_val, log_probs.shape[0], members.num_classes, param="y_val")
    return members, log_probs, y


def metric_loss(metric):
    """``loss(probs, y)``: lower is better, whatever the metric."""
    check_choice(metric, SCORED_METRICS, "metric")
    fn = metrics.METRICS[metric]
    return (lambda p, y: -fn(p, y)) if metric in metrics.HIGHER_IS_BETTER else fn


def optimize_weights(models, x_val, y_val, metric="nll"):
    """Find the member weights (on the simplex) that minimise ``metric`` on validation data.

    The weighted mean of member probabilities is scored; weights are
    ``softmax(θ)`` and ``θ`` is optimised with L-BFGS (scipy), so they stay
    non-negative and sum to one. ``"nll"`` and ``"brier"`` are smooth; for
    ``"accuracy"`` and ``"ece"`` a Nelder-Mead search is used instead.

    Args:
        models: list of members (models or paths).
        x_val, y_val: validation data the members were not trained on.
        metric: ``"nll"`` (default), ``"brier"``, ``"accuracy"`` or ``"ece"``.

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
    loss = metric_loss(metric)
    _, log_probs, y = validation_log_probs(models, x_val, y_val, "optimize_weights")
    probs = np.exp(log_probs)

    def objective(theta):
        return loss(np.einsum("k,nkc->nc", special.softmax(theta), probs), y)

    theta0 = np.zeros(probs.shape[1])
    smooth = metric in ("nll", "brier")
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


def greedy_selection(probs, y, loss, steps=None, costs=None, limit=None):
    """Forward ensemble selection with replacement (Caruana et al., 2004), optionally under a cost limit.

    Caruana, Niculescu-Mizil, Crew & Ksikes, "Ensemble Selection from
    Libraries of Models", ICML 2004. Starting from the empty ensemble, each
    step adds the member (possibly one already chosen) whose addition gives the
    lowest ``loss`` of the averaged probabilities; ties go to the lower index.
    After ``steps`` steps the prefix with the lowest loss is returned, so extra
    steps never hurt. With ``costs`` and ``limit``, a member's cost is paid the
    first time it is chosen (repeats are free), and only members whose cost
    still fits ``limit`` are candidates.

    Args:
        probs: ``(n, K, classes)`` member probabilities on validation data.
        y: ``(n,)`` integer labels.
        loss: ``loss(probs, y)`` of ``(n, classes)`` probabilities, lower is
            better (e.g. :func:`metric_loss`).
        steps: greedy steps (default ``2 * K``).
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
    steps = _check_steps(2 * count if steps is None else steps, "steps")
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


def select(models, x_val, y_val, size=None, metric="nll"):
    """Greedy forward ensemble selection with replacement (Caruana et al., 2004).

    Starting from the empty ensemble, each step adds the member (possibly one
    already chosen) whose addition gives the best validation ``metric`` of the
    averaged probabilities. After ``size`` steps (default ``2 * K``) the prefix
    with the best score is returned, so extra steps never hurt. The selection
    itself is :func:`greedy_selection` (no cost limit).

    Args:
        models: list of members.
        x_val, y_val: validation data.
        size: number of greedy steps.
        metric: ``"nll"``, ``"brier"``, ``"accuracy"`` or ``"ece"``.

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
    loss = metric_loss(metric)
    _, log_probs, y = validation_log_probs(models, x_val, y_val, "select", min_count=1)
    size = None if size is None else _check_steps(size, "size")
    return greedy_selection(np.exp(log_probs), y, loss, size).chosen


def fit_temperature(log_probs, y):
    """The temperature ``T`` minimising the NLL of ``softmax(log_probs / T)``."""

    def objective(log_t):
        scaled = special.log_softmax(log_probs / np.exp(log_t), axis=1)
        return -np.mean(scaled[np.arange(len(y)), y])

    result = optimize.minimize_scalar(objective, bounds=(np.log(0.01), np.log(100.0)), method="bounded")
    return float(np.exp(result.x))


def calibrate(model, x_val, y_val, output_kind=None, name=None):
    """Temperature scaling (Guo et al., 2017): fit one ``T`` on validation NLL.

    Args:
        model: a classifier (any composed model included) or a path.
        x_val, y_val: validation data.
        output_kind: ``"logits"``/``"probs"`` if detection of a final softmax is not enough.
        name: name of the returned model (default ``"<model>_calibrated"``).

    Returns:
        A ``keras.Model`` whose output is ``softmax(log p / T)``; ``T`` is stored
        in its ``TemperatureScaling`` layer (``model.layers[-1].temperature``).
        Accuracy is unchanged (the argmax does not move).

    Example:
        >>> import keras, numpy as np
        >>> import ensemblekit as ek
        >>> m = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
        >>> cal = ek.calibrate(m, np.random.rand(30, 4), np.arange(30) % 3)
        >>> cal.layers[-1].temperature > 0
        True
    """
    members = MemberSet([model], output_kind=output_kind, min_count=1, what="calibrate")
    model, kind = members.models[0], members.output_kinds[0]
    log_probs = members.predict_log_probs(x_val)[:, 0]
    y = check_labels(y_val, log_probs.shape[0], members.num_classes, param="y_val")
    temperature = fit_temperature(log_probs, y)
    inputs = members.shared_input()
    scaled = TemperatureScaling(temperature, kind=kind, name="temperature_scaling")(model(inputs))
    return keras.Model(inputs, scaled, name=name or f"{model.name}_calibrated")
