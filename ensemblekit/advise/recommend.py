"""The advisor's choice: the best candidate within budget, or a cheaper one within tolerance."""

from __future__ import annotations

from ensemblekit.metrics import HIGHER_IS_BETTER

# A cheaper candidate is preferred when the better one wins by less than this: accuracy and
# AUROC in absolute terms (0.5 point); NLL, RMSE and MAE relative to the better value (1%).
TOLERANCE = {"accuracy": 0.005, "auroc": 0.005, "nll": 0.01, "rmse": 0.01, "mae": 0.01}
LABELS = {"accuracy": "accuracy", "auroc": "AUROC", "nll": "NLL", "rmse": "RMSE", "mae": "MAE"}


def _loss(row, metric):
    return -row[metric] if metric in HIGHER_IS_BETTER else row[metric]


def _gap(row, best, metric):
    """How much worse ``row`` is than ``best``, in the tolerance's unit."""
    if metric in HIGHER_IS_BETTER:
        return best[metric] - row[metric]
    return (row[metric] - best[metric]) / max(best[metric], 1e-12)


def _describe_gap(row, best, metric):
    if metric in HIGHER_IS_BETTER:
        return f"{100 * _gap(row, best, metric):.1f} points"
    return f"{100 * _gap(row, best, metric):.1f}%"


def _value(row, metric):
    return f"{LABELS[metric]} {row[metric]:.4f}"


def recommend(rows, metric, budget, cost, barriers):
    """``(name or None, reason)``: the recommended row and one paragraph quoting its numbers.

    Among scored rows within budget, the best by ``metric``; a cheaper row within
    :data:`TOLERANCE` of it (0.5 accuracy or AUROC point, or 1% relative NLL, RMSE
    or MAE) is preferred.

    Args:
        rows: dicts with ``name``, ``metric``'s key, ``cost_ratio``, ``within_budget``
            (the metric is ``None`` for skipped rows).
        metric: ``"nll"``, ``"accuracy"`` or ``"auroc"`` (classifiers), ``"rmse"`` or ``"mae"``
            (regression).
        budget: the budget in single-member costs, or ``None``.
        cost: the cost's name, for the reason.
        barriers: the advisor's loss barriers (``{}`` for none), summarised in the reason.

    Example:
        >>> rows = [dict(name="soup", nll=0.403, accuracy=0.9, cost_ratio=1.0, within_budget=True),
        ...         dict(name="ensemble", nll=0.400, accuracy=0.91, cost_ratio=3.0, within_budget=True)]
        >>> recommend(rows, "nll", None, "params", {})[0]
        'soup'
        >>> rows = [dict(name="soup", rmse=0.52, cost_ratio=1.0, within_budget=True),
        ...         dict(name="ensemble", rmse=0.40, cost_ratio=2.0, within_budget=True)]
        >>> recommend(rows, "rmse", None, "params", {})[1][:48]
        'ensemble has the best RMSE 0.4000 with no budget'
    """
    scored = [r for r in rows if r[metric] is not None]
    eligible = [r for r in scored if r["within_budget"]]
    tolerance = "0.5 points" if metric in HIGHER_IS_BETTER else "1%"
    if not eligible:
        cheapest = min(scored, key=lambda r: r["cost_ratio"])
        return None, (f"no candidate fits the budget of {budget:g}x one member's {cost}; the cheapest, "
                      f"{cheapest['name']}, costs {cheapest['cost_ratio']:.2f}x.")
    best = min(eligible, key=lambda r: (_loss(r, metric), r["cost_ratio"]))
    close = [r for r in eligible if _gap(r, best, metric) < TOLERANCE[metric]]
    chosen = min(close, key=lambda r: (r["cost_ratio"], _loss(r, metric)))
    scope = "with no budget" if budget is None else f"within the budget of {budget:g}x one member's {cost}"
    if chosen is best:
        reason = f"{best['name']} has the best {_value(best, metric)} {scope}, at {best['cost_ratio']:.2f}x"
        cheaper = [r for r in eligible if r["cost_ratio"] < best["cost_ratio"]]
        if cheaper:
            runner = min(cheaper, key=lambda r: _loss(r, metric))
            reason += (f"; the cheaper {runner['name']} ({runner['cost_ratio']:.2f}x) is "
                       f"{_describe_gap(runner, best, metric)} worse, beyond the {tolerance} tolerance")
    else:
        fraction = best["cost_ratio"] / max(chosen["cost_ratio"], 1e-12)
        reason = (f"{chosen['name']} is within {_describe_gap(chosen, best, metric)} of {best['name']} "
                  f"({_value(chosen, metric)} vs {best[metric]:.4f}; "
                  f"tolerance {tolerance}) at 1/{fraction:.3g} the cost ({chosen['cost_ratio']:.2f}x vs "
                  f"{best['cost_ratio']:.2f}x one member's {cost}), so the cheaper one is preferred")
    over = [r for r in scored if not r["within_budget"] and _loss(r, metric) < _loss(chosen, metric)]
    if over:
        top = min(over, key=lambda r: _loss(r, metric))
        reason += f"; {top['name']} would reach {_value(top, metric)} but costs {top['cost_ratio']:.2f}x"
    return chosen["name"], reason + _barrier_summary(barriers) + "."


def barrier_unit(barriers):
    """``"nats"`` (NLL barriers of classifiers) or ``"MSE"`` (regression barriers carry ``path_mse``).

    Example:
        >>> barrier_unit({"0-1": {"path_mse": [0.1], "barrier": 0.0}})
        'MSE'
    """
    return "MSE" if any("path_mse" in entry for entry in barriers.values()) else "nats"


def _barrier_summary(barriers):
    if not barriers:
        return ""
    plain = max(entry["barrier"] for entry in barriers.values())
    unit = barrier_unit(barriers)
    spec = ".3f" if unit == "nats" else ".4g"
    text = f"; loss barrier between members up to {plain:{spec}} {unit}"
    aligned = [entry["aligned_barrier"] for entry in barriers.values() if entry["aligned_barrier"] is not None]
    if aligned:
        text += f" ({max(aligned):{spec}} after alignment)"
    return text
