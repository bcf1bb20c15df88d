"""Ensemble member pruning: keep the members that matter under a size/latency budget."""

from __future__ import annotations

import dataclasses
import numbers

import keras
import numpy as np

from ensemblekit._graph import is_container
from ensemblekit._io import load_members
from ensemblekit._validate import check_choice
from ensemblekit.compose.weights import metric_loss, validation_log_probs
from ensemblekit.costs import model_costs

@dataclasses.dataclass
class MemberSelection:
    """The members kept by :func:`members`.

    Attributes:
        indices: kept member indices (ascending).
        weights: weight of each kept member (selection counts, normalised).
        cost: cost of each member (in the unit of ``cost=``), all members.
        used: fraction of the full ensemble's cost the kept members use.
        score: validation ``metric`` of the kept, weighted ensemble.
        full_score: validation ``metric`` of all members averaged equally.
        model: the kept members as one model (``ek.ensemble(..., "weighted")``),
            or the single kept member.
    """

    indices: list
    weights: list
    cost: list
    used: float
    score: float
    full_score: float
    model: keras.Model


def _member_models(ensemble_or_models):
    if isinstance(ensemble_or_models, keras.Model):
        nested = [layer for layer in ensemble_or_models.layers if is_container(layer)]
        if len(nested) < 2:
            raise ValueError(
                f"Model {ensemble_or_models.name!r} holds {len(nested)} nested member models; pass an "
                "ek.ensemble(...) model or a list of members."
            )
        return nested
    return load_members(ensemble_or_models, min_count=2, what="members()")


def _check_budget(budget):
    if isinstance(budget, bool) or not isinstance(budget, numbers.Real) or not 0 < budget <= 1:
        raise ValueError(f"budget must be a fraction of the full ensemble's cost in (0, 1], got {budget!r}.")
    return float(budget)


def _greedy(probs, y, costs, limit, loss, steps):
    """Caruana's forward selection with replacement, only adding members that fit ``limit``."""
    count = probs.shape[1]
    running = np.zeros_like(probs[:, 0])
    chosen, scores, used, paid = [], [], set(), 0.0
    for step in range(1, steps + 1):
        candidates = [k for k in range(count) if k in used or paid + costs[k] <= limit]
        if not candidates:
            break
        losses = [loss((running + probs[:, k]) / step, y) for k in candidates]
        best = candidates[int(np.argmin(losses))]
        if best not in used:
            used.add(best)
            paid += costs[best]
        chosen.append(best)
        scores.append(min(losses))
        running += probs[:, best]
    return chosen[: int(np.argmin(scores)) + 1], float(min(scores))


def members(ensemble_or_models, x_val, y_val, budget=0.5, cost="params", metric="nll", steps=None):
    """Keep the ensemble members that best fit a cost budget (Caruana et al., 2004).

    Greedy forward selection with replacement on validation data: each step
    adds the member (possibly one already kept, which costs nothing more) whose
    addition gives the best ``metric`` of the averaged probabilities, among the
    members whose cost still fits the budget; the best prefix is kept.

    Args:
        ensemble_or_models: an ``ek.ensemble(...)`` model (its nested members
            are used) or a list of members (models or paths).
        x_val, y_val: validation data the members were not trained on.
        budget: fraction of the full ensemble's total cost the kept members
            may use, in ``(0, 1]``.
        cost: ``"params"``, ``"macs"`` (per sample), ``"latency"`` (measured
            at batch 256 on this device) or one positive number per member.
        metric: ``"nll"``, ``"brier"``, ``"accuracy"`` or ``"ece"``.
        steps: greedy steps (default ``2 * K``).

    Returns:
        A :class:`MemberSelection` (``indices``, ``weights``, ``model``, scores, costs).

    Example:
        >>> import keras, numpy as np
        >>> ms = [keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)]) for _ in range(3)]
        >>> kept = members(ms, np.random.rand(20, 4), np.arange(20) % 3, budget=0.7)
        >>> len(kept.indices) <= 2
        True
    """
    from ensemblekit.compose.ensemble import ensemble

    models = _member_models(ensemble_or_models)
    budget = _check_budget(budget)
    loss = metric_loss(metric)
    costs = model_costs(models, cost)
    limit = budget * costs.sum()
    if costs.min() > limit:
        cheapest = int(np.argmin(costs))
        raise ValueError(
            f"budget={budget:g} allows a cost of {limit:g} but the cheapest member (member {cheapest}, "
            f"{models[cheapest].name!r}) costs {costs[cheapest]:g} {cost if isinstance(cost, str) else ''}."
        )
    member_set, log_probs, y = validation_log_probs(models, x_val, y_val, "members()")
    probs = np.exp(log_probs)
    steps = 2 * len(models) if steps is None else steps
    if not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}.")
    chosen, score = _greedy(probs, y, costs, limit, loss, steps)
    counts = np.bincount(chosen, minlength=len(models))
    indices = [int(i) for i in np.flatnonzero(counts)]
    weights = [float(counts[i] / counts.sum()) for i in indices]
    kept = [member_set.models[i] for i in indices]
    model = kept[0] if len(kept) == 1 else ensemble(
        kept, "weighted", weights=weights, output_kind=[member_set.kinds[i] for i in indices])
    return MemberSelection(indices, weights, costs.tolist(), float(costs[indices].sum() / costs.sum()),
                           score, float(loss(probs.mean(axis=1), y)), model)


__all__ = ["MemberSelection", "members"]
