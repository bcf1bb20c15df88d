"""Throughput of the ways to run an ensemble, side by side in one process.

For K members of a workload (an MLP, a Conv1D CNN on mnist1d-shaped input and
a Conv2D CNN on 32x32x3 input) and each batch size, every path runs on the
same inputs; warm-up calls (tracing, XLA compilation) are excluded and the
reported time is the median of ``repeats`` timed repeats. The
``keras.applications`` workloads (``mobilenetv2``, ``efficientnetb0``: K=4 members by
default, run only when asked with ``--workloads``) time the compiled paths
``ensemble``/``pack`` with and without XLA, with ``jit_compile="auto"`` and
``member_xla``, and the report puts packed and ensemble side by side. Paths:

1. ``predict_loop``: ``model.predict`` per member, then the mean (the loop users write by hand);
2. ``tf_function_loop``: a Python loop of member calls inside one ``tf.function``;
3. ``ensemble`` / ``ensemble_xla``: ``ek.ensemble`` through ``ek.compile_for_inference``;
4. ``pack`` / ``pack_xla``: ``ek.pack`` (``lowering="auto"``) autotuned by
   ``compile_for_inference``, which picks per shape among the two lowerings
   (``pack_grouped[_xla]``: einsum / grouped conv; ``pack_loop[_xla]``: K ops per
   layer, also timed alone) and the unpacked members (``"ensemble"``); the row's
   ``autotuned`` field says what it picked;
4b. ``ensemble_auto`` / ``pack_auto``: ``compile_for_inference(jit_compile="auto")``,
   which also times XLA against the plain graph per shape; the row's ``autotuned``
   field says what it picked (``"xla"``/``"graph"``, after the way for ``pack_auto``)
   and the report's "jit_compile=auto" table sets it against the best fixed setting;
5. ``member_xla`` (one member alone, the floor) and ``soup_xla`` (a weight-averaged
   model: the cost of one member);
6. a matmul ceiling: GFLOP/s of a 2048x2048 float32 matmul on the same device, timed in
   the same round-robin as the paths; for MLP members also ``matmuls_only``: the
   members' Dense matmuls alone (no bias, activation, softmax or mean), the most
   these matrix shapes give on the device, compiled with XLA and, as
   ``matmuls_only_graph``, without (TF's oneDNN graph ran them faster than XLA on
   this project's CPU); the bound is the faster of the two;
7. bfloat16 (``compile_for_inference(dtype="bfloat16")``: bfloat16 compute, float32
   variables and output): ``ensemble_bf16`` (the naive graph in bfloat16),
   ``ensemble_xla_bf16``, ``pack_bf16``, ``pack_xla_bf16`` and, for MLP
   members, ``matmuls_only_bf16[_graph]``, timed in the same round-robin as the float32 paths.

Ratios are against path 3 without XLA (the naive graph); achieved GFLOP/s
counts the multiply-adds of the K members' Dense/Conv layers (2 FLOPs each).
The 1-minute load average before and after the run is recorded: the CPU may be
shared with other processes, which slows every path alike (round-robin) but
lowers the absolute numbers.
"""

from __future__ import annotations

import json
import os
import platform
import statistics

import keras
import numpy as np

from ensemblekit import _graph
from ensemblekit._io import write_text_atomic
from ensemblekit._timing import time_paths
from ensemblekit.compose import ensemble
from ensemblekit.costs import macs
from ensemblekit.inference import compile_for_inference
from ensemblekit.pack import pack

L = keras.layers
BASELINE = "ensemble"
WORKLOADS = {
    "mlp": (40, 1),
    "cnn1d": (40, 1),
    "cnn2d": (32, 32, 3),
    "mobilenetv2": (32, 32, 3),
    "efficientnetb0": (32, 32, 3),
    "resnet50": (32, 32, 3),
    "convnexttiny": (32, 32, 3),
}
DEFAULT_WORKLOADS = ("mlp", "cnn1d", "cnn2d")
# keras.applications members (weights=None, 10 classes, logits): name -> constructor name.
APPLICATIONS = {"mobilenetv2": "MobileNetV2", "efficientnetb0": "EfficientNetB0", "resnet50": "ResNet50",
                "convnexttiny": "ConvNeXtTiny"}
# Default member counts per workload (``members=None``).
DEFAULT_MEMBERS = {name: (4,) for name in APPLICATIONS}
# Paths timed for keras.applications members (the loops of K calls and both forced
# lowerings take minutes to trace for a real architecture; they add nothing to the comparison).
APPLICATION_PATHS = ("ensemble", "ensemble_xla", "pack", "pack_xla", "ensemble_auto", "pack_auto",
                     "member_xla")


