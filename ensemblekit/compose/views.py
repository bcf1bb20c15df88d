"""Test-time augmentation: ``ek.tta`` averages a model over deterministic views of its input.

A view is a small registered layer (so a TTA model saves and loads in
``safe_mode``): :class:`Flip`, :class:`Shift` and :class:`CenterCrop`, or any
Keras layer that keeps the input's shape. Keras' ``Random*`` layers are the
identity at inference, so they are no views; ``None`` is the input itself.
The views' outputs are combined per task exactly as ``ek.ensemble`` combines
members (the model is one member seen through each view).
"""

from __future__ import annotations

import keras
from keras import ops

from ensemblekit.compose.ensemble import ensemble


def _axis(axis, rank):
    """A sample axis (1 = the first after the batch axis; negative from the end) as a tensor axis."""
    resolved = axis if axis >= 0 else rank + axis
    if not 1 <= resolved < rank:
        raise ValueError(f"axis {axis} is not a sample axis of an input of rank {rank} (the batch axis "
                         "is 0 and cannot be transformed).")
    return resolved


@keras.saving.register_keras_serializable(package="ensemblekit")
class Flip(keras.layers.Layer):
    """Reverse the input along ``axis`` (``-2``: an image's width in NHWC, a sequence's time in
    ``(batch, steps, channels)``).

    Example:
        >>> import numpy as np
        >>> keras.ops.convert_to_numpy(Flip(axis=1)(np.array([[1.0, 2.0, 3.0]]))).tolist()
        [[3.0, 2.0, 1.0]]
    """

    def __init__(self, axis=-2, **kwargs):
        super().__init__(**kwargs)
        self.axis = int(axis)

    def call(self, inputs):
        return ops.flip(inputs, axis=_axis(self.axis, len(inputs.shape)))

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "axis": self.axis}


@keras.saving.register_keras_serializable(package="ensemblekit")
class Shift(keras.layers.Layer):
    """Move the input ``offset`` positions along ``axis`` (positive: towards the end), filling zeros.

    Example:
        >>> import numpy as np
        >>> keras.ops.convert_to_numpy(Shift(1, axis=1)(np.array([[1.0, 2.0, 3.0]]))).tolist()
        [[0.0, 1.0, 2.0]]
    """

    def __init__(self, offset, axis=-2, **kwargs):
        super().__init__(**kwargs)
        self.offset, self.axis = int(offset), int(axis)

    def call(self, inputs):
        rank = len(inputs.shape)
        axis = _axis(self.axis, rank)
        length = inputs.shape[axis]
        if length is None:
            raise ValueError(f"Shift needs a known length along axis {self.axis}; the input is {inputs.shape}.")
        size = min(abs(self.offset), length)
        pad = [(0, 0)] * rank
        pad[axis] = (size, 0) if self.offset > 0 else (0, size)
        padded = ops.pad(inputs, pad)
        start = [0] * rank
        start[axis] = 0 if self.offset > 0 else size
        shape = list(ops.shape(inputs))
        return ops.slice(padded, start, shape)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "offset": self.offset, "axis": self.axis}


@keras.saving.register_keras_serializable(package="ensemblekit")
class CenterCrop(keras.layers.Layer):
    """Crop the central ``fraction`` of an image (NHWC) and resize it back to the input's size.

    Example:
        >>> import numpy as np
        >>> tuple(CenterCrop(0.5)(np.zeros((1, 8, 8, 3), "float32")).shape)
        (1, 8, 8, 3)
    """

    def __init__(self, fraction=0.875, interpolation="bilinear", **kwargs):
        super().__init__(**kwargs)
        if not 0.0 < float(fraction) <= 1.0:
            raise ValueError(f"CenterCrop: fraction must be in (0, 1], got {fraction!r}.")
        self.fraction, self.interpolation = float(fraction), interpolation

    def call(self, inputs):
        if len(inputs.shape) != 4 or None in inputs.shape[1:3]:
            raise ValueError(f"CenterCrop takes images (batch, height, width, channels) of a known size; "
                             f"the input is {inputs.shape}.")
        height, width = inputs.shape[1], inputs.shape[2]
        crop_h, crop_w = max(1, round(height * self.fraction)), max(1, round(width * self.fraction))
        top, left = (height - crop_h) // 2, (width - crop_w) // 2
        cropped = inputs[:, top:top + crop_h, left:left + crop_w, :]
        return ops.image.resize(cropped, (height, width), interpolation=self.interpolation)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "fraction": self.fraction, "interpolation": self.interpolation}


def tta(model, views, method="mean", name=None, output_kind=None, task=None, uncertainty=False,
        safe_mode=True):
    """One Keras model averaging ``model`` over deterministic views of its input.

    Args:
        model: a ``keras.Model`` or a path (one input).
        views: at least two views: :class:`Flip`, :class:`Shift`, :class:`CenterCrop`, any
            Keras layer keeping the input's shape, or ``None`` (the input itself). A plain
            callable works too, wrapped in a ``keras.layers.Lambda`` — then the model loads
            only with ``safe_mode=False``.
        method: how the views' outputs combine, per task, as in ``ek.ensemble``
            (``"mean"``, ``"logit_mean"``, ``"geometric"``, ``"vote"``; regression
            ``"median"``, ...).
        name: the returned model's name (default ``"<model>_tta"``).
        output_kind, task, uncertainty: as in ``ek.ensemble``.
        safe_mode: used when loading ``model`` from a file.

    Returns:
        A ``keras.Model``; its output is the combination over the views.

    Example:
        >>> import keras, numpy as np
        >>> import ensemblekit as ek
        >>> m = keras.Sequential([keras.Input((6, 1)), keras.layers.Flatten(), keras.layers.Dense(3)])
        >>> t = ek.tta(m, [None, Flip(axis=1)])
        >>> t.predict(np.zeros((2, 6, 1)), verbose=0).shape
        (2, 3)
    """
    if not isinstance(views, (list, tuple)) or len(views) < 2:
        raise ValueError(f"tta: views must be a list of at least two views (None for the input itself), "
                         f"got {views!r}.")
    adapters = []
    for index, view in enumerate(views):
        if view is None or isinstance(view, keras.layers.Layer):
            adapters.append(view)
        elif callable(view):
            adapters.append(keras.layers.Lambda(view, name=f"view_{index}"))
        else:
            raise TypeError(f"tta: views[{index}] is a {type(view).__name__}; expected a Keras layer, "
                            "a callable or None.")
    members = [model] * len(views)
    base_name = model.name if isinstance(model, keras.Model) else "model"
    return ensemble(members, method, name=name or f"{base_name}_tta", output_kind=output_kind,
                    adapters=adapters, safe_mode=safe_mode, task=task, uncertainty=uncertainty)
