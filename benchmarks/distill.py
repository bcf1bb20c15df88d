"""Distilling an ensemble into one member-sized student (``ek.distill``).

Run: ``python -m benchmarks.distill [--quick]`` (a few minutes on 2 CPU cores).
Writes ``benchmarks/results/distill.json`` and ``distill.md``.

Two member sets: the demo's 5 mnist1d CNNs (``ensemblekit demo``'s members, same
seeds and split) and 5 digits MLPs. For each, on the test split:

- the best member (chosen on the validation split) and the mean ensemble;
- a labels-only student: the member architecture from a fresh initialisation,
  trained on the labels with the members' recipe for the same number of epochs;
- the distilled student: the same fresh initialisation and epochs, trained
  with ``ek.distill`` on the ensemble (labels + soft targets);
- the best member distilled: its own weights as the start, the same epochs
  (what ``ek.advise`` builds);
- a width-0.5 student: the best member channel-pruned to half its channels
  (``width=0.5``), then distilled.

Reported: accuracy, NLL, ECE, parameters, samples/s (batch 256, compiled, timed
round-robin), and the share of the ensemble's accuracy gain over the best
member that distilling into the best member recovers.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import ensemblekit as ek  # noqa: E402
from ensemblekit import demo  # noqa: E402
from ensemblekit.bench.throughput import device_info, write_json_and_markdown  # noqa: E402
from ensemblekit.costs import latencies  # noqa: E402
from ensemblekit.datasets import load_digits, load_mnist1d  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def digits_mlp(seed):
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Flatten(),
                              keras.layers.Dense(64, activation="relu"), keras.layers.Dense(10)],
                             name=f"mlp_{seed}")
    model.compile(keras.optimizers.Adam(3e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


SETS = {
    # name: (data loader, member builder, validation rows, member epochs)
    "mnist1d_cnn": (load_mnist1d, demo.make_cnn, demo.VALIDATION, 15),
    "digits_mlp": (load_digits, digits_mlp, 250, 40),
}


def run_set(name, quick=False, seed=0, temperature=3.0):
    load, build, validation, epochs = SETS[name]
    count = 3 if quick else 5
    epochs = max(2, epochs // 5) if quick else epochs
    (x, y), (x_test, y_test) = load()
    x_train, y_train, x_val, y_val = x[:-validation], y[:-validation], x[-validation:], y[-validation:]
    with demo.deterministic(seed):
        members = [demo.fit_seeded(build(seed + i), x_train, y_train, epochs, seed + i) for i in range(count)]
        teacher = ek.ensemble(members, "mean")
        val_nll = [ek.evaluate(m, x_val, y_val)["nll"] for m in members]
        best = members[int(np.argmin(val_nll))]
        labels_only = demo.fit_seeded(build(seed + 100), x_train, y_train, epochs, seed + 100)
        start = time.perf_counter()
        distilled, report = ek.distill(teacher, build(seed + 100), x_train, y_train, init="weights",
                                       temperature=temperature, alpha=0.5, epochs=epochs, seed=seed + 100,
                                       optimizer=keras.optimizers.Adam(3e-3), verbose=0)
        distill_seconds = time.perf_counter() - start
        from_best, _ = ek.distill(teacher, best, x_train, y_train, temperature=temperature, alpha=0.5,
                                  epochs=epochs, seed=seed, optimizer=keras.optimizers.Adam(1e-3), verbose=0)
        narrow, _ = ek.distill(teacher, best, x_train, y_train, width=0.5, temperature=temperature,
                               alpha=0.5, epochs=epochs, seed=seed, optimizer=keras.optimizers.Adam(1e-3),
                               verbose=0)
    models = {"best member": best, "ensemble (mean)": teacher, "labels-only student": labels_only,
              "distilled student": distilled, "distilled from the best member": from_best,
              "distilled student, width 0.5": narrow}
    seconds = latencies(models, x_test, repeats=5)
    rows = [{"name": label, **ek.evaluate(model, x_test, y_test), "params": model.count_params(),
             "samples_per_s": 256 / seconds[label]} for label, model in models.items()]
    by = {row["name"]: row for row in rows}
    gain = by["ensemble (mean)"]["accuracy"] - by["best member"]["accuracy"]
    recovered = ((by["distilled from the best member"]["accuracy"] - by["best member"]["accuracy"]) / gain
                 if gain > 0 else None)
    return {"rows": rows, "members": count, "epochs": epochs, "temperature": temperature,
            "teacher_cached": report.teacher_cached, "distill_seconds": distill_seconds,
            "gain_recovered": recovered,
            "goals": {
                "recovers >= 60% of the ensemble's accuracy gain": recovered is not None and recovered >= 0.6,
                "beats the labels-only student (accuracy)":
                    by["distilled student"]["accuracy"] > by["labels-only student"]["accuracy"],
                "ECE no worse than the best member's":
                    by["distilled from the best member"]["ece"] <= by["best member"]["ece"],
            }}


def to_markdown(result):
    lines = [f"# Distillation ({result['info']['device']}, {result['info']['backend']}, "
             f"Keras {result['info']['keras']})", ""]
    for name, part in result["sets"].items():
        recovered = part["gain_recovered"]
        lines += [f"## {name}: {part['members']} members, {part['epochs']} epochs, T = {part['temperature']:g}",
                  "", "| model | accuracy | NLL | ECE | params | samples/s |", "|---|---:|---:|---:|---:|---:|"]
        lines += [f"| {r['name']} | {r['accuracy']:.4f} | {r['nll']:.4f} | {r['ece']:.4f} | {r['params']:,} | "
                  f"{r['samples_per_s']:,.0f} |" for r in part["rows"]]
        lines += ["", f"Share of the ensemble's accuracy gain over the best member recovered by distilling "
                      f"into the best member: "
                      f"{'n/a (no gain)' if recovered is None else f'{recovered:.0%}'}; distillation took "
                      f"{part['distill_seconds']:.0f} s (teacher outputs cached: {part['teacher_cached']}).", ""]
        lines += [f"- {goal}: {'met' if met else 'NOT met'}" for goal, met in part["goals"].items()] + [""]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 members, short training")
    parser.add_argument("--sets", nargs="+", choices=tuple(SETS), default=list(SETS))
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    start = time.perf_counter()
    result = {"info": device_info(), "quick": args.quick,
              "sets": {name: run_set(name, quick=args.quick) for name in args.sets}}
    result["seconds"] = time.perf_counter() - start
    write_json_and_markdown(result, to_markdown(result), args.out, "distill")
    print(to_markdown(result))


if __name__ == "__main__":
    main()