def build_member(workload, seed):
    """One member of ``workload`` (``WORKLOADS``; 10 classes, logits)."""
    keras.utils.set_random_seed(seed)
    shape = WORKLOADS[workload]
    if workload in APPLICATIONS:
        constructor = getattr(keras.applications, APPLICATIONS[workload])
        model = constructor(weights=None, input_shape=shape, classes=10, classifier_activation=None)
        return keras.Model(model.inputs, model.outputs, name=f"{workload}_{seed}")
    if workload == "mlp":
        layers = [L.Flatten(), L.Dense(256, activation="relu"), L.Dense(256, activation="relu")]
    elif workload == "cnn1d":
        layers = [L.Conv1D(32, 5, activation="relu"), L.MaxPooling1D(2),
                  L.Conv1D(64, 3, activation="relu"), L.GlobalAveragePooling1D()]
    else:
        layers = [L.Conv2D(16, 3, activation="relu"), L.MaxPooling2D(2),
                  L.Conv2D(32, 3, activation="relu"), L.GlobalAveragePooling2D()]
    return keras.Sequential([keras.Input(shape), *layers, L.Dense(10)], name=f"{workload}_{seed}")


def member_flops(model):
    """FLOPs (2 per multiply-add) of one forward pass of ``model`` per sample (Dense and Conv)."""
    return 2 * macs(model)


def soup(models):
    """A uniform weight average of ``models`` (the cost of one member)."""
    merged = keras.models.clone_model(models[0])
    arrays = [_graph.get_arrays(m) for m in models]
    _graph.set_arrays(merged, [np.mean(group, axis=0) for group in zip(*arrays, strict=True)])
    return merged


def device_info():
    """What ran the benchmark: device name, backend, TF/Keras versions."""
    info = {"backend": keras.backend.backend(), "keras": keras.__version__,
            "platform": platform.platform(), "python": platform.python_version()}
    gpus = []
    if info["backend"] == "tensorflow":
        import tensorflow as tf

        info["tensorflow"] = tf.__version__
        gpus = [tf.config.experimental.get_device_details(g).get("device_name", g.name)
                for g in tf.config.list_physical_devices("GPU")]
    elif info["backend"] == "jax":
        import jax

        info["jax"] = jax.__version__
        gpus = [d.device_kind for d in jax.devices() if d.platform == "gpu"]
    info["device"] = gpus[0] if gpus else _cpu_name()
    info["device_type"] = "GPU" if gpus else "CPU"
    info["cpu_count"] = _cpu_count()
    info["load_avg"] = load_average()
    return info


def load_average():
    """The 1-minute load average (runnable processes; ``None`` where the OS does not say)."""
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None


def _cpu_name():
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _cpu_count():
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def matmul_function(size=2048):
    """``(fn, flops)``: ``fn()`` runs one ``size``x``size`` float32 matmul (the device's practical peak)."""
    rng = np.random.default_rng(0)
    a, b = (rng.normal(size=(size, size)).astype("float32") for _ in "ab")
    x = keras.Input((size,))
    model = keras.Model(x, keras.ops.matmul(x, keras.ops.convert_to_tensor(b)))
    compiled = compile_for_inference(model, jit_compile=True)
    a = keras.ops.convert_to_tensor(a)
    return (lambda: keras.ops.convert_to_numpy(compiled.fn(a))), 2 * size**3


def matmul_chain_function(models, x, dtype="float32", jit_compile=True):
    """``fn()`` running only the members' Dense matmuls on ``x`` (XLA), or None if not an MLP.

    The same chain of ``(batch, in) @ (in, out)`` products as the members, with no
    bias, activation, softmax or mean: what these matrix shapes reach on this
    device with nothing else in the way. It bounds any implementation of the
    ensemble from above, so the report can tell a slow ensemble from a shape
    the hardware runs slowly (small contractions, 10-wide outputs). ``dtype``
    ``"bfloat16"`` multiplies bfloat16 inputs and kernels (the bound of the
    bfloat16 paths); ``jit_compile=False`` runs it as a plain TF graph.
    """
    dense = [[layer for layer in m.layers if layer.weights] for m in models]
    if not all(layers and all(isinstance(layer, L.Dense) for layer in layers) for layers in dense):
        return None
    flat = int(np.prod(x.shape[1:]))
    inputs = keras.Input(x.shape[1:])
    hidden = keras.ops.cast(keras.ops.reshape(inputs, (-1, flat)), dtype)
    outputs = []
    for layers in dense:
        h = hidden
        for layer in layers:
            # A copy of the kernel: on JAX, Keras' jitted ``predict`` donates (deletes) the variable's array.
            kernel = keras.ops.convert_to_tensor(keras.ops.convert_to_numpy(layer.kernel))
            h = keras.ops.matmul(h, keras.ops.cast(kernel, dtype))
        outputs.append(h)
    compiled = compile_for_inference(keras.Model(inputs, sum(outputs[1:], outputs[0])), jit_compile=jit_compile)
    return lambda: compiled(x)


