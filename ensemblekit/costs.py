"""What a model costs to run: parameters, multiply-accumulates (MACs) per sample, latency.

The advisor's budgets, ``ek.prune.select_members``' budgets, ``ek.prune.report`` and the
benchmarks all count with these functions, so "cost" means the same everywhere:

- ``"params"``: weights of the model (nested members included);
- ``"macs"``: multiply-accumulates of one sample through its Dense, convolution
  and recurrent layers (ensemblekit's grouped layers count their members' sum);
- ``"latency"``: median seconds per call of the model compiled by
  ``compile_for_inference`` on one batch of 256 rows, the models timed
  round-robin after warm-up (see :mod:`ensemblekit._timing`).

Budgets (``ek.advise(budget=...)``, ``ek.prune.select_members(budget=...)``) have one
meaning too: **the most the result may cost, in units of the members' mean
cost** under the chosen ``cost``. ``1.0`` is one member's cost (the mean over
the K members), ``K`` is all K members, ``0.5`` half a member. A budget of 2.0
on members costing ``[1, 1, 4]`` parameters (mean 2) allows 4 parameters: the
two small members together, or the big one alone. :func:`check_budget`
validates a budget and :func:`budget_limit` turns it into the cost's own unit.
"""

from __future__ import annotations

import math
import numbers

import keras
import numpy as np

from ensemblekit._data import batches, is_dataset
from ensemblekit._graph import iter_layers, model_input_shape, special_layers, weight_refs
from ensemblekit._timing import batch_seconds, fixed_batch
from ensemblekit._validate import check_choice
from ensemblekit.inference import compile_for_inference

COSTS = ("params", "macs", "latency")
COST_UNITS = {"params": "parameters", "macs": "MACs per sample", "latency": "s per batch of 256"}
LATENCY_BATCH = 256
_RNN_GATES = {"SimpleRNN": 1, "GRU": 3, "LSTM": 4}


def _shape(tensor_or_shape):
    return tuple(getattr(tensor_or_shape, "shape", tensor_or_shape))


