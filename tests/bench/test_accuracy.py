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


# -- the harness, on a tiny configuration -------------------------------------------------------

TINY = dict(members=2, epochs=1, train_samples=300, validation=100, head_epochs=1, finetune_epochs=1,
            stack_epochs=2, cv=2, repeats=1, target_s=0.002)


@pytest.fixture(scope="module")
def tiny_run():
    from ensemblekit.bench import accuracy

    return accuracy.run(["mnist1d_cnn"], seed=3, quick=True, verbose=0, **TINY)


@pytest.mark.slow  # shares one tiny benchmark run (~15-20 s on 2 cores)
def test_smoke_tiny_run_writes_json_markdown_and_pngs(tiny_run, tmp_path):
    import json

    from ensemblekit.bench import accuracy

    paths = accuracy.write_reports(tiny_run, tmp_path, stem="acc")
    assert [p.name for p in paths] == ["acc.json", "acc.md", "acc_pareto_mnist1d_cnn.png", "acc_reliability.png"]
    assert json.loads(paths[0].read_text()) == json.loads(json.dumps(tiny_run))
    markdown = paths[1].read_text()
    for row in tiny_run["member_sets"]["mnist1d_cnn"]["rows"]:
        assert f"| {row['composition']} | {row['accuracy']:.4f} |" in markdown
    for png in paths[2:]:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


@pytest.mark.slow  # shares one tiny benchmark run (~15-20 s on 2 cores)
def test_tiny_run_has_every_composition_and_packed_equals_the_ensemble(tiny_run):
    result = tiny_run["member_sets"]["mnist1d_cnn"]
    rows = {r["composition"]: r for r in result["rows"]}
    assert result["skipped"] == []  # one architecture: every composition applies
    expected = {"best member", "ensemble mean", "ensemble logit_mean", "ensemble geometric", "ensemble vote",
                "weighted (optimize_weights)", "stack (logistic)", "fuse (concat, new head)",
                "select (Caruana)", "linear soup (merge)", "align + merge", "packed (ek.pack mean)",
                "pruned channels(0.3) + ensemble mean", "prune.select_members (budget 0.5)",
                "calibrate(ensemble mean)", "TTA best member (shifts)", "TTA ensemble mean (shifts)"}
    assert set(rows) == expected
    for label in ("TTA best member (shifts)", "TTA ensemble mean (shifts)"):
        assert 0.0 <= rows[label]["accuracy"] <= 1.0 and rows[label]["nll"] > 0, rows[label]
        assert "averaged over 5 views (identity, shift +1, shift -1, shift +2, shift -2)" in rows[label]["note"]
    packed, mean = rows["packed (ek.pack mean)"], rows["ensemble mean"]
    assert packed["accuracy"] == mean["accuracy"]
    for metric in ("nll", "brier", "ece"):
        assert packed[metric] == pytest.approx(mean[metric], abs=1e-5), metric
    assert packed["macs"] == mean["macs"] == 2 * rows["best member"]["macs"] > 0
    assert rows["linear soup (merge)"]["params"] == rows["best member"]["params"]
    assert rows["pruned channels(0.3) + ensemble mean"]["params"] < mean["params"]
    assert {c["check"]: c["met"] for c in result["checks"]}["packed accuracy == ensemble mean accuracy"]
    # calibration never moves the argmax
    assert rows["calibrate(ensemble mean)"]["accuracy"] == mean["accuracy"]
    assert [m["seed"] for m in result["members"]] == [3, 4]
    assert result["samples"] == {"train": 300, "val": 100, "test": 1000}


@pytest.mark.slow  # shares one tiny benchmark run (~15-20 s on 2 cores)
def test_tiny_run_pareto_flags_and_reliability_bins(tiny_run):
    from ensemblekit import metrics

    result = tiny_run["member_sets"]["mnist1d_cnn"]
    rows = result["rows"]
    assert all(r["throughput"] > 0 for r in rows)
    front = ek.pareto(rows)
    assert [r["pareto"] for r in rows] == [any(r is f for f in front) for r in rows]
    assert any(r["pareto"] for r in rows)
    by_name = {r["composition"]: r for r in rows}
    for label, key in (("before", "ensemble mean"), ("after", "calibrate(ensemble mean)")):
        bins = result["reliability"][label]
        assert sum(bins["count"]) == 1000
        ece = sum(n / 1000 * abs(a - c) for n, a, c in zip(bins["count"], bins["accuracy"], bins["confidence"])
                  if n)
        assert ece == pytest.approx(by_name[key]["ece"], abs=1e-9)
    assert metrics.calibration_bins(np.array([[0.9, 0.1], [0.2, 0.8]]), [0, 0], bins=2)["count"] == [0, 2]


@pytest.mark.slow  # a second tiny run (~15 s on 2 cores)
def test_same_seed_gives_the_same_accuracy_numbers(tiny_run):
    from ensemblekit.bench import accuracy

    again = accuracy.run(["mnist1d_cnn"], seed=3, quick=True, measure_throughput=False, verbose=0, **TINY)
    first, second = tiny_run["member_sets"]["mnist1d_cnn"], again["member_sets"]["mnist1d_cnn"]
    scores = ("accuracy", "nll", "brier", "ece")
    assert [[m[k] for k in scores] for m in second["members"]] == [[m[k] for k in scores] for m in first["members"]]
    for a, b in zip(first["rows"], second["rows"], strict=True):
        assert a["composition"] == b["composition"]
        assert a["accuracy"] == b["accuracy"], a["composition"]
        assert a["nll"] == pytest.approx(b["nll"], abs=1e-6), a["composition"]
    assert all(r["throughput"] is None and not r["pareto"] for r in second["rows"])