def path_functions(models, x, paths=None):
    """``{path: fn}`` where ``fn()`` runs that path on ``x`` and returns numpy probabilities.

    ``paths`` selects some of them (default: all); only the selected are compiled.
    """
    if paths is not None:
        return _compiled_paths(models, x, paths)
    backend = keras.backend.backend()

    def predict_loop():
        probs = [keras.ops.convert_to_numpy(keras.ops.softmax(m.predict(x, verbose=0)))
                 for m in models]
        return np.mean(probs, axis=0)

    paths = {"predict_loop": predict_loop}
    if backend == "tensorflow":
        import tensorflow as tf

        loop = tf.function(lambda t: tf.add_n([tf.nn.softmax(m(t, training=False))
                                               for m in models]) / len(models))
        paths["tf_function_loop"] = lambda: loop(x).numpy()
    return {**paths, **_compiled_paths(models, x, COMPILED_PATHS)}


# The paths that run through ``compile_for_inference``: path -> (model maker, its keyword
# arguments). ``pack`` / ``pack_xla`` are autotuned (lowerings and the unpacked members); the
# fixed-lowering paths are not, so they time that lowering alone.
_FIXED = dict(autotune=False)
COMPILED_PATHS = {
    "ensemble": (lambda models: ensemble(models, "mean"), dict(jit_compile=False)),
    "ensemble_xla": (lambda models: ensemble(models, "mean"), dict(jit_compile=True)),
    "pack": (lambda models: pack(models, "mean"), dict(jit_compile=False)),
    "pack_xla": (lambda models: pack(models, "mean"), dict(jit_compile=True)),
    "pack_grouped": (lambda models: pack(models, "mean", lowering="grouped"), dict(jit_compile=False, **_FIXED)),
    "pack_grouped_xla": (lambda models: pack(models, "mean", lowering="grouped"), dict(jit_compile=True, **_FIXED)),
    "pack_loop": (lambda models: pack(models, "mean", lowering="loop"), dict(jit_compile=False, **_FIXED)),
    "pack_loop_xla": (lambda models: pack(models, "mean", lowering="loop"), dict(jit_compile=True, **_FIXED)),
    "ensemble_auto": (lambda models: ensemble(models, "mean"), dict(jit_compile="auto")),
    "pack_auto": (lambda models: pack(models, "mean"), dict(jit_compile="auto")),
    "member_xla": (lambda models: models[0], dict(jit_compile=True)),
    "soup_xla": (lambda models: soup(models), dict(jit_compile=True)),
    "ensemble_bf16": (lambda models: ensemble(models, "mean"), dict(jit_compile=False, dtype="bfloat16")),
    "ensemble_xla_bf16": (lambda models: ensemble(models, "mean"), dict(jit_compile=True, dtype="bfloat16")),
    "pack_bf16": (lambda models: pack(models, "mean"), dict(jit_compile=False, dtype="bfloat16")),
    "pack_xla_bf16": (lambda models: pack(models, "mean"), dict(jit_compile=True, dtype="bfloat16")),
}


def _compiled_paths(models, x, names):
    """``{name: fn}``; ``fn.inference`` is the ``compile_for_inference`` result (its ``lowerings_``)."""
    paths = {}
    for name in names:
        make, options = COMPILED_PATHS[name]
        compiled = compile_for_inference(make(models), **options)
        paths[name] = (lambda f: lambda: f(x))(compiled)
        paths[name].inference = compiled
    return paths


def autotuned_choice(fn, x):
    """What ``compile_for_inference`` picked for ``x``'s shape behind path function ``fn`` (or None).

    The way (``"grouped"``, ``"loop"``, ``"ensemble"``, ``"packed"``) for an
    autotuned packed model; with ``jit_compile="auto"`` also ``"xla"`` or
    ``"graph"`` (e.g. ``"loop, graph"``).
    """
    compiled = getattr(fn, "inference", None)
    if compiled is None:
        return None
    shape = tuple(x.shape)
    choice = compiled.lowerings_.get(shape)
    if compiled.jit_compile == "auto" and shape in compiled.jit_compile_:
        jit = "xla" if compiled.jit_compile_[shape] else "graph"
        choice = jit if choice is None else f"{choice}, {jit}"
    return choice


