"""What pruning bought: parameters, zeros, MACs, zipped size, measured latency, accuracy.

Unstructured zeros (``ek.prune.magnitude``) do NOT make dense kernels faster:
Dense/Conv layers still multiply every zero, so MACs and latency stay the same
and only the compressed file shrinks. Structural pruning (``ek.prune.channels``)
removes whole units/filters and is what lowers MACs and latency.
"""

from __future__ import annotations

import os
import tempfile
import time
import zipfile

import keras
import numpy as np

from ensemblekit._graph import iter_layers, model_input_shape, weight_refs
from ensemblekit._io import atomic_save


def _shape(tensor_or_shape):
    return tuple(getattr(tensor_or_shape, "shape", tensor_or_shape))


_RNN_GATES = {"SimpleRNN": 1, "GRU": 3, "LSTM": 4}


def layer_macs(layer):
    """Multiply-accumulates of one call of a Dense/convolution layer on one sample.

    Dense: ``positions x inputs x units``; convolutions: ``output positions x
    kernel size x input channels / groups x filters``; depthwise: ``output
    positions x kernel size x channels x depth_multiplier``; separable: depthwise
    plus pointwise; SimpleRNN/GRU/LSTM: ``timesteps x gates x (inputs + units) x
    units``; layers that declare ``macs_per_sample()`` (``ek.pack``'s grouped
    layers) count that. Other layers count 0. Needs a layer called in a functional graph.

    Example:
        >>> import keras
        >>> x = keras.Input((10,))
        >>> dense = keras.layers.Dense(4)
        >>> _ = dense(x)
        >>> layer_macs(dense)
        40
    """
    try:
        in_shape, out_shape = _shape(layer.input), _shape(layer.output)
    except (AttributeError, ValueError):
        return 0
    if isinstance(in_shape[0], tuple) or isinstance(out_shape[0], tuple):
        return 0
    declared = getattr(layer, "macs_per_sample", None)  # ek.pack's grouped layers
    if callable(declared):
        return int(declared())
    gates = _RNN_GATES.get(type(layer).__name__)
    if gates and len(in_shape) == 3:
        units = layer.cell.units
        return in_shape[1] * gates * (in_shape[2] + units) * units
    out_positions = int(np.prod(out_shape[1:-1], dtype="int64"))
    channels_in = in_shape[-1]
    if isinstance(layer, (keras.layers.Dense,)):
        return out_positions * channels_in * layer.units
    if isinstance(layer, (keras.layers.SeparableConv1D, keras.layers.SeparableConv2D)):
        kernel = int(np.prod(layer.kernel_size))
        depthwise = out_positions * kernel * channels_in * layer.depth_multiplier
        return depthwise + out_positions * channels_in * layer.depth_multiplier * layer.filters
    if isinstance(layer, (keras.layers.DepthwiseConv1D, keras.layers.DepthwiseConv2D)):
        return out_positions * int(np.prod(layer.kernel_size)) * channels_in * layer.depth_multiplier
    if isinstance(layer, (keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.Conv3D)):
        kernel = int(np.prod(layer.kernel_size))
        return out_positions * kernel * (channels_in // layer.groups) * layer.filters
    return 0


def macs(model):
    """Multiply-accumulates of ``model`` per sample, summed over its Dense/conv layers (nested ones too)."""
    return int(sum(layer_macs(layer) for _, layer in iter_layers(model)))


def count_params(model):
    """``(parameters, nonzero parameters)`` over all weights of ``model``."""
    arrays = [ref.numpy() for ref in weight_refs(model)]
    return (int(sum(a.size for a in arrays)), int(sum(np.count_nonzero(a) for a in arrays)))


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


def latency(model, batch_size, repeats=20, warmup=3):
    """Median seconds of one ``predict_on_batch`` on a random batch of ``batch_size`` (this device)."""
    shape = model_input_shape(model)
    x = np.random.default_rng(0).normal(size=(batch_size, *shape)).astype("float32")
    for _ in range(warmup):
        model.predict_on_batch(x)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model.predict_on_batch(x)
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def summarize(model, x=None, y=None, batch_sizes=(1, 256), repeats=20):
    """The numbers of :func:`report` for one model."""
    from ensemblekit.metrics import evaluate

    params, nonzeros = count_params(model)
    summary = {"params": params, "nonzeros": nonzeros, "sparsity": 1.0 - nonzeros / max(params, 1),
               "macs": macs(model), "zipped_bytes": zipped_size(model)}
    for batch_size in batch_sizes:
        summary[f"latency_b{batch_size}_s"] = latency(model, batch_size, repeats=repeats)
    if x is not None and y is not None:
        summary["accuracy"] = evaluate(model, x, y)["accuracy"]
    return summary


def report(model_before, model_after, x=None, y=None, batch_sizes=(1, 256), repeats=20):
    """Compare a model before and after pruning, measured on this device.

    Counts parameters, nonzero parameters, sparsity, MACs per sample
    (Dense/convolutions, via the ``_graph`` walker), the zipped ``.keras`` size
    (saved atomically into a temporary folder), the median latency of
    ``predict_on_batch`` at each batch size, and accuracy on ``(x, y)`` when
    labels are given.

    Unstructured zeros do not speed up dense kernels: a magnitude-pruned model
    has the same MACs and about the same latency as before; only its zipped
    size shrinks. Fewer MACs and lower latency come from ``channels()``.

    Args:
        model_before, model_after: the two models.
        x, y: optional evaluation data; with labels the accuracy of both and
            ``"accuracy_delta"`` (after - before) are reported.
        batch_sizes: batch sizes whose latency is measured.
        repeats: timed calls per batch size (the median is kept).

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
        >>> r = report(m, channels(m, 0.5), batch_sizes=(1,), repeats=2)
        >>> r["ratios"]["macs"]
        2.0
    """
    before = summarize(model_before, x, y, batch_sizes, repeats)
    after = summarize(model_after, x, y, batch_sizes, repeats)
    names = {"params": "params", "nonzeros": "nonzeros", "macs": "macs", "zipped_bytes": "zipped_size",
             **{f"latency_b{b}_s": f"latency_b{b}_speedup" for b in batch_sizes}}
    ratios = {name: before[key] / after[key] if after[key] else float("inf")
              for key, name in names.items()}
    result = {"before": before, "after": after, "ratios": ratios}
    if "accuracy" in before:
        result["accuracy_delta"] = after["accuracy"] - before["accuracy"]
    return result


__all__ = ["count_params", "latency", "layer_macs", "macs", "report", "summarize", "zipped_size"]
