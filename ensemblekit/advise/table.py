"""The advisor's table: one line per candidate, the loss barriers, the recommendation."""

from __future__ import annotations

_BINARY_COLUMNS = (("accuracy", "accuracy", 8, ".4f"), ("auroc", "AUROC", 7, ".4f"), ("nll", "NLL", 7, ".4f"),
                   ("brier", "Brier", 7, ".4f"), ("ece", "ECE", 7, ".4f"))
# The metric columns per task: (row key, header, width, format); multilabel ones are macro means.
METRIC_COLUMNS = {
    "multiclass": (("accuracy", "accuracy", 8, ".4f"), ("nll", "NLL", 7, ".4f"), ("brier", "Brier", 7, ".4f"),
                   ("ece", "ECE", 7, ".4f")),
    "binary": _BINARY_COLUMNS,
    "multilabel": _BINARY_COLUMNS,
    "regression": (("rmse", "RMSE", 8, ".4g"), ("mae", "MAE", 8, ".4g"), ("nll", "NLL", 7, ".4f"),
                   ("coverage", "cover.", 6, ".3f")),
}
_BARRIER_LOSS = {"multiclass": "score-half NLL, nats", "binary": "score-half binary cross-entropy, nats",
                 "multilabel": "score-half binary cross-entropy averaged over labels, nats",
                 "regression": "score-half MSE"}


def _cell(value, spec):
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return format(value, spec)


def format_table(advice):
    """``str(advice)``: the settings, one row per candidate, the barriers, notes and the recommendation.

    The metric columns are the task's (:data:`METRIC_COLUMNS`): accuracy, NLL, Brier and
    ECE for multiclass members, AUROC too for binary ones and multilabel ones (macro
    means over labels); RMSE, MAE, and Gaussian NLL and ±1.96σ coverage (where a
    candidate has a std) for regressors.

    Example:
        >>> from ensemblekit.advise.core import Advice
        >>> row = dict(name="soup", kind="merge", accuracy=None, nll=None, brier=None, ece=None, params=None,
        ...            macs=None, latency_ms=None, cost_ratio=None, within_budget=False, note="skipped: x")
        >>> text = format_table(Advice(None, "none fits.", [row], {}, [], 1.0, "params", "nll", 0, 2, 2))
        >>> text.splitlines()[4].split()[:3]
        ['soup', '-', '-']
    """
    task = getattr(advice, "task", "multiclass")
    columns = METRIC_COLUMNS[task]
    budget = "none" if advice.budget is None else f"{advice.budget:g}x one member"
    what = "" if task == "multiclass" else f"{task} members; "
    lines = [f"ek.advise: {what}{len(advice.rows)} candidates; fit half {advice.fit_size} / score half "
             f"{advice.score_size} samples (seed {advice.seed}); metric {advice.metric}; cost "
             f"{advice.cost}; budget {budget}", ""]
    metric_header = " ".join(f"{header:>{width}}" for _, header, width, _ in columns)
    header = (f"{'candidate':<20} {metric_header} {'params':>10} "
              f"{'MACs':>10} {'lat. ms':>8} {'cost':>6} {'budget':>6}  note")
    lines += [header, "-" * len(header)]
    for row in advice.rows:
        within = _cell(row["within_budget"], "") if row[columns[0][0]] is not None else "-"
        cells = " ".join(f"{_cell(row[key], spec):>{width}}" for key, _, width, spec in columns)
        lines.append(
            f"{row['name']:<20} {cells} {_cell(row['params'], ','):>10} "
            f"{_cell(row['macs'], ','):>10} {_cell(row['latency_ms'], '.3f'):>8} "
            f"{_cell(row['cost_ratio'], '.2f'):>6} {within:>6}  {row['note']}")
    if advice.barriers:
        lines += ["", f"loss barriers ({_BARRIER_LOSS[task]}) on the linear path from member 0, t = 0, .25, .5, .75, 1:"]
        for pair, entry in advice.barriers.items():
            aligned = entry["aligned_barrier"]
            after = f"; after align {aligned:.4f}" if aligned is not None else "; no alignment (see below)"
            lines.append(f"  {pair}: {entry['barrier']:.4f}{after}")
    lines += ["", *advice.notes] if advice.notes else []
    lines += ["", f"recommendation: {advice.recommendation or 'none'}", f"  {advice.reason}"]
    return "\n".join(lines)