def run(workloads=DEFAULT_WORKLOADS, members=None, batches=(1, 32, 256), repeats=5,
        target_s=0.1, verbose=1):
    """Measure every path for every workload, K and batch size.

    The matmul ceiling is timed in the same round-robin as the paths, so each
    row's ``ceiling_fraction`` compares numbers taken under the same load.
    ``members`` is the member counts K for every workload, or ``{workload: Ks}``,
    or ``None``: each workload's default (``DEFAULT_MEMBERS``, else 2, 4 and 8).
    ``keras.applications`` workloads time ``APPLICATION_PATHS``.

    Returns:
        A dict with ``"info"`` (device, versions), ``"matmul_gflops"`` (median over
        configurations) and ``"results"``: one row per (workload, K, batch, path) with
        ``samples_per_s``, ``ratio`` (vs ``ensemble`` without XLA), ``gflops``,
        ``ceiling_gflops`` and ``ceiling_fraction``.
    """
    info = device_info()
    matmul, matmul_flops = matmul_function()
    counts = members if isinstance(members, dict) else {
        w: members or DEFAULT_MEMBERS.get(w, (2, 4, 8)) for w in workloads}
    configs = [(w, k, b) for w in workloads for k in counts[w] for b in batches]
    progress = keras.utils.Progbar(len(configs), verbose=verbose)
    rows, ceilings = [], []
    for index, (workload, k, batch) in enumerate(configs):
        models = [build_member(workload, seed) for seed in range(k)]
        flops = member_flops(models[0])
        x = np.random.default_rng(index).normal(size=(batch, *WORKLOADS[workload])).astype("float32")
        paths = APPLICATION_PATHS if workload in APPLICATIONS else None
        functions = {**path_functions(models, x, paths), "matmul": matmul}
        chain = matmul_chain_function(models, x)
        if chain is not None:
            functions["matmuls_only"] = chain
            functions["matmuls_only_graph"] = matmul_chain_function(models, x, jit_compile=False)
            if "pack_xla_bf16" in functions:
                functions["matmuls_only_bf16"] = matmul_chain_function(models, x, "bfloat16")
                functions["matmuls_only_bf16_graph"] = matmul_chain_function(models, x, "bfloat16", False)
        seconds = time_paths(functions, repeats=repeats, target_s=target_s)
        ceiling = matmul_flops / seconds.pop("matmul") / 1e9
        ceilings.append(ceiling)
        for path, time_per_call in seconds.items():
            rate = batch / time_per_call
            gflops = rate * flops * (1 if path in ("member_xla", "soup_xla") else k) / 1e9
            rows.append(dict(workload=workload, members=k, batch=batch, path=path,
                             samples_per_s=rate, ratio=seconds[BASELINE] / time_per_call,
                             gflops=gflops, ceiling_gflops=ceiling, ceiling_fraction=gflops / ceiling,
                             autotuned=autotuned_choice(functions[path], x)))
        keras.backend.clear_session()
        progress.update(index + 1)
    info["load_avg_end"] = load_average()
    return {"info": info, "matmul_gflops": statistics.median(ceilings), "repeats": repeats,
            "results": rows}


EK_PATHS = ("ensemble", "ensemble_xla", "pack", "pack_xla", "pack_grouped", "pack_grouped_xla",
            "pack_loop", "pack_loop_xla", "ensemble_auto", "pack_auto")
# jit_compile="auto" paths -> the fixed-setting paths they choose among.
AUTO_PATHS = {"ensemble_auto": ("ensemble", "ensemble_xla"), "pack_auto": ("pack", "pack_xla")}
EK_PATHS_BF16 = ("ensemble_bf16", "ensemble_xla_bf16", "pack_bf16", "pack_xla_bf16")
# CPU target: the best path at batch 256 reaches this fraction of the members' bare matmul
# chain (no bias, activation or reduction) measured in the same run.
BOUND_FRACTION = 0.9


