"""Accuracy of every composition next to its cost, per member set: ``ensemblekit bench accuracy``.

Member sets (members trained here, each with its own seed):

1. ``mnist1d_cnn``: K CNNs of ``ensemblekit demo`` (``demo.make_cnn`` /
   ``demo.train_members``) on mnist1d;
2. ``mnist1d_mixed``: one MLP, one demo CNN and one GRU on mnist1d
   (heterogeneous: weight-space compositions do not apply);
3. ``digits_mlp``: K MLPs on scikit-learn's 8x8 digits.

Every composition of the library that applies is built from the members: the
entries of ``ensemblekit.compositions`` (the one registry, shared with
``ek.advise`` and the demo) under this benchmark's labels (``COMPOSITIONS``;
the others are listed with the reason they were skipped). Validation data
(held out from member training) fits everything that learns from data:
weights, stacking, selection, member pruning, calibration. Test data gives
every reported number: accuracy, NLL, Brier score, ECE (``ensemblekit.metrics``),
plus parameters, MACs per sample (``costs.macs``) and samples/s at batch
256 through ``compile_for_inference``, all compositions of a member set timed
round-robin in one ``_timing.time_paths`` call. The Pareto front of
throughput vs accuracy comes from ``ek.pareto``.

Same seed, same accuracy numbers on one machine and backend: the run is inside
``demo.deterministic`` (seeds, TensorFlow op determinism), each member is seeded
before it is built and before it is trained, and folds, heads and fine-tunes
are seeded (tested on a tiny configuration). Other CPUs, thread counts or
library versions can train other members (see ``ensemblekit.demo``).
"""

from __future__ import annotations

import time

import keras
import numpy as np

from ensemblekit import compositions, demo, metrics
from ensemblekit._timing import batch_seconds
from ensemblekit.bench.throughput import device_info, write_json_and_markdown
from ensemblekit.compose.views import Shift

MEMBER_SETS = {
    "mnist1d_cnn": "mnist1d, K CNN members (ensemblekit demo's CNN), different seeds",
    "mnist1d_mixed": "mnist1d, heterogeneous: MLP + CNN + GRU",
    "digits_mlp": "scikit-learn digits (8x8), K MLP members, different seeds",
}
SETTINGS = {  # the full run (about 5-10 minutes on 2 CPU cores)
    "members": 5, "epochs": 15, "digits_epochs": 40, "train_samples": None, "validation": 500,
    "digits_validation": 250, "head_epochs": 5, "finetune_epochs": 3, "stack_epochs": 100, "cv": 5,
    "batch": 256, "repeats": 5, "target_s": 0.05, "jit_compile": True,
}
QUICK_SETS = ("mnist1d_cnn",)
QUICK_SETTINGS = {  # --quick (on QUICK_SETS): well under a minute
    **SETTINGS, "members": 3, "epochs": 2, "digits_epochs": 10, "train_samples": 1000,
    "validation": 300, "digits_validation": 200, "head_epochs": 1, "finetune_epochs": 1,
    "stack_epochs": 10, "cv": 2, "repeats": 3, "target_s": 0.02, "jit_compile": False,
}
PRUNE_RATIO = 0.3
# prune.select_members keeps at most this fraction of the full ensemble's cost: a budget of
# MEMBER_FRACTION x K in the one meaning of budgets (units of the members' mean cost).
MEMBER_FRACTION = 0.5
# The benchmark's label -> the registry's name (ensemblekit.compositions), in the report's order.
COMPOSITIONS = {
    "best member": "best_member",
    "ensemble mean": "ensemble_mean",
    "ensemble logit_mean": "ensemble_logit_mean",
    "ensemble geometric": "ensemble_geometric",
    "ensemble vote": "ensemble_vote",
    "weighted (optimize_weights)": "weighted",
    "stack (logistic)": "stack_logistic",
    "fuse (concat, new head)": "fuse_concat",
    "select (Caruana)": "greedy",
    "linear soup (merge)": "soup",
    "align + merge": "aligned_soup",
    "packed (ek.pack mean)": "packed_mean",
    f"pruned channels({PRUNE_RATIO}) + ensemble mean": "pruned_channels",
    f"prune.select_members (budget {MEMBER_FRACTION})": "pruned_members",
    "calibrate(ensemble mean)": "calibrated_mean",
    "TTA best member (shifts)": "tta_best_member",
    "TTA ensemble mean (shifts)": "tta_ensemble_mean",
}
# Test-time views of every member set (mnist1d sequences, time on axis 1): the input and its
# shifts by one and two steps each way (ek.tta's Shift pads with zeros).
TTA_SHIFTS = (1, -1, 2, -2)
Skip = compositions.Skip  # a composition that does not apply to a member set (the message says why)


