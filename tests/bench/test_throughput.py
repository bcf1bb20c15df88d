"""The throughput harness: FLOP counting, round-robin timing, targets and reports (not speed)."""

import argparse
import json

import keras
import numpy as np
import pytest

from ensemblekit.bench import throughput
from ensemblekit.bench.cli import register_cli


def test_member_flops_counts_dense_and_conv():
    mlp = throughput.build_member("mlp", 0)
    assert throughput.member_flops(mlp) == 2 * (40 * 256 + 256 * 256 + 256 * 10)
    cnn = throughput.build_member("cnn1d", 0)
    # Conv1D(32, 5) on 40 steps -> 36; pool -> 18; Conv1D(64, 3) -> 16; Dense 64 -> 10.
    assert throughput.member_flops(cnn) == 2 * (36 * 5 * 1 * 32 + 16 * 3 * 32 * 64 + 64 * 10)


def test_soup_is_the_weight_average():
    models = [throughput.build_member("mlp", seed) for seed in range(3)]
    merged = throughput.soup(models)
    for position, array in enumerate(merged.get_weights()):
        expected = np.mean([m.get_weights()[position] for m in models], axis=0)
        np.testing.assert_allclose(array, expected, rtol=1e-6)


def test_paths_compute_the_same_ensemble():
    models = [throughput.build_member("mlp", seed) for seed in range(2)]
    x = np.random.default_rng(0).normal(size=(3, 40, 1)).astype("float32")
    paths = throughput.path_functions(models, x)
    reference = paths["ensemble"]()
    names = ["predict_loop", "ensemble_xla", "pack", "pack_xla", "pack_grouped", "pack_loop", "pack_loop_xla",
             "ensemble_auto", "pack_auto"]
    if keras.backend.backend() == "tensorflow":
        names.append("tf_function_loop")
    for name in names:
        np.testing.assert_allclose(paths[name](), reference, atol=1e-5, err_msg=name)
    for name in ("ensemble_bf16", "ensemble_xla_bf16", "pack_bf16", "pack_xla_bf16"):
        np.testing.assert_allclose(paths[name](), reference, atol=2e-2, err_msg=name)
    # jit_compile="auto" says what it picked: XLA or the plain graph (after the way, for pack).
    jit_choices = {"xla", "graph"} if keras.backend.backend() == "tensorflow" else {"xla"}
    assert throughput.autotuned_choice(paths["ensemble_auto"], x) in jit_choices
    way, jit = throughput.autotuned_choice(paths["pack_auto"], x).split(", ")
    assert way in {"grouped", "loop", "ensemble"} and jit in jit_choices
    assert throughput.autotuned_choice(paths["ensemble_xla"], x) is None


def test_matmuls_only_is_the_members_bare_matmul_chain():
    models = [throughput.build_member("mlp", seed) for seed in range(2)]
    x = np.random.default_rng(0).normal(size=(3, 40, 1)).astype("float32")
    expected = 0
    for model in models:
        h = x.reshape(3, -1)
        for layer in model.layers:
            if layer.weights:
                h = h @ keras.ops.convert_to_numpy(layer.kernel)
        expected = expected + h
    np.testing.assert_allclose(throughput.matmul_chain_function(models, x)(), expected, rtol=1e-4, atol=1e-4)
    cnns = [throughput.build_member("cnn1d", seed) for seed in range(2)]
    assert throughput.matmul_chain_function(cnns, x) is None


def _fake_result(ratio_32, fraction_256):
    rows = []
    for batch, ratio in ((32, ratio_32), (256, 1.2)):
        for path in throughput.EK_PATHS + ("predict_loop",):
            fast = path == "pack_xla"
            rows.append(dict(workload="mlp", members=8, batch=batch, path=path,
                             samples_per_s=1000.0 * (ratio if fast else 1.0) * (1 if path != "predict_loop" else 0.001),
                             ratio=ratio if fast else 1.0, gflops=10.0,
                             ceiling_gflops=10.0 / fraction_256,
                             ceiling_fraction=fraction_256 if fast else 0.1))
    return {"info": {}, "matmul_gflops": 10.0, "repeats": 5, "results": rows}


def test_targets_report_met_and_missed():
    checks = throughput.targets(_fake_result(ratio_32=1.6, fraction_256=0.8))
    assert [c["met"] for c in checks] == [True, True, True, True]
    checks = throughput.targets(_fake_result(ratio_32=1.4, fraction_256=0.5))
    assert [c["met"] for c in checks] == [False, True, True, False]
    assert "pack_xla" in checks[0]["measured"]