def targets(result, workload="mlp", members=8):
    """The speed goals for ``workload`` with K=``members``, checked on ``result``.

    Goals: the fastest ensemblekit path is at least 1.5x ``ensemble`` (no XLA)
    at batch <= 32 and at least as fast above; at least 100x the loop of
    ``predict`` calls at batch 32; at least 70% of the matmul ceiling at the
    largest batch (>= 256) and, where the run timed ``matmuls_only`` (and
    ``matmuls_only_bf16``), the best float32 (bfloat16) path at least
    ``BOUND_FRACTION`` of it (:func:`bound_check`).

    Returns:
        A list of ``{"target", "measured", "met"}`` rows.
    """
    rows = [r for r in result["results"] if r["workload"] == workload and r["members"] == members]
    if not rows:
        return []
    checks = []
    batches = sorted({r["batch"] for r in rows})
    for batch in batches:
        at = {r["path"]: r for r in rows if r["batch"] == batch}
        best = max((p for p in EK_PATHS if p in at), key=lambda p: at[p]["samples_per_s"])
        goal = 1.5 if batch <= 32 else 1.0
        checks.append(dict(target=f"batch {batch}: fastest ensemblekit path >= {goal}x ensemble (no XLA)",
                           measured=f"{best}: {at[best]['ratio']:.2f}x", met=at[best]["ratio"] >= goal))
        if batch == 32:
            speedup = at[best]["samples_per_s"] / at["predict_loop"]["samples_per_s"]
            checks.append(dict(target="batch 32: >= 100x the predict loop",
                               measured=f"{best}: {speedup:.0f}x", met=speedup >= 100))
        if batch == batches[-1] and batch >= 256:
            measured = (f"{best}: {at[best]['ceiling_fraction']:.0%} "
                        f"({at[best]['gflops']:.1f} of {at[best]['ceiling_gflops']:.1f} GFLOP/s)")
            if "matmuls_only" in at:
                measured += (f"; the members' matmuls alone (no bias, activation, softmax): "
                             f"{at['matmuls_only']['ceiling_fraction']:.0%}")
            checks.append(dict(target=f"batch {batch}: >= 70% of the matmul ceiling",
                               measured=measured, met=at[best]["ceiling_fraction"] >= 0.7))
        if batch == batches[-1] and batch >= 256:
            checks += [bound_check(at, batch, precision) for precision in ("float32", "bfloat16")
                       if _bound_path(precision) in at]
    return checks


def _bound_path(precision):
    return "matmuls_only" if precision == "float32" else "matmuls_only_bf16"


def _bound_rate(at, precision):
    """Samples/s of the bound: the faster of ``matmuls_only[_bf16]`` with XLA and ``..._graph`` without."""
    bound = _bound_path(precision)
    return max(at[p]["samples_per_s"] for p in (bound, f"{bound}_graph") if p in at)


def bound_check(at, batch, precision="float32"):
    """The best path of ``precision`` against its ``matmuls_only`` bound, both from one round-robin.

    ``at`` maps path -> row for one (workload, K, batch). Both do the same
    matrix products, so the fraction is the ratio of samples/s; the bound is
    the faster of the XLA and plain-graph matmul chains.
    """
    paths = [p for p in (EK_PATHS if precision == "float32" else EK_PATHS_BF16) if p in at]
    best = max(paths, key=lambda p: at[p]["samples_per_s"])
    bound = _bound_path(precision)
    fraction = at[best]["samples_per_s"] / _bound_rate(at, precision)
    return dict(target=f"batch {batch}: best {precision} path >= {BOUND_FRACTION:.0%} of {bound}",
                measured=f"{best}: {fraction:.0%}", met=fraction >= BOUND_FRACTION, best=best,
                fraction=fraction)


# The side-by-side table per precision: naive graph, ensemble + XLA, autotuned pack without and
# with XLA, then the bound (ratios against the float32 naive graph).
SIDE_BY_SIDE = {"float32": ("ensemble", "ensemble_xla", "pack", "pack_xla", "matmuls_only"),
                "bfloat16": ("ensemble_bf16", "ensemble_xla_bf16", "pack_bf16", "pack_xla_bf16",
                             "matmuls_only_bf16")}


def precision_side_by_side(result):
    """Per (workload, K, batch, precision) timed with the bfloat16 paths: the naive graph, ``ek.ensemble``
    with XLA, the autotuned ``ek.pack`` without and with XLA (and what each picked) and the
    ``matmuls_only`` bound, as ratios to the float32 naive graph, plus the best path's fraction of
    the bound."""
    table = {}
    for r in result["results"]:
        table.setdefault((r["workload"], r["members"], r["batch"]), {})[r["path"]] = r
    rows = []
    for (workload, members, batch), at in table.items():
        if not all(p in at for paths in SIDE_BY_SIDE.values() for p in paths[:4]):
            continue
        naive = at[BASELINE]["samples_per_s"]
        for precision, paths in SIDE_BY_SIDE.items():
            bounded = paths[4] in at
            rows.append(dict(workload=workload, members=members, batch=batch, precision=precision,
                             naive_samples_per_s=naive, paths=paths[:4],
                             ratios=[at[p]["ratio"] for p in paths[:4]],
                             picked=[at[p].get("autotuned") for p in paths[:4]],
                             bound=_bound_rate(at, precision) / naive if bounded else None,
                             check=bound_check(at, batch, precision) if bounded else None))
    return rows


