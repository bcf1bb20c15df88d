"""Ensemble member pruning: keep the members that matter under a size/latency budget."""

from __future__ import annotations

import dataclasses

import keras
import numpy as np

from ensemblekit._graph import is_container
from ensemblekit._io import load_members
from ensemblekit.compose.weights import greedy_selection, task_loss, validation_predictions
from ensemblekit.costs import COST_UNITS, budget_limit, check_budget, model_costs
from ensemblekit.metrics import HIGHER_IS_BETTER


@dataclasses.dataclass
class MemberSelection:
    """The members kept by :func:`select_members`.

    Attributes:
        indices: kept member indices (ascending).
        weights: weight of each kept member (selection counts, normalised).
        cost: cost of each member (in the unit of ``cost=``), all members.
        used: total cost of the kept members in units of the members' mean
            cost, the unit of ``budget`` (``used <= budget``; K = all K members).
        budget: the budget the selection ran under (``K / 2`` when ``budget=None``).
        score: validation ``metric`` of the kept, weighted ensemble (its value:
            higher is better for ``"accuracy"``, lower for the others).
        full_score: validation ``metric`` of all members averaged equally.
        model: the kept members as one model (``ek.ensemble(..., "weighted",
            task=task)``), or the single kept member.
        task: the members' task (``"multiclass"``, ``"binary"``, ``"multilabel"`` or ``"regression"``).
        metric: the metric of ``score`` and ``full_score``.
    """

    indices: list
    weights: list
    cost: list
    used: float
    budget: float
    score: float
    full_score: float
    model: keras.Model
    task: str
    metric: str


def _member_models(ensemble_or_models):
    if isinstance(ensemble_or_models, keras.Model):
        nested = [layer for layer in ensemble_or_models.layers if is_container(layer)]
        if len(nested) < 2:
            raise ValueError(
                f"Model {ensemble_or_models.name!r} holds {len(nested)} nested member models; pass an "
                "ek.ensemble(...) model or a list of members."
            )
        return nested
    return load_members(ensemble_or_models, min_count=2, what="select_members()")


def _check_cheapest_fits(models, costs, budget, given, cost):
    """A one-line error, with numbers, when even the cheapest member exceeds the budget."""
    mean, cheapest, limit = costs.mean(), int(np.argmin(costs)), budget_limit(budget, costs)
    if costs[cheapest] <= limit * (1 + 1e-9):
        return
    unit = f" {COST_UNITS[cost]}" if isinstance(cost, str) else ""
    setting = f"budget={given:g}" if given is not None else f"budget=None (half of {len(models)} members)"
    raise ValueError(
        f"{setting} allows {budget:g} x the members' mean cost of {mean:g}{unit} = {limit:g}{unit}, "
        f"but the cheapest member, member {cheapest} ({models[cheapest].name!r}), costs "
        f"{costs[cheapest]:g}{unit}: budget must be at least {costs[cheapest] / mean:.3g}.")