@pytest.mark.slow
def test_smoke_run_writes_json_markdown_and_png(tmp_path):
    result = throughput.run(workloads=("mlp",), members=(2,), batches=(1,), repeats=1,
                            target_s=0.0, verbose=0)
    paths = throughput.write_reports(result, tmp_path)
    assert [p.name for p in paths] == ["throughput.json", "throughput.md", "throughput.png"]
    saved = json.loads(paths[0].read_text())
    assert {r["path"] for r in saved["results"]} >= {"predict_loop", "ensemble", "pack_xla", "soup_xla"}
    assert saved["info"]["backend"] == keras.backend.backend()
    baseline = [r for r in saved["results"] if r["path"] == "ensemble"][0]
    assert baseline["ratio"] == pytest.approx(1.0)
    markdown = paths[1].read_text()
    assert "| mlp | 2 | 1 | pack_xla (" in markdown  # with the way the autotuner picked
    picked = {r["path"]: r["autotuned"] for r in saved["results"]}
    assert picked["pack_xla"] in {"grouped", "loop", "ensemble"} and picked["ensemble_xla"] is None
    assert {"ensemble_bf16", "pack_bf16", "pack_xla_bf16", "ensemble_xla_bf16", "matmuls_only_bf16",
            "matmuls_only_graph", "matmuls_only_bf16_graph"} <= set(picked)
    assert picked["pack_grouped_xla"] is None  # fixed lowerings are timed alone, not autotuned
    assert "## Autotuned pack vs ensemble vs naive, float32 and bfloat16" in markdown
    assert paths[2].read_bytes()[:4] == b"\x89PNG"


def test_selected_paths_are_the_only_ones_compiled():
    models = [throughput.build_member("mlp", seed) for seed in range(2)]
    x = np.random.default_rng(0).normal(size=(3, 40, 1)).astype("float32")
    paths = throughput.path_functions(models, x, paths=("ensemble", "pack"))
    assert list(paths) == ["ensemble", "pack"]
    np.testing.assert_allclose(paths["pack"](), paths["ensemble"](), atol=1e-5)


def test_mobilenetv2_members_are_logit_classifiers_of_the_workload_shape():
    member = throughput.build_member("mobilenetv2", 0)
    assert member.name == "mobilenetv2_0" and tuple(member.input_shape[1:]) == (32, 32, 3)
    assert tuple(member.output_shape[1:]) == (10,)
    assert member.layers[-1].get_config()["activation"] == "linear"
    assert throughput.member_flops(member) > 2 * 1e6  # depthwise and pointwise convolutions counted
    assert set(throughput.APPLICATION_PATHS) <= set(throughput.COMPILED_PATHS)


def _side_by_side_result():
    rows = []
    for batch, speedup in ((1, 3.0), (256, 1.5)):
        for path, rate in (("ensemble", 100.0), ("pack", 100.0 * speedup), ("ensemble_xla", 200.0),
                           ("pack_xla", 400.0), ("member_xla", 800.0)):
            rows.append(dict(workload="mobilenetv2", members=4, batch=batch, path=path, samples_per_s=rate,
                             ratio=rate / 100.0, gflops=1.0, ceiling_gflops=10.0, ceiling_fraction=0.1))
    return {"info": {"device": "cpu", "device_type": "CPU", "cpu_count": 2, "backend": "tensorflow",
                     "keras": "3"}, "matmul_gflops": 10.0, "repeats": 3, "results": rows}


def test_pack_vs_ensemble_puts_the_ratios_side_by_side():
    result = _side_by_side_result()
    rows = throughput.pack_vs_ensemble(result)
    assert [(r["batch"], r["pack_ratio"], r["pack_xla_ratio"]) for r in rows] == [(1, 3.0, 2.0), (256, 1.5, 2.0)]
    markdown = throughput.to_markdown(result)
    assert "## Packed vs ensemble (keras.applications members)" in markdown
    assert "| mobilenetv2 | 4 | 1 | 100 | 300 | 3.00x | 200 | 400 | 2.00x |" in markdown
    assert throughput.pack_vs_ensemble(result, workloads=("mlp",)) == []


def test_mobilenetv2_workload_defaults_to_four_members_and_its_own_reports(tmp_path, monkeypatch):
    parser = throughput.add_arguments(argparse.ArgumentParser())
    calls = {}

    def fake_run(**kwargs):
        calls.update(kwargs)
        return _side_by_side_result()

    monkeypatch.setattr(throughput, "run", fake_run)
    args = parser.parse_args(["--workloads", "mobilenetv2", "--batches", "1", "256", "--out", str(tmp_path),
                              "--no-plot"])
    assert throughput.main(args) == 0
    assert calls["members"] == {"mobilenetv2": (4,)} and calls["batches"] == [1, 256]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["throughput_mobilenetv2.json",
                                                           "throughput_mobilenetv2.md"]
    args = parser.parse_args(["--workloads", "mlp", "--members", "8", "--out", str(tmp_path), "--no-plot"])
    assert throughput.main(args) == 0  # a subset of the default run does not overwrite its reports
    assert (tmp_path / "throughput_mlp_k8.md").exists() and not (tmp_path / "throughput.md").exists()
    main_defaults = parser.parse_args(["--quick"])
    assert throughput._default_members(main_defaults.workloads or ("mlp", "cnn1d"), True) == {
        "mlp": (2, 8), "cnn1d": (2, 8)}


def test_cli_registers_bench_throughput():
    parser = argparse.ArgumentParser()
    register_cli(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["bench", "throughput", "--quick", "--members", "2", "--out", "x"])
    assert args.quick and args.members == [2] and args.out == "x"
    assert callable(args.run)