def _side_by_side_markdown(rows):
    def cell(ratio, picked):
        return f"{ratio:.2f}x" + (f" ({picked})" if picked else "")

    lines = ["## Autotuned pack vs ensemble vs naive, float32 and bfloat16", "",
             "Ratios to the float32 naive graph (`ensemble`: `ek.ensemble` through "
             "`compile_for_inference` without XLA), all timed in one round-robin per batch. `pack` / "
             "`pack_xla` is `ek.pack` autotuned per shape; in brackets what it picked (`grouped` / "
             "`loop` lowering or `ensemble`, the unpacked members). bfloat16 rows run "
             "`compile_for_inference(dtype=\"bfloat16\")`. `matmuls_only` is the members' bare matmul "
             "chain in that precision, the faster of XLA and plain graph (the bound); the last column "
             "is the best path of that precision as a fraction of it.", "",
             "| workload | K | batch | precision | naive samples/s (float32) | naive | ensemble_xla | "
             "pack (picked) | pack_xla (picked) | matmuls_only | best / bound |",
             "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        cells = [r["workload"], r["members"], r["batch"], r["precision"], f"{r['naive_samples_per_s']:,.0f}",
                 *(cell(ratio, picked) for ratio, picked in zip(r["ratios"], r["picked"], strict=True)),
                 "–" if r["bound"] is None else f"{r['bound']:.2f}x",
                 "–" if r["check"] is None else f"{r['check']['fraction']:.0%} ({r['check']['best']})"]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return lines + [""]


def bound_lines(result, workload="mlp", members=8):
    """The lines ``best <precision> path at batch B >= 90% of <bound>: met/NOT met`` for the largest
    batch (>= 256) of ``workload`` with K=``members``, one per precision timed with its bound."""
    rows = [r for r in result["results"] if r["workload"] == workload and r["members"] == members]
    batch = max((r["batch"] for r in rows), default=0)
    if batch < 256:
        return []
    at = {r["path"]: r for r in rows if r["batch"] == batch}
    lines = []
    for precision in ("float32", "bfloat16"):
        if _bound_path(precision) in at:
            check = bound_check(at, batch, precision)
            lines.append(f"best {precision} path at batch {batch} >= {BOUND_FRACTION:.0%} of "
                         f"{_bound_path(precision)}: {'met' if check['met'] else 'NOT met'} "
                         f"({check['measured']}; {workload}, K={members})")
    return lines


def pack_vs_ensemble(result, workloads=None):
    """Packed vs ensemble, each compiled the same way, per (workload, K, batch).

    Returns:
        Rows with the samples/s of ``ensemble``, ``pack``, ``ensemble_xla`` and
        ``pack_xla`` and ``pack_ratio`` / ``pack_xla_ratio`` (packed over ensemble).
    """
    table = {}
    for r in result["results"]:
        if workloads is None or r["workload"] in workloads:
            table.setdefault((r["workload"], r["members"], r["batch"]), {})[r["path"]] = r["samples_per_s"]
    rows = []
    for (workload, members, batch), rates in table.items():
        if all(p in rates for p in ("ensemble", "pack", "ensemble_xla", "pack_xla")):
            rows.append(dict(workload=workload, members=members, batch=batch,
                             **{p: rates[p] for p in ("ensemble", "pack", "ensemble_xla", "pack_xla")},
                             pack_ratio=rates["pack"] / rates["ensemble"],
                             pack_xla_ratio=rates["pack_xla"] / rates["ensemble_xla"]))
    return rows


def auto_vs_fixed(result):
    """Per (workload, K, batch, auto path) timed: what ``jit_compile="auto"`` picked and its speed
    against the faster of the two fixed settings it chose among (``AUTO_PATHS``), same round-robin.

    Returns:
        Rows with ``path``, ``picked``, ``ratio`` (to the naive graph), ``best_fixed`` (path) and
        ``vs_best_fixed`` (auto samples/s over the best fixed path's; about 1.0 when it picked right).
    """
    table = {}
    for r in result["results"]:
        table.setdefault((r["workload"], r["members"], r["batch"]), {})[r["path"]] = r
    rows = []
    for (workload, members, batch), at in table.items():
        for path, fixed in AUTO_PATHS.items():
            if path in at and all(p in at for p in fixed):
                best = max(fixed, key=lambda p: at[p]["samples_per_s"])
                rows.append(dict(workload=workload, members=members, batch=batch, path=path,
                                 picked=at[path].get("autotuned"), ratio=at[path]["ratio"], best_fixed=best,
                                 vs_best_fixed=at[path]["samples_per_s"] / at[best]["samples_per_s"]))
    return rows


