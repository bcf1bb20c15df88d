"""The advisor's table: one line per candidate, the loss barriers, the recommendation."""

from __future__ import annotations


def _cell(value, spec):
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return format(value, spec)


def format_table(advice):
    """``str(advice)``: the settings, one row per candidate, the barriers, notes and the recommendation.

    Example:
        >>> from ensemblekit.advise.core import Advice
        >>> row = dict(name="soup", kind="merge", accuracy=None, nll=None, brier=None, ece=None, params=None,
        ...            macs=None, latency_ms=None, cost_ratio=None, within_budget=False, note="skipped: x")
        >>> text = format_table(Advice(None, "none fits.", [row], {}, [], 1.0, "params", "nll", 0, 2, 2))
        >>> text.splitlines()[4].split()[:3]
        ['soup', '-', '-']
    """
    budget = "none" if advice.budget is None else f"{advice.budget:g}x one member"
    lines = [f"ek.advise: {len(advice.rows)} candidates; fit half {advice.fit_size} / score half "
             f"{advice.score_size} samples (seed {advice.seed}); metric {advice.metric}; cost "
             f"{advice.cost}; budget {budget}", ""]
    header = (f"{'candidate':<20} {'accuracy':>8} {'NLL':>7} {'Brier':>7} {'ECE':>7} {'params':>10} "
              f"{'MACs':>10} {'lat. ms':>8} {'cost':>6} {'budget':>6}  note")
    lines += [header, "-" * len(header)]
    for row in advice.rows:
        within = _cell(row["within_budget"], "") if row["nll"] is not None else "-"
        lines.append(
            f"{row['name']:<20} {_cell(row['accuracy'], '.4f'):>8} {_cell(row['nll'], '.4f'):>7} "
            f"{_cell(row['brier'], '.4f'):>7} {_cell(row['ece'], '.4f'):>7} {_cell(row['params'], ','):>10} "
            f"{_cell(row['macs'], ','):>10} {_cell(row['latency_ms'], '.3f'):>8} "
            f"{_cell(row['cost_ratio'], '.2f'):>6} {within:>6}  {row['note']}")
    if advice.barriers:
        lines += ["", "loss barriers (score-half NLL, nats) on the linear path from member 0, "
                  "t = 0, .25, .5, .75, 1:"]
        for pair, entry in advice.barriers.items():
            aligned = entry["aligned_barrier"]
            after = f"; after align {aligned:.4f}" if aligned is not None else "; no alignment (see below)"
            lines.append(f"  {pair}: {entry['barrier']:.4f}{after}")
    lines += ["", *advice.notes] if advice.notes else []
    lines += ["", f"recommendation: {advice.recommendation or 'none'}", f"  {advice.reason}"]
    return "\n".join(lines)