def layer_macs(layer):
    """Multiply-accumulates of one call of a Dense/convolution/recurrent layer on one sample.

    Dense: ``positions x inputs x units``; convolutions: ``output positions x
    kernel size x input channels / groups x filters``; depthwise: ``output
    positions x kernel size x channels x depth_multiplier``; separable: depthwise
    plus pointwise; SimpleRNN/GRU/LSTM: ``timesteps x gates x (inputs + units) x
    units``; layers that declare ``macs_per_sample()`` (``ek.pack``'s grouped
    layers) count that. Other layers count 0. Needs a layer called in a functional graph.

    Example:
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
    declared = getattr(layer, "macs_per_sample", None)
    if callable(declared):
        return int(declared())
    gates = _RNN_GATES.get(type(layer).__name__)
    if gates and len(in_shape) == 3:
        units = layer.cell.units
        return in_shape[1] * gates * (in_shape[2] + units) * units
    out_positions = int(np.prod(out_shape[1:-1], dtype="int64"))
    channels_in = in_shape[-1]
    L = keras.layers
    if isinstance(layer, L.Dense):
        return out_positions * channels_in * layer.units
    if isinstance(layer, (L.SeparableConv1D, L.SeparableConv2D)):
        kernel = int(np.prod(layer.kernel_size))
        depthwise = out_positions * kernel * channels_in * layer.depth_multiplier
        return depthwise + out_positions * channels_in * layer.depth_multiplier * layer.filters
    if isinstance(layer, (L.DepthwiseConv1D, L.DepthwiseConv2D)):
        return out_positions * int(np.prod(layer.kernel_size)) * channels_in * layer.depth_multiplier
    if isinstance(layer, (L.Conv1D, L.Conv2D, L.Conv3D)):
        kernel = int(np.prod(layer.kernel_size))
        return out_positions * kernel * (channels_in // layer.groups) * layer.filters
    return 0


def macs(model):
    """Multiply-accumulates of ``model`` per sample, summed over its layers (nested ones too).

    Example:
        >>> macs(keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)]))
        12
    """
    opaque = [path for path, kind in special_layers(model) if kind == "savedmodel"]
    if opaque:
        raise ValueError(
            f"macs: model {model.name!r}: layer {opaque[0]!r} is a TFSMLayer (a SavedModel), whose "
            "multiply-accumulates cannot be counted; use cost='params' or 'latency'."
        )
    return int(sum(layer_macs(layer) for _, layer in iter_layers(model)))


def count_params(model):
    """``(parameters, nonzero parameters)`` over all weights of ``model``.

    Example:
        >>> count_params(keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)]))
        (15, 12)
    """
    arrays = [ref.numpy() for ref in weight_refs(model)]
    return (int(sum(a.size for a in arrays)), int(sum(np.count_nonzero(a) for a in arrays)))


def latencies(models, x=None, batch_size=LATENCY_BATCH, repeats=5, target_s=0.02):
    """Median seconds per batch of each ``{name: model}``, compiled for inference and timed round-robin.

    Args:
        models: ``{name: keras.Model}``, all taking the same input.
        x: sample inputs, repeated or cut to ``batch_size`` rows: an array, or a
            dataset whose first batch is used (default: a seeded normal batch of the
            first model's input shape).
        batch_size: rows per timed call.

    Returns:
        ``{name: seconds}``.

    Example:
        >>> m = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
        >>> seconds = latencies({"m": m}, batch_size=8, repeats=2, target_s=0.001)
        >>> 0 < seconds["m"] < 1
        True
    """
    if x is None:
        shape = model_input_shape(next(iter(models.values())))
        x = np.random.default_rng(0).normal(size=(batch_size, *shape)).astype("float32")
    elif is_dataset(x):  # its first batch is the sample
        x = next(batches(x, function="latencies"))[0]
    compiled = {name: compile_for_inference(model) for name, model in models.items()}
    batch = fixed_batch(x, batch_size)
    for call in compiled.values():  # jit_compile="auto" settles on the second call: not in the timing
        call(batch)
        call(batch)
    return batch_seconds(compiled, batch, batch_size, repeats=repeats, target_s=target_s)


def latency(model, batch_size=LATENCY_BATCH, x=None, repeats=5, target_s=0.05):
    """Median seconds of one call of ``model`` (compiled for inference) on a batch of ``batch_size``.

    Example:
        >>> latency(keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)]), 8) > 0
        True
    """
    return latencies({"model": model}, x, batch_size, repeats, target_s)["model"]


def model_costs(models, cost="params", x=None):
    """Cost of each of ``models``: parameters, MACs per sample or latency (seconds at batch 256).

    ``cost`` may also be a sequence of one positive number per model (the
    user's own costs). Latencies of all models are timed round-robin in one run.

    Returns:
        A float64 array, one cost per model.

    Example:
        >>> m = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
        >>> model_costs([m, m], "macs").tolist()
        [12.0, 12.0]
    """
    if not isinstance(cost, str):
        values = np.asarray(cost, dtype="float64")
        if values.shape != (len(models),) or not np.all(np.isfinite(values)) or np.any(values <= 0):
            raise ValueError(f"cost must be one of {COSTS} or {len(models)} positive numbers, got {cost!r}.")
        return values
    check_choice(cost, COSTS, "cost")
    if cost == "params":
        return np.array([m.count_params() for m in models], dtype="float64")
    if cost == "macs":
        return np.array([macs(m) for m in models], dtype="float64")
    seconds = latencies({str(i): m for i, m in enumerate(models)}, x)
    return np.array([seconds[str(i)] for i in range(len(models))], dtype="float64")


def check_budget(budget, param="budget"):
    """A budget as a float, or ``None`` (the caller's default); anything else is a ``ValueError``.

    A budget is the most the result may cost, in units of the members' mean
    cost (``1.0`` = one member's cost, ``K`` = all K members); see the module
    docstring. It must be a finite positive real number (not a bool).

    Args:
        budget: ``None`` or a positive number.
        param: the parameter's name in the error message.

    Returns:
        ``float(budget)``, or ``None``.

    Example:
        >>> check_budget(2)
        2.0
        >>> check_budget(0)
        Traceback (most recent call last):
        ...
        ValueError: budget must be None or a positive number of mean member costs (1.0 = one member's cost, K = all K members), got 0.
    """
    if budget is None:
        return None
    if isinstance(budget, bool) or not isinstance(budget, numbers.Real) or not (
            math.isfinite(budget) and budget > 0):
        raise ValueError(
            f"{param} must be None or a positive number of mean member costs (1.0 = one member's "
            f"cost, K = all K members), got {budget!r}.")
    return float(budget)


def budget_limit(budget, member_costs):
    """The most a budget allows, in the unit of ``member_costs``: ``budget x mean(member_costs)``.

    Example:
        >>> budget_limit(2.0, [1.0, 1.0, 4.0])
        4.0
    """
    return float(budget * np.mean(np.asarray(member_costs, dtype="float64")))