def _auto_markdown(rows):
    lines = ['## jit_compile="auto": what it picked', "",
             '`compile_for_inference(jit_compile="auto")` times XLA against the plain TF graph per shape '
             "(for `pack` every way as a plain graph, with XLA once the XLA `grouped` lowering wins); `vs best fixed` is its samples/s over the "
             "faster of the same model compiled with and without XLA (1.00x: it picked right), timed in "
             "the same round-robin.", "",
             "| workload | K | batch | path | picked | vs ensemble | best fixed | vs best fixed |",
             "|---|---:|---:|---|---|---:|---|---:|"]
    lines += [f"| {r['workload']} | {r['members']} | {r['batch']} | {r['path']} | {r['picked'] or '–'} | "
              f"{r['ratio']:.2f}x | {r['best_fixed']} | {r['vs_best_fixed']:.2f}x |" for r in rows]
    return lines + [""]


def to_markdown(result):
    """A Markdown report: device, target checks, and one table row per measurement."""
    info = result["info"]
    versions = ", ".join(f"{k} {info[k]}" for k in ("tensorflow", "jax", "keras") if k in info)
    load = ""
    if info.get("load_avg") is not None:
        load = (f" 1-minute load average {info['load_avg']} before and {info.get('load_avg_end')} after "
                f"the run on {info['cpu_count']} cores: above the core count, other processes shared "
                "the CPU, which lowers absolute numbers (ratios are timed round-robin).")
    lines = [
        "# Ensemble throughput",
        "",
        f"Device: {info['device']} ({info['device_type']}, {info['cpu_count']} CPU cores visible); "
        f"backend {info['backend']}; {versions}. Median of {result['repeats']} repeats, warm-up "
        f"excluded, paths timed round-robin. Matmul ceiling (2048² float32, XLA, median over "
        f"configurations): {result['matmul_gflops']:.1f} GFLOP/s; each row's fraction uses the "
        f"ceiling measured in its own round-robin.{load}",
        "",
    ]
    checks = targets(result)
    if checks:
        lines += ["## Targets (K=8 MLP)", "", "| target | measured | met |", "|---|---|---|"]
        lines += [f"| {c['target']} | {c['measured']} | {'yes' if c['met'] else 'NO'} |" for c in checks]
        lines.append("")
    side_by_side = precision_side_by_side(result)
    if side_by_side:
        lines += _side_by_side_markdown(side_by_side)
        lines += [f"**{line}**" for line in bound_lines(result)] + [""]
    side_by_side = pack_vs_ensemble(result, workloads=tuple(APPLICATIONS))
    if side_by_side:
        lines += ["## Packed vs ensemble (keras.applications members)", "",
                  "`compile_for_inference(ek.pack(members))` vs `compile_for_inference(ek.ensemble(members))`, "
                  "timed in the same round-robin.", "",
                  "| workload | K | batch | ensemble samples/s | pack samples/s | pack / ensemble | "
                  "ensemble_xla samples/s | pack_xla samples/s | pack_xla / ensemble_xla |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        lines += [f"| {r['workload']} | {r['members']} | {r['batch']} | {r['ensemble']:,.0f} | "
                  f"{r['pack']:,.0f} | {r['pack_ratio']:.2f}x | {r['ensemble_xla']:,.0f} | "
                  f"{r['pack_xla']:,.0f} | {r['pack_xla_ratio']:.2f}x |" for r in side_by_side]
        lines.append("")
    auto = auto_vs_fixed(result)
    if auto:
        lines += _auto_markdown(auto)
    lines += ["## All measurements", "",
              "| workload | K | batch | path | samples/s | vs ensemble | GFLOP/s | of ceiling |",
              "|---|---:|---:|---|---:|---:|---:|---:|"]
    for r in result["results"]:
        picked = f" ({r['autotuned']})" if r.get("autotuned") else ""
        lines.append(f"| {r['workload']} | {r['members']} | {r['batch']} | {r['path']}{picked} | "
                     f"{r['samples_per_s']:,.0f} | {r['ratio']:.2f}x | {r['gflops']:.2f} | "
                     f"{r['ceiling_fraction']:.1%} |")
    return "\n".join(lines) + "\n"


