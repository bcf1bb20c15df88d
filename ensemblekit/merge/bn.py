"""``reset_bn``: recompute BatchNormalization statistics of a (merged) model from data."""

from __future__ import annotations

import keras
import numpy as np

from ensemblekit._graph import iter_layers


def _batches(x, batch_size, batches):
    count = int(np.ceil(len(x) / batch_size))
    if batches is not None:
        count = min(count, batches)
    return [x[i * batch_size:(i + 1) * batch_size] for i in range(count)]


def reset_bn(model, x, batches=None, batch_size=256, verbose=0):
    """Set every BatchNormalization layer's moving mean/variance to its statistics on ``x``.

    Averaging weights (especially of independently trained, aligned models)
    shifts every hidden activation, so the running statistics of the members no
    longer describe the merged model and accuracy collapses (Jordan et al.,
    2023, "REPAIR"; Izmailov et al., 2018, SWA's ``bn_update``). This computes,
    layer by layer in graph order, the exact mean and (biased) variance of each
    BN layer's input over the batches, in inference mode with the statistics
    already reset upstream, so the merged model predicts with statistics that
    match its own activations. Dropout stays off.

    Args:
        model: a functional or ``Sequential`` model (modified in place).
        x: input array (e.g. a few thousand training samples).
        batches: use at most this many batches (``None``: all of ``x``).
        batch_size: samples per forward pass.
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
    if len(x) == 0:
        raise ValueError("reset_bn needs at least one sample in x.")
    bn_layers = [(path, layer) for path, layer in iter_layers(model)
                 if isinstance(layer, keras.layers.BatchNormalization)]
    top_level = {id(layer) for layer in model.layers}
    for path, layer in bn_layers:
        if id(layer) not in top_level:
            raise ValueError(
                f"reset_bn: BatchNormalization {path!r} is inside a nested model; call reset_bn on "
                "that model (with its own inputs)."
            )
    chunks = _batches(np.asarray(x), batch_size, batches)
    progress = keras.utils.Progbar(len(bn_layers), verbose=verbose, unit_name="layer")
    for _, layer in bn_layers:
        inputs = model.inputs[0] if len(model.inputs) == 1 else model.inputs
        features = keras.Model(inputs, layer.input)
        axes = None
        total, total_sq, count = 0.0, 0.0, 0
        for chunk in chunks:
            out = np.asarray(features(chunk, training=False), dtype="float64")
            if axes is None:
                axis = layer.axis % out.ndim
                axes = tuple(a for a in range(out.ndim) if a != axis)
            total = total + out.sum(axis=axes)
            total_sq = total_sq + np.square(out).sum(axis=axes)
            count += out.size // out.shape[layer.axis]
        mean = total / count
        layer.moving_mean.assign(mean.astype(layer.moving_mean.dtype))
        layer.moving_variance.assign(
            np.maximum(total_sq / count - mean**2, 0.0).astype(layer.moving_variance.dtype))
        progress.add(1)
    return model
