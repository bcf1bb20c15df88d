"""ensemblekit.advise.recommend: the best candidate within budget, or a cheaper one within tolerance."""

from ensemblekit.advise import recommend


def _row(name, nll, accuracy, cost_ratio, within=True):
    return {"name": name, "nll": nll, "accuracy": accuracy, "cost_ratio": cost_ratio, "within_budget": within}


def test_recommendation_prefers_the_cheaper_candidate_only_within_tolerance():
    close = [_row("soup", 0.4028, 0.90, 1.0), _row("ensemble", 0.400, 0.91, 3.0)]
    name, reason = recommend(close, "nll", None, "params", {})
    assert name == "soup"
    assert "within 0.7% of ensemble" in reason and "1/3 the cost" in reason
    far = [_row("soup", 0.420, 0.90, 1.0), _row("ensemble", 0.400, 0.91, 3.0)]
    name, reason = recommend(far, "nll", None, "params", {})
    assert name == "ensemble" and "5.0% worse, beyond the 1% tolerance" in reason
    assert recommend(far, "accuracy", None, "params", {})[0] == "ensemble"  # 1 point > 0.5
    near = [_row("soup", 0.5, 0.907, 1.0), _row("ensemble", 0.4, 0.910, 3.0)]
    assert recommend(near, "accuracy", None, "params", {})[0] == "soup"  # 0.3 point < 0.5
    over = [_row("soup", 0.420, 0.90, 1.0), _row("ensemble", 0.400, 0.91, 3.0, within=False)]
    name, reason = recommend(over, "nll", 1.0, "params", {})
    assert name == "soup" and "ensemble would reach NLL 0.4000 but costs 3.00x" in reason
    name, reason = recommend([_row("soup", 0.4, 0.9, 1.0, within=False)], "nll", 0.5, "params", {})
    assert name is None and "no candidate fits the budget of 0.5x" in reason


def test_reason_quotes_the_largest_barriers():
    rows = [_row("soup", 0.40, 0.9, 1.0)]
    barriers = {"0-1": {"barrier": 0.5, "aligned_barrier": 0.1}, "0-2": {"barrier": 0.7, "aligned_barrier": 0.2}}
    name, reason = recommend(rows, "nll", None, "params", barriers)
    assert name == "soup"
    assert reason.endswith("; loss barrier between members up to 0.700 nats (0.200 after alignment).")


def test_auroc_is_higher_is_better_with_a_half_point_tolerance():
    rows = [dict(_row("soup", 0.40, 0.9, 1.0), auroc=0.952), dict(_row("ensemble", 0.39, 0.9, 3.0), auroc=0.955),
            dict(_row("skipped", None, None, None, within=False), auroc=None)]
    name, reason = recommend(rows, "auroc", None, "params", {})
    assert name == "soup" and "within 0.3 points of ensemble (AUROC 0.9520 vs 0.9550; tolerance 0.5 points)" in reason
    rows[0]["auroc"] = 0.940
    name, reason = recommend(rows, "auroc", None, "params", {})
    assert name == "ensemble" and "1.5 points worse, beyond the 0.5 points tolerance" in reason
