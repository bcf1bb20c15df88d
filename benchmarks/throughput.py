"""Ensemble throughput, every path side by side: ``python -m benchmarks.throughput [--quick]``.

Writes benchmarks/results/throughput.{json,md,png} (``--quick``: throughput_quick.*).
The report puts, per batch, the autotuned packed model (``pack_xla``: ``compile_for_inference``
picks the grouped or loop lowering or the unpacked members per shape, and the row says which),
``ek.ensemble`` compiled with XLA and the naive graph (``ensemble`` without XLA) side by side in
float32 and bfloat16, with the ``matmuls_only`` bound, and prints the line "best float32 path at
batch 256 >= 90% of matmuls_only: met/NOT met" computed from the run (K=8 MLP:
``--workloads mlp --members 8`` is the short run that gives it). The 1-minute load average
before and after is recorded in the header. ``pack_auto`` / ``ensemble_auto`` run
``compile_for_inference(jit_compile="auto")`` (XLA or the plain graph, timed per shape); the
report's "jit_compile=auto" table says what each picked and how it compares with the faster
fixed setting.
``--workloads mobilenetv2`` times K=4 MobileNetV2 members, ``ek.pack`` vs ``ek.ensemble``
(each through ``compile_for_inference``) at batch 1/32/256, into throughput_mobilenetv2.*.
The harness lives in ``ensemblekit.bench.throughput``; ``ensemblekit bench throughput``
runs the same thing.

``--precision`` times instead, side by side in one run, the packed model through
``compile_for_inference(dtype="float32")`` and ``(dtype="bfloat16")`` (bfloat16
compute, float32 variables and output), with the largest probability difference
and the argmax agreement of bfloat16 against float32, and, when ``import torch``
works (``pip install "ensemblekit[bench-torch]"``), the same MLP members in
PyTorch (a loop of K members, float32 and ``torch.autocast`` bfloat16) as peers.
Writes throughput_precision.{json,md} (``--quick``: throughput_precision_quick.*).
"""

import argparse
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import functools  # noqa: E402
import importlib.util  # noqa: E402
import statistics  # noqa: E402

import keras  # noqa: E402
import numpy as np  # noqa: E402

from ensemblekit._timing import time_paths  # noqa: E402
from ensemblekit.bench.throughput import (  # noqa: E402
    WORKLOADS,
    add_arguments,
    build_member,
    device_info,
    main,
    write_json_and_markdown,
)
from ensemblekit.inference import compile_for_inference  # noqa: E402
from ensemblekit.pack import pack  # noqa: E402

PRECISIONS = ("float32", "bfloat16")


def precision_run(workloads=("mlp", "cnn1d"), members=(4,), batches=(1, 256), repeats=5,
                  target_s=0.05):
    """Rows of samples/s per (workload, K, batch, path): the packed model in float32 and
    bfloat16 (and torch peers for MLP members when torch is installed)."""
    rows = []
    for index, (workload, k, batch) in enumerate(
            (w, k, b) for w in workloads for k in members for b in batches):
        models = [build_member(workload, seed) for seed in range(k)]
        x = np.random.default_rng(index).normal(size=(batch, *WORKLOADS[workload])).astype("float32")
        packed = pack(models, "mean")
        compiled = {f"pack_{dtype}": compile_for_inference(packed, dtype=dtype) for dtype in PRECISIONS}
        outputs = {name: f(x) for name, f in compiled.items()}
        paths = {name: functools.partial(f, x) for name, f in compiled.items()}
        paths.update(torch_paths(models, x) if workload == "mlp" else {})
        seconds = time_paths(paths, repeats=repeats, target_s=target_s)
        difference = float(np.abs(outputs["pack_bfloat16"] - outputs["pack_float32"]).max())
        agreement = float(np.mean(outputs["pack_bfloat16"].argmax(-1) == outputs["pack_float32"].argmax(-1)))
        for path, time_per_call in seconds.items():
            rows.append(dict(workload=workload, members=k, batch=batch, path=path,
                             samples_per_s=batch / time_per_call,
                             ratio=seconds["pack_float32"] / time_per_call,
                             bf16_max_abs_diff=difference, bf16_agreement=agreement))
        keras.backend.clear_session()
    return {"info": device_info(), "repeats": repeats, "torch": _torch_version(), "results": rows}


def _torch_version():
    if importlib.util.find_spec("torch") is None:
        return None
    import torch

    return torch.__version__


def torch_paths(models, x):
    """``{"torch_float32": fn, "torch_bfloat16": fn}``: the Keras MLP members (Flatten, Dense...)
    as PyTorch modules with the same weights, run as a loop of K members (empty without torch)."""
    if _torch_version() is None:
        return {}
    import torch

    def to_torch(model):
        modules = [torch.nn.Flatten()]
        for layer in model.layers:
            if isinstance(layer, keras.layers.Dense):
                kernel, bias = layer.get_weights()
                linear = torch.nn.Linear(*kernel.shape)
                linear.weight.data = torch.from_numpy(kernel.T.copy())
                linear.bias.data = torch.from_numpy(bias)
                modules.append(linear)
                if layer.activation is keras.activations.relu:
                    modules.append(torch.nn.ReLU())
        return torch.nn.Sequential(*modules).eval()

    members = [to_torch(model) for model in models]
    inputs = torch.from_numpy(x)

    def run(dtype):
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
            probs = torch.stack([torch.softmax(m(inputs).float(), -1) for m in members]).mean(0)
        return probs.numpy()

    return {f"torch_{dtype}": functools.partial(run, dtype) for dtype in PRECISIONS}


def precision_markdown(result):
    lines = ["# Packed ensemble: float32 vs bfloat16 compute", "",
             f"Device: {result['info'].get('device', '?')}; torch peers: "
             f"{result['torch'] or 'not run (torch not installed)'}.", "",
             "| workload | K | batch | path | samples/s | vs pack_float32 | bf16 max abs diff | "
             "bf16 argmax agreement |", "|---|---|---|---|---|---|---|---|"]
    for row in result["results"]:
        lines.append(f"| {row['workload']} | {row['members']} | {row['batch']} | {row['path']} | "
                     f"{row['samples_per_s']:.0f} | {row['ratio']:.2f}x | {row['bf16_max_abs_diff']:.1e} | "
                     f"{row['bf16_agreement']:.3f} |")
    ratios = [r["ratio"] for r in result["results"] if r["path"] == "pack_bfloat16"]
    lines += ["", f"Median bfloat16 speed-up over float32: {statistics.median(ratios):.2f}x."]
    return "\n".join(lines) + "\n"


def precision_main(args):
    quick = args.quick
    result = precision_run(workloads=args.workloads or ("mlp", "cnn1d"),
                           members=args.members or ((4,) if quick else (2, 8)),
                           batches=args.batches or ((1, 256) if quick else (1, 32, 256)),
                           repeats=args.repeats or (3 if quick else 5),
                           target_s=0.03 if quick else 0.05)
    stem = "throughput_precision_quick" if quick else "throughput_precision"
    for path in write_json_and_markdown(result, precision_markdown(result), args.out, stem):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    parser = add_arguments(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    parser.add_argument("--precision", action="store_true",
                        help="time the packed model in float32 vs bfloat16 (and torch peers)")
    arguments = parser.parse_args()
    sys.exit(precision_main(arguments) if arguments.precision else main(arguments))
