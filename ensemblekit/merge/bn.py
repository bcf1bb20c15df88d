"""``reset_bn``: recompute BatchNormalization statistics of a (merged) model from data."""

from __future__ import annotations

import keras
import numpy as np

from ensemblekit._data import batches, check_reiterable
from ensemblekit._graph import iter_sublayers


class _Recorded(Exception):
    """Stops a forward pass once the layer being reset has seen its input."""


def _batch_norm_layers(model):
    """Every BatchNormalization of ``model`` in execution order, nested models and blocks included."""
    return [(path, layer) for path, layer in iter_sublayers(model)
            if isinstance(layer, keras.layers.BatchNormalization)]


def reset_bn(model, x, steps=None, batch_size=None, verbose=0):
    """Set every BatchNormalization layer's moving mean/variance to its statistics on ``x``.

    Averaging weights (especially of independently trained, aligned models)
    shifts every hidden activation, so the running statistics of the members no
    longer describe the merged model and accuracy collapses (Jordan et al.,
    2023, "REPAIR"; Izmailov et al., 2018, SWA's ``bn_update``). This computes,
    layer by layer in graph order, the exact mean and (biased) variance of each
    BN layer's input over the data, in inference mode with the statistics
    already reset upstream, so the merged model predicts with statistics that
    match its own activations. Dropout stays off. BatchNormalization inside
    nested models (a keras.io fine-tune: ``Model(inputs, head(base(inputs)))``)
    and inside composite blocks is reset from the outer model's inputs: each
    layer's input is read as the model runs, the pass stopping at that layer.

    The data is read once per BatchNormalization layer, so ``x`` must be
    re-iterable (arrays, ``tf.data``, ``PyDataset``, or a function returning a
    fresh generator); a one-shot generator is refused.

    Args:
        model: a Keras model (modified in place).
        x: inputs as ``model.predict`` takes them (a dataset's labels are ignored),
            e.g. a few thousand training samples.
        steps: read at most this many batches per layer (``None``: all of ``x``).
        batch_size: rows per forward pass for arrays (default 256); datasets keep theirs.
        verbose: 1 shows a progress bar over BN layers.

    Returns:
        ``model``, with updated ``moving_mean``/``moving_variance``.

    Example:
        >>> import keras, numpy as np
        >>> m = keras.Sequential([keras.Input((3,)), keras.layers.BatchNormalization()])
        >>> x = np.arange(12, dtype="float32").reshape(4, 3)
        >>> np.round(keras.ops.convert_to_numpy(reset_bn(m, x).layers[0].moving_mean), 1)
        array([4.5, 5.5, 6.5], dtype=float32)
    """
    check_reiterable(x, "reset_bn")
    bn_layers = _batch_norm_layers(model)
    progress = keras.utils.Progbar(len(bn_layers), verbose=verbose, unit_name="layer")
    for path, layer in bn_layers:
        mean, variance = _input_statistics(model, layer, path, x, steps, batch_size)
        layer.moving_mean.assign(mean.astype(layer.moving_mean.dtype))
        layer.moving_variance.assign(variance.astype(layer.moving_variance.dtype))
        progress.add(1)
    return model


def _input_statistics(model, layer, path, x, steps, batch_size):
    """Mean and biased variance of ``layer``'s input (over all but its axis) as ``model`` runs on ``x``."""
    sums = {"total": 0.0, "squares": 0.0, "count": 0}
    shared = len(getattr(layer, "_inbound_nodes", ())) > 1

    def recording_call(inputs, *args, **kwargs):
        values = np.asarray(keras.ops.convert_to_numpy(inputs), dtype="float64")
        axis = layer.axis % values.ndim
        axes = tuple(a for a in range(values.ndim) if a != axis)
        sums["total"] = sums["total"] + values.sum(axis=axes)
        sums["squares"] = sums["squares"] + np.square(values).sum(axis=axes)
        sums["count"] += values.size // values.shape[axis]
        if not shared:
            raise _Recorded()
        return type(layer).call(layer, inputs, *args, **kwargs)

    object.__setattr__(layer, "call", recording_call)
    try:
        for x_batch, _, _ in batches(x, batch_size=batch_size, steps=steps, function="reset_bn"):
            try:
                model(x_batch, training=False)
            except _Recorded:
                pass
    finally:
        object.__delattr__(layer, "call")
    if not sums["count"]:
        raise ValueError(f"reset_bn: x holds no data, or BatchNormalization {path!r} of model "
                         f"{model.name!r} never ran on it.")
    mean = sums["total"] / sums["count"]
    return mean, np.maximum(sums["squares"] / sums["count"] - mean**2, 0.0)