def test_heterogeneous_members_skip_weight_space_compositions_with_the_reason():
    from ensemblekit import compositions
    from ensemblekit.bench import accuracy
    from ensemblekit.demo import make_cnn

    members = [accuracy.make_mlp(0), make_cnn(1), accuracy.make_gru(2)]
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 40, 1)).astype("float32")
    data = {"train": (x, np.arange(60) % 10), "val": (x, np.arange(60) % 10), "test": (x, np.arange(60) % 10)}
    ctx = accuracy.make_context(members, data, accuracy.QUICK_SETTINGS, seed=0)
    for label in ("linear soup (merge)", "align + merge", "packed (ek.pack mean)"):
        with pytest.raises(accuracy.Skip, match=r"^members differ in architecture: member 1 \('cnn_1'\): .* vs "
                                                 r"member 0 \('mlp_0'\)'s"):
            compositions.build(accuracy.COMPOSITIONS[label], ctx)
    # prune.select_members runs under half the ensemble's cost: 1.5 mean member costs for 3 members.
    assert ctx.budget == 1.5
    built = compositions.build(accuracy.COMPOSITIONS["prune.select_members (budget 0.5)"], ctx)
    assert built.model.output_shape == (None, 10)
    costs = ctx.member_costs()
    assert costs[built.used].sum() <= 0.5 * costs.sum() + 1e-9


def test_every_label_names_a_registry_entry_and_best_member_is_chosen_by_accuracy():
    from ensemblekit import compositions
    from ensemblekit.bench import accuracy

    assert set(accuracy.COMPOSITIONS.values()) <= set(compositions.REGISTRY)
    assert len(set(accuracy.COMPOSITIONS.values())) == len(accuracy.COMPOSITIONS)
    members = [accuracy.make_mlp(i, (4,), hidden=8) for i in range(3)]
    rng = np.random.default_rng(0)
    x = rng.normal(size=(90, 4)).astype("float32")
    data = {"train": (x, np.arange(90) % 10), "val": (x, np.arange(90) % 10), "test": (x, np.arange(90) % 10)}
    ctx = accuracy.make_context(members, data, accuracy.QUICK_SETTINGS, seed=0)
    best = compositions.build("best_member", ctx)
    scores = [ek.evaluate(m, x, np.arange(90) % 10)["accuracy"] for m in members]
    assert best.used == [int(np.argmax(scores))] and best.note.endswith("best validation-split accuracy")


def test_run_rejects_unknown_sets_and_settings():
    from ensemblekit.bench import accuracy

    with pytest.raises(ValueError, match=r"Unknown member set 'cifar'"):
        accuracy.run(["cifar"])
    with pytest.raises(ValueError, match=r"Unknown setting 'epoch'"):
        accuracy.run(["digits_mlp"], epoch=3)
    with pytest.raises(ValueError, match=r"members must be at least 2, got 1"):
        accuracy.run(["digits_mlp"], members=1)


def test_cli_registers_bench_accuracy():
    from ensemblekit.bench.accuracy import QUICK_SETS
    from ensemblekit.cli import build_parser

    args = build_parser().parse_args(["bench", "accuracy", "--quick", "--sets", "digits_mlp", "--seed", "4"])
    assert (args.quick, args.sets, args.seed, args.run.__name__) == (True, ["digits_mlp"], 4, "_run_accuracy")
    assert QUICK_SETS == ("mnist1d_cnn",)


def test_member_sets_load_their_data_and_train_the_documented_members():
    from ensemblekit.bench import accuracy

    settings = dict(accuracy.QUICK_SETTINGS, members=2, epochs=1, digits_epochs=1, train_samples=128)
    data = accuracy.load_data("mnist1d_mixed", settings)
    assert [len(data[k][0]) for k in ("train", "val", "test")] == [128, 300, 1000]
    mixed = accuracy.train_members("mnist1d_mixed", data, settings, seed=5)
    assert [m.name for m in mixed] == ["mlp_5", "cnn_6", "gru_7"]
    assert isinstance(mixed[2].get_layer("features"), __import__("keras").layers.GRU)
    digits = accuracy.load_data("digits_mlp", settings)
    assert [len(digits[k][0]) for k in ("train", "val", "test")] == [1257 - 200, 200, 540]
    assert digits["train"][0].shape[1:] == (8, 8, 1)
    members = accuracy.train_members("digits_mlp", {**digits, "train": tuple(a[:128] for a in digits["train"])},
                                     settings, seed=0)
    assert [m.name for m in members] == ["mlp_0", "mlp_1"]
    assert not np.allclose(members[0].get_weights()[0], members[1].get_weights()[0])
    with pytest.raises(ValueError, match=r"Unknown member set 'mnist1d'"):
        accuracy.train_members("mnist1d", data, settings)
