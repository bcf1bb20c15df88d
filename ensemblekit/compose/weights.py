"""Learning from validation data: ensemble weights, greedy selection, temperature."""

from __future__ import annotations

import keras
import numpy as np
from scipy import optimize, special

from ensemblekit import metrics
from ensemblekit._validate import check_choice, check_labels
from ensemblekit.compose._members import Members
from ensemblekit.compose.layers import TemperatureScaling

SCORED_METRICS = ("nll", "brier", "accuracy", "ece")


def validation_log_probs(models, x_val, y_val, what, min_count=2):
    """Validated members, their log-probabilities on ``x_val`` ``(n, K, classes)`` and labels.

    Shared by ``optimize_weights``, ``select`` and ``ensemblekit.prune.members``.
    """
    members = Members(models, min_count=min_count, what=what)
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


def select(models, x_val, y_val, size=None, metric="nll"):
    """Greedy forward ensemble selection with replacement (Caruana et al., 2004).

    Starting from the empty ensemble, each step adds the member (possibly one
    already chosen) whose addition gives the best validation ``metric`` of the
    averaged probabilities. After ``size`` steps (default ``2 * K``) the prefix
    with the best score is returned, so extra steps never hurt.

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
    probs = np.exp(log_probs)
    count = probs.shape[1]
    size = 2 * count if size is None else size
    if not isinstance(size, (int, np.integer)) or size < 1:
        raise ValueError(f"size must be a positive integer, got {size!r}.")
    running = np.zeros_like(probs[:, 0])
    chosen, scores = [], []
    for step in range(1, size + 1):
        candidates = [loss((running + probs[:, k]) / step, y) for k in range(count)]
        best = int(np.argmin(candidates))
        chosen.append(best)
        scores.append(candidates[best])
        running += probs[:, best]
    return chosen[: int(np.argmin(scores)) + 1]


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
    members = Members([model], output_kind=output_kind, min_count=1, what="calibrate")
    model, kind = members.models[0], members.kinds[0]
    log_probs = members.predict_log_probs(x_val)[:, 0]
    y = check_labels(y_val, log_probs.shape[0], members.num_classes, param="y_val")
    temperature = fit_temperature(log_probs, y)
    inputs = members.shared_input()
    scaled = TemperatureScaling(temperature, kind=kind, name="temperature_scaling")(model(inputs))
    return keras.Model(inputs, scaled, name=name or f"{model.name}_calibrated")