# -- members -----------------------------------------------------------------------------------

def _compile(model, learning_rate=3e-3):
    model.compile(optimizer=keras.optimizers.Adam(learning_rate),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    return model


def make_mlp(seed, input_shape=(40, 1), hidden=128, name=None):
    """An MLP member (two hidden ReLU layers, logits out), compiled like the demo CNN."""
    keras.utils.set_random_seed(seed)
    return _compile(keras.Sequential([
        keras.Input(input_shape), keras.layers.Flatten(),
        keras.layers.Dense(hidden, activation="relu"),
        keras.layers.Dense(hidden, activation="relu", name="features"),
        keras.layers.Dense(10, name="logits")], name=name or f"mlp_{seed}"))


def make_gru(seed, units=32, name=None):
    """A GRU member on (40, 1) sequences (logits out), compiled like the demo CNN."""
    keras.utils.set_random_seed(seed)
    return _compile(keras.Sequential([
        keras.Input((40, 1)), keras.layers.GRU(units, name="features"),
        keras.layers.Dense(10, name="logits")], name=name or f"gru_{seed}"))


def load_data(member_set, settings):
    """``{"train", "val", "test"}`` as ``(x, y)`` pairs; validation is held out from training.

    The splits are fixed (mnist1d's standard split; digits split with seed 0),
    whatever the member seed: different seeds change the members, not the data.
    """
    from ensemblekit.datasets import load_digits, load_mnist1d

    if member_set.startswith("mnist1d"):
        (x, y), test = load_mnist1d()
        held_out = settings["validation"]
    else:
        (x, y), test = load_digits(seed=0)
        held_out = settings["digits_validation"]
    train = (x[:-held_out], y[:-held_out])
    if settings["train_samples"] and member_set.startswith("mnist1d"):
        train = tuple(a[:settings["train_samples"]] for a in train)
    return {"train": train, "val": (x[-held_out:], y[-held_out:]), "test": test}


def train_members(member_set, data, settings, seed=0):
    """Train the members of ``member_set`` (member ``i`` gets seed ``seed + i``)."""
    x, y = data["train"]
    count, epochs = settings["members"], settings["epochs"]
    if member_set == "mnist1d_cnn":
        return demo.train_members(x, y, count=count, epochs=epochs, seed=seed, verbose=0)
    if member_set == "mnist1d_mixed":
        return [demo.fit_seeded(make_mlp(seed), x, y, epochs, seed),
                *demo.train_members(x, y, count=1, epochs=epochs, seed=seed + 1, verbose=0),
                demo.fit_seeded(make_gru(seed + 2), x, y, epochs, seed + 2)]
    if member_set == "digits_mlp":
        return [demo.fit_seeded(make_mlp(seed + i, (8, 8, 1), hidden=64), x, y, settings["digits_epochs"], seed + i)
                for i in range(count)]
    raise ValueError(f"Unknown member set {member_set!r}; expected one of {', '.join(MEMBER_SETS)}.")


# -- compositions: entries of ensemblekit.compositions ------------------------------------------

def make_context(members, data, settings, seed):
    """The :class:`ensemblekit.compositions.Context` of one member set, with this benchmark's settings.

    Example:
        >>> import keras, numpy as np
        >>> ms = [make_mlp(0, (4,), hidden=8), make_mlp(1, (4,), hidden=8)]
        >>> xy = (np.zeros((20, 4)), np.arange(20) % 10)
        >>> ctx = make_context(ms, {"train": xy, "val": xy, "test": xy}, QUICK_SETTINGS, seed=0)
        >>> ctx.budget, ctx.settings["fuse_epochs"], ctx.settings["best_member_metric"]
        (1.0, 1, 'accuracy')
    """
    return compositions.Context(
        members, *data["val"], x_train=data["train"][0], y_train=data["train"][1],
        budget=MEMBER_FRACTION * len(members), seed=seed, fit_data="validation split", bn_data="train",
        settings={"best_member_metric": "accuracy", "stack_cv": settings["cv"],
                  "stack_epochs": settings["stack_epochs"], "fuse_epochs": settings["head_epochs"],
                  "finetune_epochs": settings["finetune_epochs"], "prune_ratio": PRUNE_RATIO,
                  "tta_views": [None, *(Shift(offset, axis=1) for offset in TTA_SHIFTS)]})


# -- measuring -----------------------------------------------------------------------------------

def _evaluate(model, x, y, settings):
    """``(compiled, scores, probs)``: ``model`` through ``compile_for_inference``, scored on ``(x, y)``.

    ``x`` runs in batches of ``settings["batch"]`` (the last one padded), so the
    function traced (and XLA-compiled) here is the one timed later: one trace per model.
    """
    from ensemblekit.inference import compile_for_inference

    compiled = compile_for_inference(model, jit_compile=settings["jit_compile"])
    raw = compiled.predict(np.asarray(x, "float32"), batch_size=settings["batch"])
    probs = metrics.as_probs(raw, model)
    return compiled, metrics.score_probs(probs, y), probs


def _throughputs(compiled, x, settings):
    """Samples/s of every ``{name: compiled}`` at batch ``settings["batch"]``, all timed round-robin."""
    seconds = batch_seconds(compiled, x, settings["batch"], settings["repeats"], settings["target_s"])
    return {name: settings["batch"] / s for name, s in seconds.items()}


def _checks(members, rows, probs):
    """What the run should show, reported (not asserted): packed == ensemble, ensemble gain."""
    by_name = {r["composition"]: r for r in rows}
    best_member = max(members, key=lambda m: m["accuracy"])
    composed = [r for r in rows if r["composition"] != "best member"]
    best = max(composed, key=lambda r: r["accuracy"])
    checks = [dict(check="best composition >= best member (test) + 1 point",
                   measured=f"{best['composition']} {best['accuracy']:.2%} vs {best_member['name']} "
                            f"{best_member['accuracy']:.2%} ({100 * (best['accuracy'] - best_member['accuracy']):+.1f} points)",
                   met=best["accuracy"] >= best_member["accuracy"] + 0.01)]
    packed = by_name.get("packed (ek.pack mean)")
    if packed is not None:
        mean = by_name["ensemble mean"]
        gap = float(np.max(np.abs(probs[packed["composition"]] - probs["ensemble mean"])))
        checks.append(dict(check="packed accuracy == ensemble mean accuracy",
                           measured=f"{packed['accuracy']:.4f} vs {mean['accuracy']:.4f}; "
                                    f"max |difference of probabilities| {gap:.1e}",
                           met=packed["accuracy"] == mean["accuracy"], max_prob_difference=gap))
    return checks


def _build_and_score(members, data, settings, seed, verbose):
    """Every composition of ``COMPOSITIONS`` built and scored on the test data (or skipped)."""
    from ensemblekit.costs import macs

    x_test, y_test = data["test"]
    ctx = make_context(members, data, settings, seed)
    progress = keras.utils.Progbar(len(COMPOSITIONS), unit_name="composition", verbose=verbose)
    rows, skipped, probs, compiled = [], [], {}, {}
    for label, _, built in compositions.build_each(COMPOSITIONS, ctx):
        if isinstance(built, Skip):
            skipped.append(dict(composition=label, reason=str(built)))
        else:
            compiled[label], scores, probs[label] = _evaluate(built.model, x_test, y_test, settings)
            rows.append(dict(composition=label, note=built.note, **scores,
                             params=int(built.model.count_params()), macs=int(macs(built.model))))
        progress.add(1)
    return rows, skipped, probs, compiled


def run_member_set(member_set, settings, seed=0, measure_throughput=True, verbose=1):
    """Train one member set, build every composition, score and time them.

    Returns:
        ``{"members", "rows", "skipped", "reliability", "checks", "seeds", "seconds"}``;
        each row holds ``composition``, ``note``, ``accuracy``, ``nll``, ``brier``, ``ece``,
        ``params``, ``macs``, ``throughput`` (samples/s, ``None`` if not measured), ``pareto``.
    """
    import ensemblekit as ek
    from ensemblekit.costs import macs

    start = time.perf_counter()
    with demo.deterministic(seed):  # training and fitting; the timing below runs as usual
        data = load_data(member_set, settings)
        members = train_members(member_set, data, settings, seed)
        x_test, y_test = data["test"]
        rows, skipped, probs, compiled = _build_and_score(members, data, settings, seed, verbose)
    speeds = _throughputs(compiled, x_test, settings) if measure_throughput else {}
    for row in rows:
        row["throughput"] = speeds.get(row["composition"])
    front = ek.pareto(rows) if measure_throughput else []
    for row in rows:
        row["pareto"] = any(row is r for r in front)
    member_rows = [dict(name=m.name, seed=seed + i, params=int(m.count_params()), macs=int(macs(m)),
                        **_evaluate(m, x_test, y_test, settings)[1]) for i, m in enumerate(members)]
    curves = {label: metrics.calibration_bins(probs[key], y_test) for label, key in
              (("before", "ensemble mean"), ("after", "calibrate(ensemble mean)"))}
    keras.backend.clear_session()
    return {"description": MEMBER_SETS[member_set], "members": member_rows, "rows": rows,
            "skipped": skipped, "reliability": curves, "checks": _checks(member_rows, rows, probs),
            "samples": {k: len(v[1]) for k, v in data.items()}, "seconds": time.perf_counter() - start}


def _versions():
    import importlib.metadata

    versions = {"numpy": np.__version__}
    for package in ("scikit-learn", "mnist1d", "scipy"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    return versions


def run(member_sets=tuple(MEMBER_SETS), seed=0, quick=False, measure_throughput=True, verbose=1,
        **settings):
    """Run the accuracy benchmark on ``member_sets``.

    Args:
        member_sets: names from ``MEMBER_SETS``.
        seed: seed of the first member of each set (member ``i`` gets ``seed + i``),
            of stacking folds, fusion heads, fine-tunes and alignment.
        quick: start from ``QUICK_SETTINGS`` (a small configuration) instead of ``SETTINGS``.
        measure_throughput: time every composition (``False``: accuracy only,
            ``throughput`` is ``None`` and no row is on a Pareto front).
        verbose: 1 shows progress bars.
        **settings: overrides of ``SETTINGS`` (e.g. ``members=2, epochs=1``).

    Returns:
        ``{"info", "seed", "settings", "member_sets": {name: run_member_set(...)}, "seconds"}``.

    Example:
        >>> QUICK_SETTINGS["members"], SETTINGS["members"]  # K of the homogeneous sets
        (3, 5)
        >>> run(["mnist1d_cnn"], quick=True, epoch=3)  # settings are checked before any training
        Traceback (most recent call last):
        ValueError: Unknown setting 'epoch'; expected one of members, epochs, ...

        ``run(["digits_mlp"], quick=True, verbose=0)`` takes about 20 s on 2 CPU cores;
        ``tests/bench/test_accuracy.py`` runs a tiny configuration.
    """
    chosen = dict(QUICK_SETTINGS if quick else SETTINGS)
    unknown = sorted(set(settings) - set(chosen))
    if unknown:
        raise ValueError(f"Unknown setting {unknown[0]!r}; expected one of {', '.join(chosen)}.")
    chosen.update(settings)
    bad = [name for name in member_sets if name not in MEMBER_SETS]
    if bad or not member_sets:
        raise ValueError(f"Unknown member set {bad[0] if bad else None!r}; expected one of "
                         f"{', '.join(MEMBER_SETS)}.")
    if chosen["members"] < 2:
        raise ValueError(f"members must be at least 2, got {chosen['members']!r}.")
    start = time.perf_counter()
    info = {**device_info(), **_versions()}
    results = {}
    for name in member_sets:
        if verbose:
            print(f"{name}: {MEMBER_SETS[name]}")
        results[name] = run_member_set(name, chosen, seed, measure_throughput, verbose)
    return {"info": info, "seed": seed, "quick": quick, "settings": chosen, "member_sets": results,
            "seconds": time.perf_counter() - start}


# -- reports -------------------------------------------------------------------------------------

def _number(value, fmt):
    return "—" if value is None else format(value, fmt)


def _set_markdown(name, result):
    lines = [f"## {name}: {result['description']}", "",
             f"Samples: {result['samples']['train']} train, {result['samples']['val']} validation, "
             f"{result['samples']['test']} test; {result['seconds']:.0f} s (training included).", "",
             "Members (test): " + ", ".join(f"{m['name']} {m['accuracy']:.2%}" for m in result["members"]),
             "", "| composition | accuracy | NLL | Brier | ECE | params | MACs | samples/s | Pareto | note |",
             "|---|---:|---:|---:|---:|---:|---:|---:|:---:|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['composition']} | {r['accuracy']:.4f} | {r['nll']:.4f} | {r['brier']:.4f} | "
                     f"{r['ece']:.4f} | {r['params']:,} | {r['macs']:,} | {_number(r['throughput'], ',.0f')} | "
                     f"{'★' if r['pareto'] else ''} | {r['note']} |")
    lines.append("")
    for skip in result["skipped"]:
        lines.append(f"- skipped **{skip['composition']}**: {skip['reason']}")
    for check in result["checks"]:
        lines.append(f"- {'met' if check['met'] else 'NOT met'}: {check['check']}: {check['measured']}")
    return lines + [""]


def to_markdown(result):
    """A Markdown report: device, settings, and per member set its members and one row per composition."""
    info, settings = result["info"], result["settings"]
    versions = ", ".join(f"{k} {info[k]}" for k in ("tensorflow", "jax", "keras", "numpy", "scikit-learn",
                                                     "mnist1d") if info.get(k))
    lines = [
        "# Ensemble accuracy vs cost" + (" (quick configuration)" if result["quick"] else ""), "",
        f"Device: {info['device']} ({info['device_type']}, {info['cpu_count']} CPU cores visible); "
        f"backend {info['backend']}; {versions}. Seed {result['seed']} (member i of a set: seed + i); "
        f"{result['seconds']:.0f} s in all.", "",
        f"Settings: {', '.join(f'{k}={v}' for k, v in settings.items())}.", "",
        "Validation data fits weights, stacking, selection, member pruning and calibration; every number "
        "below is on the test data. samples/s: batch "
        f"{settings['batch']} through `compile_for_inference` (XLA: {settings['jit_compile']}), median of "
        f"{settings['repeats']} round-robin repeats per member set. ★: on the Pareto front of samples/s vs "
        "accuracy (`ek.pareto`). MACs per sample: `ensemblekit.costs.macs` (Dense, convolutions, recurrent "
        "layers, packed layers).", "",
    ]
    for name, member_result in result["member_sets"].items():
        lines += _set_markdown(name, member_result)
    return "\n".join(lines)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_pareto(name, member_result, path):
    """Save a PNG: accuracy vs samples/s of every composition of one member set, front highlighted."""
    from ensemblekit.metrics import pareto

    plt = _pyplot()
    rows = [r for r in member_result["rows"] if r["throughput"] is not None]
    figure, axis = plt.subplots(figsize=(10, 4.8))
    front = pareto(rows)
    axis.plot([r["throughput"] for r in front], [100 * r["accuracy"] for r in front], "-", color="C3",
              linewidth=2, alpha=0.5, zorder=2, label="Pareto front (ek.pareto)")
    markers = "osD^v<>pPX*h"
    for number, r in enumerate(rows):
        on_front = any(r is f for f in front)
        axis.scatter(r["throughput"], 100 * r["accuracy"], s=60 if on_front else 30, zorder=3,
                     marker=markers[number % len(markers)], color=plt.cm.tab20(number % 20),
                     edgecolors="C3" if on_front else "none", linewidths=1.5,
                     label=r["composition"] + (" ★" if on_front else ""))
    axis.set(xscale="log", xlabel="samples/s (batch 256, compile_for_inference)", ylabel="test accuracy (%)",
             title=f"{name}: {member_result['description']}")
    axis.title.set_fontsize(9)
    axis.grid(True, which="both", alpha=0.3)
    axis.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_reliability(result, path):
    """Save a PNG: reliability diagram of the mean ensemble before/after ``ek.calibrate``, per member set."""
    plt = _pyplot()
    names = list(result["member_sets"])
    figure, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 4), squeeze=False)
    for axis, name in zip(axes[0], names, strict=True):
        rows = {r["composition"]: r for r in result["member_sets"][name]["rows"]}
        curves = result["member_sets"][name]["reliability"]
        for (label, key), color in zip((("before", "ensemble mean"), ("after", "calibrate(ensemble mean)")),
                                       ("C0", "C1"), strict=True):
            points = [(c, a) for c, a in zip(curves[label]["confidence"], curves[label]["accuracy"],
                                             strict=True) if c is not None]
            axis.plot(*zip(*points, strict=True), "o-", color=color, markersize=3,
                      label=f"{key} (ECE {rows[key]['ece']:.3f})")
        axis.plot([0, 1], [0, 1], ":", color="0.5")
        axis.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence", ylabel="accuracy", title=name)
        axis.legend(fontsize=7, loc="upper left")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def write_reports(result, out_dir, stem="accuracy", with_plot=True):
    """Write ``<stem>.json``, ``<stem>.md`` and PNGs (``<stem>_pareto_<set>.png``, ``<stem>_reliability.png``)."""
    paths = write_json_and_markdown(result, to_markdown(result), out_dir, stem)
    out_dir = paths[0].parent
    if with_plot:
        for name, member_result in result["member_sets"].items():
            if any(r["throughput"] is not None for r in member_result["rows"]):
                paths.append(out_dir / f"{stem}_pareto_{name}.png")
                plot_pareto(name, member_result, paths[-1])
        paths.append(out_dir / f"{stem}_reliability.png")
        plot_reliability(result, paths[-1])
    return paths


