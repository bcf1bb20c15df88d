"""Weight matching at ImageNet scale: ``align`` two members of ResNet50 and of MobileNetV2.

Run: ``python -m benchmarks.align`` (about 2-4 minutes on 2 CPU cores).
Writes ``benchmarks/results/align.json`` and ``align.md``.

Each pair (``keras.applications``, ``weights=None``, seeds 0 and 1,
224x224x3 inputs, ``include_top=True``, 1000 classes) is aligned by
``align(method="weight_matching")`` in a fresh subprocess: wall seconds of the
one call (``time.perf_counter``), its CPU seconds (``time.process_time``; the
machine may be shared, wall time suffers first), the process's peak RSS
(``resource.getrusage``) after building the two members and after aligning,
the sweeps weight matching needed, and the largest change of the aligned
member's probabilities on two random images (0 up to float rounding).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402

from ensemblekit.bench.throughput import device_info, write_json_and_markdown  # noqa: E402

RESULTS = Path(__file__).parent / "results"
FAMILIES = ("ResNet50", "MobileNetV2")
GOAL_SECONDS = {"ResNet50": 60}
# ``align`` before this version (one full copy of the model permuted per weight of every group,
# per sweep), run once by the same child on this machine: ResNet50 was stopped after 900 s.
BEFORE = {"ResNet50": {"seconds": "> 900 (stopped)", "peak_rss_mb": "> 1925"},
          "MobileNetV2": {"seconds": 30.4, "peak_rss_mb": 1020}}

_CHILD = r"""
import contextlib, io, json, os, re, resource, sys, time
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
import keras, numpy as np
from ensemblekit.merge import align
from ensemblekit.merge.permutation import permutation_spec

peak_mb = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
family = sys.argv[1]
members = []
for seed in (0, 1):
    keras.utils.set_random_seed(seed)
    members.append(getattr(keras.applications, family)(
        weights=None, include_top=True, classes=1000, input_shape=(224, 224, 3)))
result = {"family": family, "params": members[0].count_params(), "built_peak_rss_mb": peak_mb()}
try:
    spec = permutation_spec(members[0])
except ValueError as error:
    print(json.dumps({**result, "refused": str(error)}))
    sys.exit(0)
result.update(groups=len(spec.sizes), weight_axes=sum(len(axes) for axes in spec.axes.values()))
log = io.StringIO()
cpu, start = time.process_time(), time.perf_counter()
with contextlib.redirect_stdout(log):  # verbose=1 ends with "Weight matching: N sweeps, ..."
    aligned, perms = align(members, verbose=1, return_permutations=True)
result.update(seconds=time.perf_counter() - start, cpu_seconds=time.process_time() - cpu,
              peak_rss_mb=peak_mb(),
              sweeps=int(re.search(r"Weight matching: (\d+) sweeps", log.getvalue()).group(1)),
              groups_moved=sum(not np.array_equal(p, np.arange(len(p))) for p in perms[1].values()))
x = np.random.default_rng(0).uniform(0, 255, (2, 224, 224, 3)).astype("float32")
result["max_probability_change"] = float(np.abs(aligned[1].predict(x, verbose=0)
                                                - members[1].predict(x, verbose=0)).max())
print(json.dumps(result))
"""


def run_family(family):
    """Align one pair of ``family`` in a fresh interpreter; its measurements."""
    out = subprocess.run([sys.executable, "-c", _CHILD, family], check=True, capture_output=True,
                         text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def markdown(results):
    lines = [
        "# Weight matching at ImageNet scale (`align`, random weights)",
        "",
        f"Device: {results['machine']}. Load average at the start "
        f"{results['load_average']:.1f} (the machine is shared: wall time suffers first, "
        "CPU time less). Each pair runs in a fresh process.",
        "",
        "Two members of each family (`keras.applications`, `weights=None`, seeds 0 and 1, "
        "224x224x3, `include_top=True`, 1000 classes), aligned by "
        "`align(method=\"weight_matching\")`. Peak RSS is the whole process "
        "(TensorFlow, both members, the aligned clone); *after build* is the peak before `align`.",
        "",
        "| pair | params / member | groups | sweeps | align s | CPU s | peak RSS after build MB "
        "| peak RSS MB | max prob. change | before: s | before: peak RSS MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in results["rows"]:
        before = BEFORE.get(row["family"], {})
        if "refused" in row:
            lines.append(f"| {row['family']} | {row['params']:,} | refused: {row['refused']} |"
                         " | | | | | | | |")
            continue
        lines.append(
            f"| {row['family']} | {row['params']:,} | {row['groups']} | {row['sweeps']} "
            f"| {row['seconds']:.1f} | {row['cpu_seconds']:.1f} | {row['built_peak_rss_mb']:.0f} "
            f"| {row['peak_rss_mb']:.0f} | {row['max_probability_change']:.1e} "
            f"| {before.get('seconds', '')} | {before.get('peak_rss_mb', '')} |")
    lines += [
        "",
        "Weight matching ascends from two starts (the identity and a match of sorted weight slices) and keeps the higher objective; each sweep solves one linear assignment per group whose coupled groups changed, on a "
        "cost matrix kept up to date from the units that moved; sweeps stop when no group's "
        "assignment improves. *Before* is the previous `align`, which permuted every weight of "
        "the model once per weight of every group in every sweep (quadratic in depth).",
        "",
    ]
    for family, goal in GOAL_SECONDS.items():
        row = next((r for r in results["rows"] if r["family"] == family and "seconds" in r), None)
        if row is not None:
            verdict = "met" if row["seconds"] <= goal else "missed"
            lines.append(f"Goal {family} pair <= {goal} s on this CPU: {verdict} ({row['seconds']:.1f} s).")
    return "\n".join(lines) + "\n"


def main():
    start = time.perf_counter()
    results = {"machine": f"{os.cpu_count()}-core CPU, keras {keras.__version__} "
                          f"({keras.backend.backend()})",
               "device": device_info(), "load_average": os.getloadavg()[0], "rows": []}
    for family in FAMILIES:
        row = run_family(family)
        results["rows"].append(row)
        print(json.dumps(row), flush=True)
    results["seconds"] = time.perf_counter() - start
    write_json_and_markdown(results, markdown(results), RESULTS, "align")
    print(markdown(results))


if __name__ == "__main__":
    main()
