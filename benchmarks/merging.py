"""Weight-space merging on mnist1d, and the memory of out-of-core merging.

Run: ``python -m benchmarks.merging`` (about 5-10 minutes on 2 CPU cores).
Writes ``benchmarks/results/merging.json`` and ``merging.md``.

(a) 5 fine-tunes of one base MLP: linear soup vs the output ensemble, greedy
    soup vs the best member, and task arithmetic / TIES / DARE.
(b) 2 independently trained MLPs (40-512-512-10): plain average vs
    ``align`` + average.
(c) 2 independently trained CNNs with BatchNorm (width 64): the same, with
    and without ``reset_bn``.
(d) K=8 members of >=200 MB: peak RSS of a streamed merge vs loading all,
    each in a fresh subprocess (``resource.getrusage``).
(e) 2 independently trained MobileNet-style CNNs (depthwise-separable blocks
    with squeeze-and-excitation, BatchNorm, hard-swish): the same as (c).

``--only e`` (or any letters) runs some sections and keeps the others' results
from the last full run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

from ensemblekit.bench.throughput import write_json_and_markdown  # noqa: E402
from ensemblekit.datasets import load_mnist1d  # noqa: E402
from ensemblekit.merge import align, merge, reset_bn  # noqa: E402

RESULTS = Path(__file__).parent / "results"
L = keras.layers
VALIDATION = 500


def accuracy(model, x, y):
    return float(np.mean(model.predict(x, batch_size=512, verbose=0).argmax(1) == y))


def softmax(z):
    z = np.exp(z - z.max(1, keepdims=True))
    return z / z.sum(1, keepdims=True)


def compile_fit(model, x, y, epochs, lr, seed):
    keras.utils.set_random_seed(seed)
    model.compile(keras.optimizers.Adam(lr), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, epochs=epochs, batch_size=128, verbose=0)
    return model


def mlp(width, seed):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input((40,)), L.Dense(width, activation="relu"),
                             L.Dense(width, activation="relu"), L.Dense(10)])


def cnn(width, seed):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((40, 1))
    h = inputs
    for _ in range(3):
        h = L.ReLU()(L.BatchNormalization()(L.Conv1D(width, 5, padding="same")(h)))
        h = L.MaxPooling1D()(h)
    h = L.Dense(width, activation="relu")(L.Flatten()(h))
    return keras.Model(inputs, L.Dense(10)(h))


def mobilenet_style(width, seed):
    """Depthwise-separable blocks with squeeze-and-excitation, like a 1-D MobileNetV3."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((40, 1))
    h = L.Activation("hard_swish")(L.BatchNormalization()(L.Conv1D(width, 3, padding="same")(inputs)))
    for _ in range(2):
        skip = h
        h = L.DepthwiseConv1D(5, padding="same")(h)
        h = L.Activation("hard_swish")(L.BatchNormalization()(h))
        gate = L.GlobalAveragePooling1D(keepdims=True)(h)
        gate = L.Conv1D(width // 4, 1, activation="relu")(gate)
        gate = L.Conv1D(width, 1, activation="hard_sigmoid")(gate)
        h = L.Multiply()([h, gate])
        h = L.BatchNormalization()(L.Conv1D(width, 1)(h))
        h = L.MaxPooling1D()(L.Add()([h, skip]))
    h = L.Dense(width, activation="hard_swish")(L.GlobalAveragePooling1D()(h))
    return keras.Model(inputs, L.Dense(10)(h))


def fine_tunes(data):
    """(a) five fine-tunes of one base model."""
    (x, y), (xv, yv), (xt, yt) = data
    base = compile_fit(mlp(256, 0), x, y, epochs=10, lr=1e-3, seed=0)
    members = []
    for seed in range(1, 6):
        member = keras.models.clone_model(base)
        member.set_weights(base.get_weights())
        # different data order, a different random half of the data, and a different step size
        subset = np.random.default_rng(seed).permutation(len(x))[: len(x) // 2]
        members.append(compile_fit(member, x[subset], y[subset], epochs=8, lr=2e-4 * seed, seed=seed))
    member_acc = [accuracy(m, xt, yt) for m in members]
    ensemble_probs = np.mean([softmax(m.predict(xt, verbose=0)) for m in members], axis=0)
    greedy, greedy_report = merge(members, "greedy_soup", validation_data=(xv, yv), return_report=True)
    results = {
        "base": accuracy(base, xt, yt),
        "members": member_acc,
        "best_member": max(member_acc),
        "best_member_on_validation": member_acc[int(np.argmax([accuracy(m, xv, yv) for m in members]))],
        "ensemble_mean_probs": float(np.mean(ensemble_probs.argmax(1) == yt)),
        "linear_soup": accuracy(merge(members), xt, yt),
        "greedy_soup": accuracy(greedy, xt, yt),
        "greedy_soup_ingredients": greedy_report.ingredients,
        "task_arithmetic_lambda_0.5": accuracy(merge(members, "task_arithmetic", base=base, lambda_=0.5), xt, yt),
        "ties_density_0.5": accuracy(merge(members, "ties", base=base, density=0.5, lambda_=1.0), xt, yt),
        "dare_ties_density_0.5": accuracy(
            merge(members, "dare_ties", base=base, density=0.5, seed=0), xt, yt),
    }
    return results


def independent(build, data, epochs, use_bn):
    """(b)/(c) two models trained from different initialisations and data orders."""
    (x, y), _, (xt, yt) = data
    a = compile_fit(build(0), x, y, epochs=epochs, lr=1e-3, seed=0)
    b = compile_fit(build(1), x, y, epochs=epochs, lr=1e-3, seed=1)
    start = time.perf_counter()
    aligned = align([a, b])
    align_seconds = time.perf_counter() - start
    activation_aligned = align([a, b], method="activation_matching", x=x[:1000])
    results = {
        "members": [accuracy(a, xt, yt), accuracy(b, xt, yt)],
        "plain_average": accuracy(merge([a, b]), xt, yt),
        "weight_matching_average": accuracy(merge(aligned), xt, yt),
        "activation_matching_average": accuracy(merge(activation_aligned), xt, yt),
        "align_seconds": align_seconds,
    }
    results["members_mean"] = float(np.mean(results["members"]))
    if use_bn:
        # control: the members themselves with recomputed statistics
        results["members_reset_bn"] = [accuracy(reset_bn(m, x), xt, yt) for m in (a, b)]
        results["plain_average_reset_bn"] = accuracy(reset_bn(merge([a, b]), x), xt, yt)
        results["weight_matching_average_reset_bn"] = accuracy(reset_bn(merge(aligned), x), xt, yt)
        results["activation_matching_average_reset_bn"] = accuracy(
            reset_bn(merge(activation_aligned), x), xt, yt)
    return results


_CHILD = r"""
import os, resource, sys, time
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
import keras
from ensemblekit.merge import merge
mode, paths = sys.argv[1], sys.argv[2:]
start = time.perf_counter()
if mode == "import_only":
    model = keras.saving.load_model(paths[0])
else:
    model = merge(paths, stream=(mode == "stream"))
print(time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def out_of_core(k=8, layers=20, width=1600):
    """(d) peak RSS of merging K big member files, streamed vs loaded."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((width,))] + [L.Dense(width) for _ in range(layers)])
    bytes_per_member = model.count_params() * 4
    results = {"members": k, "params_per_member": model.count_params(),
               "mb_per_member": bytes_per_member / 1e6}
    with tempfile.TemporaryDirectory(prefix="ek-merge-bench-", dir="/tmp") as tmp:
        paths = []
        rng = np.random.default_rng(0)
        for i in range(k):
            for variable in model.weights:
                variable.assign(rng.standard_normal(variable.shape, dtype="float32") * 0.02)
            paths.append(str(Path(tmp) / f"member_{i}.keras"))
            model.save(paths[-1])
        del model
        for mode in ("import_only", "stream", "load_all"):
            out = subprocess.run([sys.executable, "-c", _CHILD, mode, *paths], check=True,
                                 capture_output=True, text=True).stdout.split()
            results[f"{mode}_seconds"] = float(out[-2])
            results[f"{mode}_peak_rss_mb"] = int(out[-1]) / 1024  # Linux: ru_maxrss in KiB
    return results


def markdown(results):
    a, b, c, d = results["a_fine_tunes"], results["b_mlp"], results["c_cnn_bn"], results["d_out_of_core"]
    sections = [("(b) 2 independent MLPs (40-512-512-10)", b),
                ("(c) 2 independent CNNs with BatchNorm (width 64)", c)]
    if "e_mobilenet_style" in results:
        sections.append(("(e) 2 independent MobileNet-style CNNs (depthwise-separable + SE, width 64)",
                         results["e_mobilenet_style"]))
    pct = lambda v: f"{100 * v:.1f}"  # noqa: E731
    lines = [
        "# Weight-space merging (mnist1d: 3500 train + 500 validation / 1000 test)",
        "",
        f"Machine: {results['machine']}. Accuracies on the 1000 test samples, in %.",
        "",
        "## (a) 5 fine-tunes of one base MLP (40-256-256-10)",
        "",
        "| model | accuracy |", "|---|---|",
        f"| base | {pct(a['base'])} |",
        f"| members | {', '.join(pct(v) for v in a['members'])} |",
        f"| best member (test) | {pct(a['best_member'])} |",
        f"| output ensemble (mean probs, 5x cost) | {pct(a['ensemble_mean_probs'])} |",
        f"| linear soup | {pct(a['linear_soup'])} |",
        f"| greedy soup (ingredients {a['greedy_soup_ingredients']}) | {pct(a['greedy_soup'])} |",
        f"| task arithmetic (λ=0.5) | {pct(a['task_arithmetic_lambda_0.5'])} |",
        f"| TIES (density 0.5) | {pct(a['ties_density_0.5'])} |",
        f"| DARE-TIES (density 0.5) | {pct(a['dare_ties_density_0.5'])} |",
        "",
    ]
    for title, r in sections:
        lines += [f"## {title}", "", "| model | accuracy |", "|---|---|",
                  f"| members | {', '.join(pct(v) for v in r['members'])} (mean {pct(r['members_mean'])}) |",
                  f"| plain average | {pct(r['plain_average'])} |",
                  f"| align (weight matching) + average | {pct(r['weight_matching_average'])} |",
                  f"| align (activation matching) + average | {pct(r['activation_matching_average'])} |"]
        if "plain_average_reset_bn" in r:
            lines += [f"| members + reset_bn (control) | {', '.join(pct(v) for v in r['members_reset_bn'])} |",
                      f"| plain average + reset_bn | {pct(r['plain_average_reset_bn'])} |",
                      f"| weight matching + average + reset_bn | {pct(r['weight_matching_average_reset_bn'])} |",
                      f"| activation matching + average + reset_bn | {pct(r['activation_matching_average_reset_bn'])} |"]
        lines += ["", f"Weight matching took {r['align_seconds']:.2f} s.", ""]
    lines += [
        f"## (d) Out-of-core merge: K={d['members']} members of {d['mb_per_member']:.0f} MB (.keras)",
        "",
        "Peak RSS of a fresh process (`resource.getrusage`), linear merge:",
        "",
        "| process | peak RSS (MB) | seconds |", "|---|---|---|",
        f"| load one member only (reference) | {d['import_only_peak_rss_mb']:.0f} | {d['import_only_seconds']:.1f} |",
        f"| `merge(paths)` streamed with h5py | {d['stream_peak_rss_mb']:.0f} | {d['stream_seconds']:.1f} |",
        f"| `merge(paths, stream=False)` (load all) | {d['load_all_peak_rss_mb']:.0f} | {d['load_all_seconds']:.1f} |",
        "",
    ]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="abcde", help="sections to run (letters a-e); default all")
    args = parser.parse_args(argv)
    (x, y), (xt, yt) = load_mnist1d(channels_last=False)
    flat = ((x[:-VALIDATION], y[:-VALIDATION]), (x[-VALIDATION:], y[-VALIDATION:]), (xt, yt))
    channels = tuple((a[..., None], b) for a, b in flat)
    previous = RESULTS / "merging.json"
    results = json.loads(previous.read_text()) if set(args.only) != set("abcde") and previous.exists() else {}
    results["machine"] = (f"{os.cpu_count()}-core CPU ({platform.machine()}), no GPU, "
                          f"keras {keras.__version__} ({keras.backend.backend()})")
    steps = [("a_fine_tunes", lambda: fine_tunes(flat)),
             ("b_mlp", lambda: independent(lambda s: mlp(512, s), flat, epochs=20, use_bn=False)),
             ("c_cnn_bn", lambda: independent(lambda s: cnn(64, s), channels, epochs=15, use_bn=True)),
             ("d_out_of_core", out_of_core),
             ("e_mobilenet_style", lambda: independent(lambda s: mobilenet_style(64, s), channels,
                                                       epochs=15, use_bn=True))]
    for key, step in steps:
        if key[0] not in args.only:
            continue
        start = time.perf_counter()
        results[key] = step()
        print(f"{key}: {time.perf_counter() - start:.0f} s\n{json.dumps(results[key], indent=1)}", flush=True)
    write_json_and_markdown(results, markdown(results), RESULTS, "merging")
    print(markdown(results))


if __name__ == "__main__":
    main()
