"""What pruning bought: parameters, zeros, MACs, zipped size, measured latency, accuracy.

Unstructured zeros (``ek.prune.magnitude``) do NOT make dense kernels faster:
Dense/Conv layers still multiply every zero, so MACs and latency stay the same
and only the compressed file shrinks. Structural pruning (``ek.prune.channels``)
removes whole units/filters and is what lowers MACs and latency.
"""

from __future__ import annotations

import os
import tempfile
import zipfile

from ensemblekit._io import atomic_save
from ensemblekit.costs import count_params, latencies, macs


def zipped_size(model):
    """Bytes of ``model`` saved as ``.keras`` and then deflate-compressed (zip level 9).

    A ``.keras`` file stores its weights uncompressed; this is the size after a
    ``zip`` of that file, where zeros from pruning pay off.

    Example:
        >>> import keras
        >>> zipped_size(keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])) > 0
        True
    """
    with tempfile.TemporaryDirectory() as folder:
        path = atomic_save(model, os.path.join(folder, "model.keras"))
        archive = os.path.join(folder, "model.zip")
        with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
            zf.write(path, arcname="model.keras")
        return os.path.getsize(archive)


def summarize(model, x=None, y=None):
    """The size and accuracy numbers of :func:`report` for one model (no latency)."""
    from ensemblekit._data import is_dataset
    from ensemblekit.metrics import evaluate

    params, nonzeros = count_params(model)
    summary = {"params": params, "nonzeros": nonzeros, "sparsity": 1.0 - nonzeros / max(params, 1),
               "macs": macs(model), "zipped_bytes": zipped_size(model)}
    if x is not None and (y is not None or is_dataset(x)):  # a dataset yields its labels
        summary["accuracy"] = evaluate(model, x, y)["accuracy"]
    return summary


def report(model_before, model_after, x=None, y=None, batch_sizes=(1, 256), repeats=7):
    """Compare a model before and after pruning, measured on this device.

    Counts parameters, nonzero parameters, sparsity, MACs per sample
    (``ensemblekit.costs.macs``), the zipped ``.keras`` size
    (saved atomically into a temporary folder), the latency at each batch size
    (``ensemblekit.costs.latencies``: both models compiled for inference and
    timed round-robin), and accuracy on ``(x, y)`` when labels are given.

    Unstructured zeros do not speed up dense kernels: a magnitude-pruned model
    has the same MACs and about the same latency as before; only its zipped
    size shrinks. Fewer MACs and lower latency come from ``channels()``.

    Args:
        model_before, model_after: the two models.
        x, y: optional evaluation data (arrays with labels ``y``, or a dataset yielding
            ``(x, y)``); the accuracy of both and ``"accuracy_delta"`` (after - before)
            are reported.
        batch_sizes: batch sizes whose latency is measured.
        repeats: timed rounds per batch size (the median is kept).

    Returns:
        ``{"before": {...}, "after": {...}, "ratios": {...}}`` where each side has
        ``params``, ``nonzeros``, ``sparsity``, ``macs``, ``zipped_bytes``,
        ``latency_b<N>_s`` (and ``accuracy``); ``ratios`` holds before/after for
        ``params``, ``nonzeros``, ``macs``, ``zipped_size`` and ``latency_b<N>_speedup``; plus
        ``accuracy_delta`` when labels were given.

    Example:
        >>> import keras
        >>> from ensemblekit.prune import channels
        >>> m = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16), keras.layers.Dense(3)])
        >>> r = report(m, channels(m, 0.5), batch_sizes=(1,), repeats=1)
        >>> r["ratios"]["macs"]
        2.0
    """
    before, after = summarize(model_before, x, y), summarize(model_after, x, y)
    for batch_size in batch_sizes:
        seconds = latencies({"before": model_before, "after": model_after}, batch_size=batch_size,
                            repeats=repeats, target_s=0.02)
        before[f"latency_b{batch_size}_s"], after[f"latency_b{batch_size}_s"] = (
            seconds["before"], seconds["after"])
    names = {"params": "params", "nonzeros": "nonzeros", "macs": "macs", "zipped_bytes": "zipped_size",
             **{f"latency_b{b}_s": f"latency_b{b}_speedup" for b in batch_sizes}}
    ratios = {name: before[key] / after[key] if after[key] else float("inf")
              for key, name in names.items()}
    result = {"before": before, "after": after, "ratios": ratios}
    if "accuracy" in before:
        result["accuracy_delta"] = after["accuracy"] - before["accuracy"]
    return result


__all__ = ["report", "summarize", "zipped_size"]
