"""Pruning on mnist1d: sparsity / channel ratio vs accuracy, params, MACs, size, latency.

Run: ``python -m benchmarks.pruning`` (about 5-8 minutes on 2 CPU cores).
Writes ``benchmarks/results/pruning.json`` and ``pruning.md``.

One residual CNN with BatchNorm (Conv-BN-ReLU, Conv-BN + Add, Conv-BN-ReLU,
Flatten, Dense, Dense; width 64) is trained on mnist1d, then:

(a) ``magnitude`` at 50/80/90% sparsity (PolynomialDecay over 2 epochs, 5
    epochs of fine-tuning with ``PruningCallback``) and 2:4 N:M, stripped;
(b) ``channels`` at ratio 0.3/0.5/0.7 (``bn_scale``), before and after 6
    epochs of fine-tuning;
(c) ``select_members``: 4 CNN members of two widths, kept under a budget of 2 mean members' parameters.

Latencies of all models are timed round-robin in one run (``predict_on_batch``,
median), so load on the shared machine hits every row alike; compare rows
within one run only.
"""

from __future__ import annotations

import os
import time
import warnings
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import ensemblekit as ek  # noqa: E402
from ensemblekit._timing import time_paths  # noqa: E402
from ensemblekit.bench.throughput import device_info, write_json_and_markdown  # noqa: E402
from ensemblekit.costs import count_params, macs  # noqa: E402
from ensemblekit.datasets import load_mnist1d  # noqa: E402
from ensemblekit.prune import (  # noqa: E402
    PolynomialDecay,
    PruningCallback,
    channels,
    magnitude,
    select_members,
    strip,
)
from ensemblekit.prune.report import zipped_size  # noqa: E402

RESULTS = Path(__file__).parent / "results"
L = keras.layers
BATCH = 64


def residual_cnn(width, seed):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((40, 1))
    h = L.ReLU()(L.BatchNormalization()(L.Conv1D(width, 5, padding="same", name="conv_a")(inputs)))
    r = L.BatchNormalization()(L.Conv1D(width, 3, padding="same")(h))
    h = L.MaxPooling1D(2)(L.Activation("relu")(L.Add()([h, r])))
    h = L.ReLU()(L.BatchNormalization()(L.Conv1D(2 * width, 3, padding="same")(h)))
    h = L.Flatten()(L.MaxPooling1D(2)(h))
    h = L.Dropout(0.1)(L.Dense(2 * width, activation="relu")(h))
    return keras.Model(inputs, L.Dense(10)(h), name=f"res_cnn_{width}_{seed}")


def fit(model, x, y, epochs, lr, seed=0, callbacks=None):
    keras.utils.set_random_seed(seed)
    steps = epochs * int(np.ceil(len(x) / BATCH))
    model.compile(keras.optimizers.Adam(keras.optimizers.schedules.CosineDecay(lr, steps)),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, epochs=epochs, batch_size=BATCH, verbose=0, callbacks=callbacks)
    return model


def accuracy(model, x, y):
    return float(np.mean(np.asarray(model.predict(x, batch_size=512, verbose=0)).argmax(-1) == y))


def describe(model, x, y):
    params, nonzeros = count_params(model)
    return {"accuracy": accuracy(model, x, y), "params": params, "nonzeros": nonzeros,
            "macs": macs(model), "zipped_bytes": zipped_size(model)}