def _bound_result(best_fp32=95.0, best_bf16=80.0):
    """K=8 MLP rows at batch 32 and 256 with both matmuls_only bounds at 100 samples/s."""
    rates = {"ensemble": 50.0, "ensemble_xla": 60.0, "pack": 40.0, "pack_xla": best_fp32,
             "pack_grouped": 30.0, "pack_grouped_xla": 30.0, "pack_loop": 30.0, "pack_loop_xla": 30.0,
             "predict_loop": 0.01, "matmuls_only": 100.0, "ensemble_bf16": 25.0, "ensemble_xla_bf16": 70.0,
             "pack_bf16": 20.0, "pack_xla_bf16": best_bf16, "matmuls_only_bf16": 100.0}
    rows = [dict(workload="mlp", members=8, batch=batch, path=path, samples_per_s=rate,
                 ratio=rate / rates["ensemble"], gflops=1.0, ceiling_gflops=10.0, ceiling_fraction=0.1,
                 autotuned="ensemble" if path in ("pack_xla", "pack_xla_bf16") else
                 "loop" if path in ("pack", "pack_bf16") else None)
            for batch in (32, 256) for path, rate in rates.items()]
    return {"info": {"device": "cpu", "device_type": "CPU", "cpu_count": 2, "backend": "tensorflow",
                     "keras": "3", "load_avg": 3.5, "load_avg_end": 4.0},
            "matmul_gflops": 10.0, "repeats": 3, "results": rows}


def test_best_path_against_the_matmuls_only_bound_per_precision():
    result = _bound_result(best_fp32=95.0, best_bf16=80.0)
    assert throughput.bound_lines(result) == [
        "best float32 path at batch 256 >= 90% of matmuls_only: met (pack_xla: 95%; mlp, K=8)",
        "best bfloat16 path at batch 256 >= 90% of matmuls_only_bf16: NOT met "
        "(pack_xla_bf16: 80%; mlp, K=8)"]
    checks = [c for c in throughput.targets(result) if "matmuls_only" in c["target"] and "best" in c]
    assert [(c["best"], c["met"]) for c in checks] == [("pack_xla", True), ("pack_xla_bf16", False)]
    slow = _bound_result(best_fp32=85.0)
    assert throughput.bound_lines(slow)[0].startswith("best float32 path at batch 256 >= 90% of "
                                                      "matmuls_only: NOT met (pack_xla: 85%")
    # The bound is the faster matmul chain: XLA or, here, the plain graph.
    graph_faster = _bound_result(best_fp32=95.0)
    graph_faster["results"].append(dict(graph_faster["results"][-1], path="matmuls_only_graph",
                                        samples_per_s=190.0))
    assert throughput.bound_lines(graph_faster)[0].startswith(
        "best float32 path at batch 256 >= 90% of matmuls_only: NOT met (pack_xla: 50%")


def test_auto_table_sets_the_pick_against_the_best_fixed_setting():
    result = _bound_result()
    base = result["results"][-1]
    result["results"] += [dict(base, batch=256, path="pack_auto", samples_per_s=90.0, ratio=1.8,
                               autotuned="ensemble, xla"),
                          dict(base, batch=256, path="ensemble_auto", samples_per_s=60.0, ratio=1.2,
                               autotuned="graph")]
    rows = throughput.auto_vs_fixed(result)
    assert [(r["path"], r["best_fixed"], round(r["vs_best_fixed"], 3)) for r in rows] == [
        ("ensemble_auto", "ensemble_xla", 1.0), ("pack_auto", "pack_xla", round(90 / 95, 3))]
    markdown = throughput.to_markdown(result)
    assert '## jit_compile="auto": what it picked' in markdown
    assert "| mlp | 8 | 256 | pack_auto | ensemble, xla | 1.80x | pack_xla | 0.95x |" in markdown
    # Older results without the auto paths still report (targets skip absent paths).
    assert throughput.auto_vs_fixed(_bound_result()) == []


def test_side_by_side_table_shows_both_precisions_the_pick_and_the_load():
    result = _bound_result()
    rows = throughput.precision_side_by_side(result)
    assert [(r["batch"], r["precision"], r["ratios"][3], r["picked"][3]) for r in rows] == [
        (32, "float32", 1.9, "ensemble"), (32, "bfloat16", 1.6, "ensemble"),
        (256, "float32", 1.9, "ensemble"), (256, "bfloat16", 1.6, "ensemble")]
    markdown = throughput.to_markdown(result)
    assert ("| mlp | 8 | 256 | float32 | 50 | 1.00x | 1.20x | 0.80x (loop) | 1.90x (ensemble) | 2.00x | "
            "95% (pack_xla) |") in markdown
    assert ("| mlp | 8 | 256 | bfloat16 | 50 | 0.50x | 1.40x | 0.40x (loop) | 1.60x (ensemble) | 2.00x | "
            "80% (pack_xla_bf16) |") in markdown
    assert "**best float32 path at batch 256 >= 90% of matmuls_only: met" in markdown
    assert "load average 3.5 before and 4.0 after the run on 2 cores" in markdown