def add_arguments(parser):
    """The command-line options shared by ``python -m benchmarks.accuracy`` and the CLI."""
    parser.add_argument("--quick", action="store_true",
                        help="small configuration: the mnist1d CNN set (unless --sets), 3 members, "
                             "2 epochs, 1000 training sequences")
    parser.add_argument("--out", default="benchmarks/results", help="folder for the reports")
    parser.add_argument("--sets", nargs="+", choices=list(MEMBER_SETS), default=None,
                        help="member sets to run (default: all)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the first member (default 0)")
    parser.add_argument("--members", type=int, default=None, help="K of the homogeneous member sets")
    parser.add_argument("--epochs", type=int, default=None, help="training epochs of the mnist1d members")
    parser.add_argument("--no-throughput", action="store_true", help="accuracy only, no timing")
    parser.add_argument("--no-plot", action="store_true", help="skip the PNGs")
    parser.add_argument("--verbose", type=int, default=1)
    return parser


def main(args):
    """Run the benchmark from parsed ``args`` (see ``add_arguments``) and write the reports."""
    overrides = {k: v for k, v in (("members", args.members), ("epochs", args.epochs)) if v is not None}
    sets = args.sets or (QUICK_SETS if args.quick else tuple(MEMBER_SETS))
    result = run(member_sets=tuple(sets), seed=args.seed, quick=args.quick,
                 measure_throughput=not args.no_throughput, verbose=args.verbose, **overrides)
    stem = "accuracy_quick" if args.quick else "accuracy"
    for path in write_reports(result, args.out, stem=stem, with_plot=not args.no_plot):
        print(f"wrote {path}")
    for name, member_result in result["member_sets"].items():
        for check in member_result["checks"]:
            print(f"{'met ' if check['met'] else 'MISS'}  {name}: {check['check']}: {check['measured']}")
    return 0
