"""ek.pareto (dominance, ties, directions, errors) and the accuracy harness on a tiny configuration."""

import itertools

import numpy as np
import pytest

import ensemblekit as ek


def _row(name, throughput, accuracy, **extra):
    return {"name": name, "throughput": throughput, "accuracy": accuracy, **extra}


def _names(rows):
    return [r["name"] for r in rows]


def _brute_force_front(rows, x, y, x_up, y_up):
    sign_x, sign_y = (1 if x_up else -1), (1 if y_up else -1)
    front = []
    for r in rows:
        p = (sign_x * r[x], sign_y * r[y])
        if not any((sign_x * o[x], sign_y * o[y]) != p and sign_x * o[x] >= p[0] and sign_y * o[y] >= p[1]
                   for o in rows):
            front.append(r)
    return sorted(front, key=lambda r: r[x])


def test_pareto_drops_dominated_rows_and_sorts_by_x():
    rows = [_row("slow_good", 10, 0.95), _row("fast_bad", 100, 0.80), _row("dominated", 9, 0.90),
            _row("middle", 50, 0.90), _row("worse_middle", 50, 0.85)]
    assert _names(ek.pareto(rows)) == ["slow_good", "middle", "fast_bad"]


def test_pareto_keeps_exact_ties_and_drops_one_sided_ties():
    rows = [_row("a", 10, 0.9), _row("b", 10, 0.9), _row("same_x_worse_y", 10, 0.8),
            _row("same_y_worse_x", 5, 0.9)]
    assert _names(ek.pareto(rows)) == ["a", "b"]


def test_pareto_lower_is_better_cost():
    rows = [{"name": "big", "params": 1000, "accuracy": 0.95},
            {"name": "small", "params": 100, "accuracy": 0.90},
            {"name": "small_worse", "params": 100, "accuracy": 0.85},
            {"name": "big_worse", "params": 2000, "accuracy": 0.93}]
    front = ek.pareto(rows, x="params", y="accuracy", x_higher_is_better=False)
    assert _names(front) == ["small", "big"]
    # both lower-is-better: params and NLL
    rows = [{"name": "p", "params": 1, "nll": 0.5}, {"name": "q", "params": 2, "nll": 0.3},
            {"name": "r", "params": 3, "nll": 0.4}]
    assert _names(ek.pareto(rows, x="params", y="nll", x_higher_is_better=False,
                            y_higher_is_better=False)) == ["p", "q"]


def test_pareto_matches_brute_force_on_random_grids():
    rng = np.random.default_rng(0)
    for trial in range(30):
        rows = [_row(str(i), int(a), int(b)) for i, (a, b) in enumerate(rng.integers(0, 4, size=(12, 2)))]
        for x_up, y_up in itertools.product((True, False), repeat=2):
            expected = _brute_force_front(rows, "throughput", "accuracy", x_up, y_up)
            got = ek.pareto(rows, x_higher_is_better=x_up, y_higher_is_better=y_up)
            assert _names(got) == _names(expected), (trial, x_up, y_up)


def test_pareto_edge_cases():
    assert ek.pareto([]) == []
    single = [_row("only", 1.0, 0.5)]
    assert ek.pareto(single) == single and ek.pareto(single)[0] is single[0]


def test_pareto_errors_name_the_row_and_key():
    with pytest.raises(ValueError, match=r"row 1 has no key 'accuracy'"):
        ek.pareto([_row("a", 1, 0.5), {"name": "b", "throughput": 2}])
    with pytest.raises(ValueError, match=r"row 0 has no key 'latency'"):
        ek.pareto([_row("a", 1, 0.5)], x="latency")
    with pytest.raises(ValueError, match=r"row 0 'accuracy' must be a number, got nan"):
        ek.pareto([_row("a", 1, float("nan"))])
    with pytest.raises(ValueError, match=r"row 0 'throughput' must be a number, got '1'"):
        ek.pareto([_row("a", "1", 0.5)])
    with pytest.raises(TypeError, match=r"row 0 must be a mapping, got tuple"):
        ek.pareto([(1, 0.5)])