def magnitude_rows(base, data):
    (x, y), (xt, yt) = data
    steps_per_epoch = int(np.ceil(len(x) / BATCH))
    rows, models = [], {}
    for sparsity in (0.5, 0.8, 0.9):
        schedule = PolynomialDecay(sparsity / 2, sparsity, 0, 2 * steps_per_epoch, frequency=steps_per_epoch // 3)
        pruned = fit(magnitude(base, schedule=schedule), x, y, 5, 1e-3, callbacks=[PruningCallback()])
        name = f"magnitude {sparsity:.0%} + fine-tune"
        models[name] = strip(pruned)
        rows.append({"name": name, **describe(models[name], xt, yt)})
    # 2:4 along the input axis; conv_a's input axis (5 taps x 1 channel) is not a multiple of 4.
    kernels = [layer.name for layer in base.layers if isinstance(layer, (L.Conv1D, L.Dense)) and layer.name != "conv_a"]
    pruned = fit(magnitude(base, n_m=(2, 4), layers=kernels), x, y, 3, 1e-3, callbacks=[PruningCallback()])
    models["2:4 N:M + fine-tune"] = strip(pruned)
    rows.append({"name": "2:4 N:M + fine-tune", **describe(models["2:4 N:M + fine-tune"], xt, yt)})
    return rows, models


def channel_rows(base, data):
    (x, y), (xt, yt) = data
    rows, models = [], {}
    for ratio in (0.3, 0.5, 0.7):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Dense groups have no BN: ranked by l1
            pruned = channels(base, ratio, importance="bn_scale")
        before = accuracy(pruned, xt, yt)
        fit(pruned, x, y, 6, 2e-3)
        name = f"channels {ratio} + fine-tune"
        models[name] = pruned
        rows.append({"name": name, "accuracy_before_fine_tune": before, **describe(pruned, xt, yt)})
    return rows, models


def member_rows(data):
    (x, y), (xt, yt) = data
    xv, yv = x[-500:], y[-500:]
    pool = [fit(residual_cnn(width, seed), x[:-500], y[:-500], 8, 2e-3, seed=seed)
            for width, seed in ((16, 10), (16, 11), (48, 12), (48, 13))]
    full = ek.ensemble(pool)
    kept = select_members(pool, xv, yv, budget=2.0)  # half of the 4 members' mean cost x 4
    reference = "4-member ensemble (widths 16,16,48,48)"
    return [
        {"name": reference, "reference": reference, **describe(full, xt, yt)},
        {"name": f"select_members(budget=2.0 mean members' params): kept {kept.indices}", "reference": reference,
         "budget_used": kept.used, **describe(kept.model, xt, yt)},
    ], {reference: full, "select_members(budget=2.0)": kept.model}


def latencies(models, batch_sizes=(1, 256)):
    """Round-robin median latency of ``predict_on_batch`` for every model."""
    result = {name: {} for name in models}
    for batch in batch_sizes:
        xb = np.random.default_rng(0).normal(size=(batch, 40, 1)).astype("float32")
        functions = {name: (lambda m=m, xb=xb: m.predict_on_batch(xb)) for name, m in models.items()}
        for name, seconds in time_paths(functions, repeats=7, target_s=0.1).items():
            result[name][f"latency_b{batch}_ms"] = 1000 * seconds
    return result


def to_markdown(result):
    by_name = {row["name"]: row for row in result["rows"]}
    lines = [
        "# Pruning on mnist1d (residual CNN with BatchNorm, width 64)",
        "",
        f"Device: {result['device']['device']} ({result['device']['device_type']}, "
        f"{result['device']['cpu_count']} cores, shared with other jobs: latencies are noisy, "
        f"compare rows of this run only). Backend {result['device']['backend']}, "
        f"Keras {result['device']['keras']}. Wall time {result['seconds']:.0f} s.",
        "",
        "Latency: median of round-robin `predict_on_batch` calls. MACs per sample (Dense/Conv).",
        "Zipped = the `.keras` file deflate-compressed. Unstructured zeros (magnitude, N:M) do not",
        "speed up dense kernels on this device: same MACs, same latency, smaller zipped file.",
        "",
        "Ratios (size x, MACs x, speedup) are against the dense baseline, or for the member rows",
        "against the full ensemble.",
        "",
        "| model | accuracy | params | nonzeros | MACs | zipped KB | size x | MACs x "
        "| latency b1 ms | latency b256 ms | speedup b256 |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        base = by_name[row.get("reference", "dense baseline")]
        before = f" (before fine-tune {row['accuracy_before_fine_tune']:.3f})" if "accuracy_before_fine_tune" in row else ""
        lines.append(
            f"| {row['name']} | {row['accuracy']:.3f}{before} | {row['params']:,} | {row['nonzeros']:,} | "
            f"{row['macs']:,} | {row['zipped_bytes'] / 1024:.1f} | {base['zipped_bytes'] / row['zipped_bytes']:.2f} | "
            f"{base['macs'] / row['macs']:.2f} | {row['latency_b1_ms']:.2f} | {row['latency_b256_ms']:.2f} | "
            f"{base['latency_b256_ms'] / row['latency_b256_ms']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main():
    start = time.time()
    data = load_mnist1d()
    (x, y), (xt, yt) = data
    base = fit(residual_cnn(64, 0), x, y, 12, 2e-3)
    print(f"base trained ({time.time() - start:.0f} s)", flush=True)
    rows = [{"name": "dense baseline", **describe(base, xt, yt)}]
    models = {"dense baseline": base}
    for builder in (magnitude_rows, channel_rows):
        new_rows, new_models = builder(base, data)
        rows += new_rows
        models.update(new_models)
        print(f"{builder.__name__} done ({time.time() - start:.0f} s)", flush=True)
    new_rows, new_models = member_rows(data)
    print(f"member_rows done ({time.time() - start:.0f} s)", flush=True)
    timed = latencies({**models, **new_models})
    for row, name in zip(rows + new_rows, list(models) + list(new_models), strict=True):
        row.update(timed[name])
    result = {"device": device_info(), "rows": rows + new_rows, "seconds": time.time() - start}
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_json_and_markdown(result, to_markdown(result), RESULTS, "pruning")
    print(to_markdown(result))


if __name__ == "__main__":
    main()