def plot(result, path, members=None):
    """Save a PNG: samples/s vs batch per path, one panel per workload (its largest K)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["results"]
    workloads = list(dict.fromkeys(r["workload"] for r in rows))
    figure, axes = plt.subplots(1, len(workloads), figsize=(5 * len(workloads), 4), squeeze=False)
    for axis, workload in zip(axes[0], workloads, strict=True):
        k = members or max(r["members"] for r in rows if r["workload"] == workload)
        selected = [r for r in rows if r["workload"] == workload and r["members"] == k]
        for number, name in enumerate(dict.fromkeys(r["path"] for r in selected)):
            points = sorted((r["batch"], r["samples_per_s"]) for r in selected if r["path"] == name)
            axis.plot(*zip(*points, strict=True), marker="o", label=name, color=plt.cm.tab20(number),
                      linestyle="--" if name.endswith("_xla") else "-")
        axis.set(xscale="log", yscale="log", xlabel="batch size", ylabel="samples/s",
                 title=f"{workload}, K={k}")
        axis.grid(True, which="both", alpha=0.3)
    axes[0][-1].legend(fontsize=7)
    figure.suptitle(f"{result['info']['device']} ({result['info']['backend']})", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def write_reports(result, out_dir, stem="throughput", with_plot=True):
    """Write ``<stem>.json``, ``<stem>.md`` and (optionally) ``<stem>.png`` into ``out_dir``."""
    paths = write_json_and_markdown(result, to_markdown(result), out_dir, stem)
    if with_plot:
        paths.append(paths[0].with_suffix(".png"))
        plot(result, paths[-1])
    return paths


def write_json_and_markdown(result, markdown, out_dir, stem):
    """Write ``result`` as ``<stem>.json`` and ``markdown`` as ``<stem>.md`` (atomically); return both paths."""
    from pathlib import Path

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{stem}.json", out_dir / f"{stem}.md"]
    write_text_atomic(paths[0], json.dumps(result, indent=1))
    write_text_atomic(paths[1], markdown)
    return paths


def add_arguments(parser):
    """The command-line options shared by ``python -m benchmarks.throughput`` and the CLI."""
    parser.add_argument("--quick", action="store_true",
                        help="short run: K=2,8, batches 1,256, MLP and Conv1D, 3 repeats")
    parser.add_argument("--out", default="benchmarks/results", help="folder for the reports")
    parser.add_argument("--workloads", nargs="+", choices=list(WORKLOADS), default=None,
                        help=f"default: {' '.join(DEFAULT_WORKLOADS)}; keras.applications members "
                             f"({', '.join(APPLICATIONS)}: K=4 by default) run only when named; a "
                             "run of other workloads or member counts writes throughput_<workloads>[_k<K>...].*")
    parser.add_argument("--members", nargs="+", type=int, default=None)
    parser.add_argument("--batches", nargs="+", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats (median); >= 5 by default")
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG")
    parser.add_argument("--verbose", type=int, default=1)
    return parser


def _default_members(workloads, quick):
    """``{workload: Ks}``: K=4 for keras.applications members, else K=2,8 (quick) or 2,4,8."""
    return {w: DEFAULT_MEMBERS.get(w, (2, 8) if quick else (2, 4, 8)) for w in workloads}


def report_stem(args, workloads):
    """``throughput`` for the full default run; a run of a subset writes its own reports beside it.

    Example:
        >>> import argparse
        >>> report_stem(argparse.Namespace(quick=False, members=None), DEFAULT_WORKLOADS)
        'throughput'
        >>> report_stem(argparse.Namespace(quick=False, members=[8]), ("mlp",))
        'throughput_mlp_k8'
    """
    parts = ["throughput"]
    if not args.quick and (tuple(workloads) != DEFAULT_WORKLOADS or args.members):
        parts += list(workloads) + [f"k{k}" for k in args.members or ()]
    return "_".join(parts + (["quick"] if args.quick else []))


def main(args):
    """Run the benchmark from parsed ``args`` (see ``add_arguments``) and write the reports."""
    quick = args.quick
    workloads = args.workloads or (("mlp", "cnn1d") if quick else DEFAULT_WORKLOADS)
    result = run(
        workloads=workloads,
        members=args.members or _default_members(workloads, quick),
        batches=args.batches or ((1, 256) if quick else (1, 32, 256)),
        repeats=args.repeats or (3 if quick else 5),
        target_s=0.03 if quick else 0.05,
        verbose=args.verbose,
    )
    stem = report_stem(args, workloads)
    for path in write_reports(result, args.out, stem=stem, with_plot=not args.no_plot):
        print(f"wrote {path}")
    for check in targets(result):
        print(f"{'met ' if check['met'] else 'MISS'}  {check['target']}: {check['measured']}")
    for line in bound_lines(result):
        print(line)
    return 0