def select_members(ensemble_or_models, x, y=None, budget=None, cost="params", metric=None, size=None,
                   task=None, *, batch_size=None, steps=None):
    """Keep the ensemble members that best fit a cost budget (Caruana et al., 2004).

    Greedy forward selection with replacement on validation data
    (:func:`ensemblekit.compose.weights.greedy_selection`): each step adds the
    member (possibly one already kept, which costs nothing more) whose addition
    gives the best ``metric`` of the averaged predictions (probabilities of a
    classifier, values of a regressor), among the members whose cost still fits
    the budget; the best prefix is kept.

    Args:
        ensemble_or_models: an ``ek.ensemble(...)`` model (its nested members
            are used) or a list of members (models or paths).
        x: held-out data the members were not trained on: anything
            ``model.predict`` accepts (arrays, a ``tf.data.Dataset`` of ``(x, y)``,
            a ``keras.utils.PyDataset``, a generator), read once.
        y: class labels, 0/1 labels of a binary classifier, 0/1 targets
            ``(n, labels)`` of a multilabel one, or regression targets; ``None``
            when ``x`` yields them.
        budget: the most the kept members may cost together, in units of the
            members' mean cost (``1.0`` = one member's cost, ``K`` = all K
            members; the one meaning of budgets, see :mod:`ensemblekit.costs`).
            ``None`` (default): half of the full ensemble, ``K / 2``.
        cost: ``"params"``, ``"macs"`` (per sample), ``"latency"`` or one
            positive number per member. Latency is the one meaning of
            :mod:`ensemblekit.costs`: median seconds per call on a batch of 256
            of each member compiled by ``ek.compile_for_inference``, the members
            timed round-robin on this device.
        metric: one of ``ensemblekit.compose.weights.TASK_METRICS[task]``
            (``task_loss``, the one scoring rule of selections): for classifiers
            ``"nll"`` (default), ``"brier"``, ``"accuracy"`` or ``"ece"``, and
            ``"auroc"`` for binary and multilabel members (scored as ``ek.evaluate``
            scores them: the positive-class probability, per label and averaged
            over labels); for regression ``"mse"`` (default), ``"rmse"`` or ``"mae"``.
            An unknown one is a ``ValueError`` naming the metric and the task.
        size: greedy steps, as ``ek.select(size=)`` (default ``2 * K``).
        task: the members' task as in ``ek.ensemble``: ``None``/``"auto"``
            (detect), ``"multiclass"``, ``"binary"``, ``"multilabel"`` or ``"regression"``.

    Returns:
        A :class:`MemberSelection` (``indices``, ``weights``, ``model``,
        ``used`` and ``budget`` in mean member costs, scores, costs, ``task``
        and ``metric``).

    Example:
        >>> import keras, numpy as np
        >>> ms = [keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)]) for _ in range(3)]
        >>> kept = select_members(ms, np.random.rand(20, 4), np.arange(20) % 3, budget=2.0)
        >>> len(kept.indices) <= 2 and kept.used <= 2.0
        True
        >>> regressors = [keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)]) for _ in range(3)]
        >>> x = np.random.rand(20, 4)
        >>> kept = select_members(regressors, x, x.sum(axis=1), budget=1.0, task="regression")
        >>> kept.task, kept.metric, len(kept.indices)
        ('regression', 'mse', 1)
    """
    models = _member_models(ensemble_or_models)
    given = check_budget(budget)
    member_set, predictions, y, task = validation_predictions(models, x, y, "select_members()", task=task,
                                                              batch_size=batch_size, steps=steps)
    return selection_from_predictions(member_set.models, member_set.output_kinds, predictions, y, task, given,
                                      cost, metric, size)


def selection_from_predictions(models, output_kinds, predictions, y, task, budget, cost, metric, size=None):
    """:func:`select_members` on the members' validation predictions ``(n, K, ...)`` (``task_loss``'s
    form), for callers that computed them once already (``ek.advise``)."""
    from ensemblekit.compose.ensemble import ensemble

    given = budget
    budget = len(models) / 2 if given is None else given
    metric, loss = task_loss(metric, task)
    costs = model_costs(models, cost)
    _check_cheapest_fits(models, costs, budget, given, cost)
    selection = greedy_selection(predictions, y, loss, size, costs=costs, limit=budget_limit(budget, costs))
    indices = [int(i) for i in np.flatnonzero(selection.counts)]
    weights = [float(selection.counts[i] / selection.counts.sum()) for i in indices]
    kept = [models[i] for i in indices]
    model = kept[0] if len(kept) == 1 else ensemble(
        kept, "weighted", weights=weights, output_kind=[output_kinds[i] for i in indices], task=task)
    sign = -1.0 if metric in HIGHER_IS_BETTER else 1.0  # greedy_selection minimises a loss
    return MemberSelection(
        indices=indices, weights=weights, cost=costs.tolist(),
        used=float(costs[indices].sum() / costs.mean()), budget=budget, score=sign * selection.score,
        full_score=sign * float(loss(predictions.mean(axis=1), y)), model=model, task=task, metric=metric)


__all__ = ["MemberSelection", "select_members", "selection_from_predictions"]
