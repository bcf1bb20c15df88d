"""The streamed data path: memory and speed of ``ek.evaluate`` / ``ek.advise`` on a ``tf.data`` stream.

Run: ``python -m benchmarks.data [--quick]`` (full sizes: tens of minutes on 2 CPU cores;
``--quick``: about 2-3 minutes). Writes ``benchmarks/results/data.json`` and ``data.md``
(``--quick``: ``data_quick.json`` and ``data_quick.md``).

Members: three small CNNs (``Input((64, 64, 3))`` -> ``Conv2D(8, 3, strides=2, relu)`` ->
``Conv2D(16, 3, strides=2, relu)`` -> ``GlobalAveragePooling2D`` -> ``Dense(10)`` logits),
seeds 0, 1, 2, untrained (the benchmark measures the data path, not accuracy); the ensemble is
``ek.ensemble(members, "logit_mean")``.

Stream: ``tf.data.Dataset.range(n).batch(256).map(images)`` with deterministic images made per
batch by ``tf.random.stateless_uniform`` (seeded by the batch's first index) and labels
``index % 10``, then ``.prefetch(2)``: the samples are generated on the fly, never materialised
(200,000 samples at 64x64x3 would be 9.8 GB as float32).

- Memory: each measured call runs once in a fresh subprocess (``python -m benchmarks.data
  --child evaluate|advise N``) that builds the members and reports its peak RSS
  (``resource.getrusage(RUSAGE_SELF).ru_maxrss``) before and after the call, and the call's wall
  time. ``ek.evaluate(ensemble, ds)`` at 20,000 vs 200,000 samples and ``ek.advise(members, ds)``
  at 10,000 vs 50,000 samples; goal: peak RSS of the large run within 1.3x of the small one's.
- Speed: in one process, on one pipeline of 20,000 samples, ``ek.evaluate(ensemble, ds)`` and
  ``ensemble.predict(ds)`` timed round-robin (``ensemblekit._timing.time_paths``: one warm-up
  call each, median of the timed passes); goal: evaluate's samples/s >= 0.9x predict's.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

RESULTS = Path(__file__).parent / "results"
SHAPE = (64, 64, 3)
CLASSES = 10
BATCH = 256
SEEDS = (0, 1, 2)
RSS_GOAL = 1.3
SPEED_GOAL = 0.9
SIZES = {
    # quick: (evaluate small, evaluate large), (advise small, advise large), speed samples
    False: {"evaluate": (20_000, 200_000), "advise": (10_000, 50_000), "speed": 20_000, "repeats": 3},
    True: {"evaluate": (2_000, 20_000), "advise": (1_000, 5_000), "speed": 2_000, "repeats": 3},
}


def build_member(seed):
    import keras

    keras.utils.set_random_seed(seed)
    return keras.Sequential([
        keras.Input(SHAPE),
        keras.layers.Conv2D(8, 3, strides=2, activation="relu"),
        keras.layers.Conv2D(16, 3, strides=2, activation="relu"),
        keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(CLASSES),
    ], name=f"cnn_{seed}")


def stream(samples, batch_size=BATCH):
    """``(images, labels)`` batches of ``samples`` generated samples (deterministic, never materialised)."""
    import tensorflow as tf

    def images(index):
        seed = tf.stack([index[0], tf.constant(0, tf.int64)])
        x = tf.random.stateless_uniform(tf.concat([tf.shape(index), SHAPE], 0), seed=seed)
        return x, tf.cast(index % CLASSES, tf.int32)

    return tf.data.Dataset.range(samples).batch(batch_size).map(images).prefetch(2)


def materialised_bytes(samples):
    return samples * SHAPE[0] * SHAPE[1] * SHAPE[2] * 4


def peak_rss_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def child(function, samples):
    """Run one call in this (fresh) process; print its peak RSS and wall time as JSON."""
    import ensemblekit as ek

    members = [build_member(seed) for seed in SEEDS]
    dataset = stream(samples)
    if function == "evaluate":
        model = ek.ensemble(members, "logit_mean")
        ek.evaluate(model, dataset.take(1))  # trace once so the baseline includes the model's graph
    baseline = peak_rss_mib()
    start = time.perf_counter()
    if function == "evaluate":
        ek.evaluate(model, dataset)
    else:
        ek.advise(members, dataset, verbose=0)
    seconds = time.perf_counter() - start
    print(json.dumps({"function": function, "samples": samples, "seconds": seconds,
                      "baseline_rss_mib": baseline, "peak_rss_mib": peak_rss_mib()}))


def run_child(function, samples):
    command = [sys.executable, "-m", "benchmarks.data", "--child", function, str(samples)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=Path(__file__).parent.parent)
    if done.returncode:
        raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"  {function} {samples:,}: peak RSS {result['peak_rss_mib']:.0f} MiB "
          f"(before the call {result['baseline_rss_mib']:.0f}), {result['seconds']:.1f} s", flush=True)
    return result


def memory(function, sizes):
    small, large = (run_child(function, samples) for samples in sizes)
    ratio = large["peak_rss_mib"] / small["peak_rss_mib"]
    return {"small": small, "large": large, "ratio": ratio, "goal": RSS_GOAL, "met": ratio <= RSS_GOAL,
            "large_materialised_gb": materialised_bytes(large["samples"]) / 1e9}


def speed(samples, repeats):
    import ensemblekit as ek
    from ensemblekit._timing import time_paths

    model = ek.ensemble([build_member(seed) for seed in SEEDS], "logit_mean")
    dataset = stream(samples)
    seconds = time_paths({"ek.evaluate": lambda: ek.evaluate(model, dataset),
                          "ensemble.predict": lambda: model.predict(dataset, verbose=0)},
                         repeats=repeats, target_s=0.0, warmup=1)
    rates = {name: samples / s for name, s in seconds.items()}
    ratio = rates["ek.evaluate"] / rates["ensemble.predict"]
    return {"samples": samples, "repeats": repeats, "seconds": seconds, "samples_per_s": rates,
            "ratio": ratio, "goal": SPEED_GOAL, "met": ratio >= SPEED_GOAL}


def machine_info():
    import keras
    import tensorflow as tf

    return {"processor": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
            "platform": platform.platform(), "python": platform.python_version(),
            "tensorflow": tf.__version__, "keras": keras.__version__,
            "date": datetime.date.today().isoformat(), "load_avg": _load_average()}


def _load_average():
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None


def to_markdown(result):
    info = result["info"]
    lines = [f"# Streamed data path ({info['processor']}, {info['cpu_count']} CPUs, TensorFlow "
             f"{info['tensorflow']}, Keras {info['keras']}, {info['date']})", "",
             f"Three untrained small CNNs (64x64x3 -> 10 logits), ensemble `logit_mean`; a generated "
             f"`tf.data` image stream (batch {BATCH}, never materialised). Each memory row is a fresh "
             f"process; 'before' is its peak RSS once the members are built.", "",
             "| call | samples | float32 if materialised | peak RSS (MiB) | before the call (MiB) | "
             "growth in the call (MiB) | wall (s) |", "|---|---:|---:|---:|---:|---:|---:|"]
    for name, part in result["memory"].items():
        for run in (part["small"], part["large"]):
            lines.append(f"| {name} | {run['samples']:,} | {materialised_bytes(run['samples']) / 1e9:.2f} GB | "
                         f"{run['peak_rss_mib']:.0f} | {run['baseline_rss_mib']:.0f} | "
                         f"{run['peak_rss_mib'] - run['baseline_rss_mib']:.0f} | {run['seconds']:.1f} |")
    lines.append("")
    for name, part in result["memory"].items():
        lines.append(f"- {name}: peak RSS at {part['large']['samples']:,} / at {part['small']['samples']:,} "
                     f"samples = {part['ratio']:.2f}x (goal <= {part['goal']}x): "
                     f"{'met' if part['met'] else 'NOT met'}")
    fast = result["speed"]
    lines += ["", f"## Speed: one pass over {fast['samples']:,} samples (median of {fast['repeats']}, "
                  "round-robin)", "", "| path | samples/s | s per pass |", "|---|---:|---:|"]
    lines += [f"| {name} | {rate:,.0f} | {fast['seconds'][name]:.2f} |"
              for name, rate in fast["samples_per_s"].items()]
    lines += ["", f"- ek.evaluate / ensemble.predict samples/s = {fast['ratio']:.2f}x (goal >= "
                  f"{fast['goal']}x): {'met' if fast['met'] else 'NOT met'}", ""]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (about 2-3 minutes on 2 CPU cores)")
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--child", nargs=2, metavar=("FUNCTION", "SAMPLES"),
                        help="internal: run one measured call (evaluate|advise) in this process")
    args = parser.parse_args(argv)
    if args.child:
        function, samples = args.child
        if function not in ("evaluate", "advise"):
            parser.error(f"--child: evaluate or advise, not {function!r}")
        return child(function, int(samples))

    from ensemblekit.bench.throughput import write_json_and_markdown

    sizes = SIZES[args.quick]
    start = time.perf_counter()
    result = {"info": machine_info(), "quick": args.quick, "members": len(SEEDS), "trained": False,
              "batch_size": BATCH, "memory": {}}
    for function in ("evaluate", "advise"):
        print(f"memory: {function} at {sizes[function][0]:,} and {sizes[function][1]:,} samples", flush=True)
        result["memory"][function] = memory(function, sizes[function])
    print(f"speed: {sizes['speed']:,} samples", flush=True)
    result["speed"] = speed(sizes["speed"], sizes["repeats"])
    result["info"]["load_avg_after"] = _load_average()
    result["seconds"] = time.perf_counter() - start
    stem = "data_quick" if args.quick else "data"
    markdown = to_markdown(result)
    for path in write_json_and_markdown(result, markdown, args.out, stem):
        print(f"wrote {path}")
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
