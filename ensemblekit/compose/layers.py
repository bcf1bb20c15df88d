"""Keras layers that combine member outputs.

One base class, ``Combiner``, validates the member outputs and turns each into
log-probabilities; each method is a small subclass overriding ``combine`` (the
pattern of ``keras.layers.Average`` over ``keras.layers.Merge``). Every layer is
registered, so composed models load from ``.keras`` in ``safe_mode`` without
``custom_objects``.
"""

from __future__ import annotations

import keras
from keras import ops

from ensemblekit._outputs import to_log_probs
from ensemblekit._tasks import canonical, keep_non_finite

PACKAGE = "ensemblekit"


class Combiner(keras.layers.Layer):
    """Base class: combine K multiclass member outputs ``(batch, ..., classes)`` (over the last axis).

    Args:
        kinds: per member, ``"logits"`` or ``"probs"`` (what the member outputs).
        member_weights: per member, non-negative weights summing to one
            (``None``: uniform).

    Subclasses implement ``combine(log_probs, weights)`` where ``log_probs`` is
    a list of ``(batch, classes)`` tensors; the result is a probability tensor.
    """

    output_kind = "probs"
    task = "multiclass"

    def __init__(self, kinds, member_weights=None, **kwargs):
        super().__init__(**kwargs)
        self.kinds = list(kinds)
        self.member_weights = None if member_weights is None else [float(w) for w in member_weights]

    def build(self, input_shape):
        if not isinstance(input_shape, (list, tuple)) or not isinstance(input_shape[0], (list, tuple)):
            raise ValueError(f"{self.name}: expects a list of member outputs, got shape {input_shape}.")
        if len(input_shape) != len(self.kinds):
            raise ValueError(
                f"{self.name}: got {len(input_shape)} member outputs but {len(self.kinds)} kinds."
            )
        first = tuple(input_shape[0])
        for index, shape in enumerate(input_shape):
            if len(shape) < 2 or tuple(shape)[1:] != first[1:]:
                raise ValueError(
                    f"{self.name}: member {index} outputs shape {tuple(shape)}; every member must "
                    f"output (batch, ..., classes) = {first}."
                )

    def _weights_or_uniform(self):
        count = len(self.kinds)
        return self.member_weights or [1.0 / count] * count

    def call(self, inputs):
        inputs = [ops.cast(x, "float32") for x in inputs]  # combine in float32 under mixed precision
        log_probs = [to_log_probs(x, kind) for x, kind in zip(inputs, self.kinds)]
        combined = self.combine(log_probs, self._weights_or_uniform())
        return keep_non_finite(combined, ops.stack(log_probs, axis=1), self.task)  # a vote's argmax drops NaN

    def combine(self, log_probs, weights):
        raise NotImplementedError

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[0])

    def get_config(self):
        config = super().get_config()
        config.update(kinds=self.kinds, member_weights=self.member_weights)
        return config


@keras.saving.register_keras_serializable(package=PACKAGE)
class MeanProbabilities(Combiner):
    """(Weighted) arithmetic mean of the members' probabilities."""

    def combine(self, log_probs, weights):
        return sum(w * ops.exp(lp) for w, lp in zip(weights, log_probs))


@keras.saving.register_keras_serializable(package=PACKAGE)
class LogitMean(Combiner):
    """Softmax of the (weighted) mean of the members' logits.

    Members that output probabilities contribute ``log(p)``, which equals their
    logits up to a per-sample constant that the softmax removes.
    """

    def combine(self, log_probs, weights):
        return ops.softmax(sum(w * lp for w, lp in zip(weights, log_probs)), axis=-1)


@keras.saving.register_keras_serializable(package=PACKAGE)
class GeometricMean(LogitMean):
    """Normalised (weighted) geometric mean of the members' probabilities.

    ``p ∝ Π p_k^{w_k}``, i.e. ``softmax(Σ w_k log p_k)``. Since ``log p_k`` equals a
    softmax member's logits up to a per-sample constant, this is the same
    function as ``LogitMean``; both names exist because both are in common use.
    """


@keras.saving.register_keras_serializable(package=PACKAGE)
class MajorityVote(Combiner):
    """Hard (weighted) majority vote; ties broken by the mean probability.

    The output is a distribution: ``(votes + tie_break * mean_probs) / (1 + tie_break)``
    with votes as weighted fractions. With ``tie_break < min weight`` the mean
    probability only decides between classes with equal votes.
    """

    def combine(self, log_probs, weights):
        classes = ops.shape(log_probs[0])[-1]
        votes = sum(
            w * ops.one_hot(ops.argmax(lp, axis=-1), classes, dtype=lp.dtype)
            for w, lp in zip(weights, log_probs)
        )
        mean_probs = sum(w * ops.exp(lp) for w, lp in zip(weights, log_probs))
        tie_break = 0.5 * min(weights)
        return (votes + tie_break * mean_probs) / (1.0 + tie_break)


@keras.saving.register_keras_serializable(package=PACKAGE)
class TemperatureScaling(keras.layers.Layer):
    """``softmax(log p / T)``: temperature scaling of a classifier's output.

    Args:
        temperature: positive float, fitted by ``ensemblekit.calibrate``.
        kind: ``"probs"`` or ``"logits"``, what the wrapped model outputs.
    """

    output_kind = "probs"
    task = "multiclass"

    def __init__(self, temperature=1.0, kind="probs", **kwargs):
        super().__init__(**kwargs)
        if not temperature > 0:
            raise ValueError(f"temperature must be positive, got {temperature}.")
        self.temperature = float(temperature)
        self.kind = kind

    def call(self, inputs):
        return ops.softmax(to_log_probs(inputs, self.kind) / self.temperature, axis=-1)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(temperature=self.temperature, kind=self.kind)
        return config


@keras.saving.register_keras_serializable(package=PACKAGE)
class PlattScaling(keras.layers.Layer):
    """``sigmoid(a · logit(p) + b)``: Platt scaling of a binary (or multilabel) classifier's output.

    Args:
        slope, bias: fitted by ``ensemblekit.calibrate``: one float each, shared by
            every unit; or one per label (lists as long as the last axis,
            ``calibrate(..., per_label=True)``).
        kind: ``"probs"`` or ``"logits"``, what the wrapped model outputs.

    Example:
        >>> import numpy as np
        >>> layer = PlattScaling(slope=[1.0, 2.0], bias=[0.0, -1.0], kind="logits")
        >>> np.round(keras.ops.convert_to_numpy(layer(np.array([[0.0, 0.5]]))), 3)
        array([[0.5, 0.5]], dtype=float32)
    """

    output_kind = "probs"
    task = "binary"

    def __init__(self, slope=1.0, bias=0.0, kind="probs", **kwargs):
        super().__init__(**kwargs)
        self.slope, self.bias, self.kind = _scalar_or_list(slope), _scalar_or_list(bias), kind

    def call(self, inputs):
        z = canonical(inputs, "binary", self.kind)
        slope, bias = (ops.convert_to_tensor(v, dtype=z.dtype) for v in (self.slope, self.bias))
        return ops.sigmoid(slope * z + bias)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(slope=self.slope, bias=self.bias, kind=self.kind)
        return config


def _scalar_or_list(value):
    """A float, or a list of floats for a per-label value (what ``get_config`` writes back)."""
    if isinstance(value, (list, tuple)) or getattr(value, "ndim", 0):
        return [float(v) for v in value]
    return float(value)


@keras.saving.register_keras_serializable(package=PACKAGE)
class StdScaling(keras.layers.Layer):
    """``s · std``: variance scaling of a regression ensemble's standard deviation.

    Args:
        scale: positive float, fitted by ``ensemblekit.calibrate`` (``task="regression"``).
    """

    task = "regression"

    def __init__(self, scale=1.0, **kwargs):
        super().__init__(**kwargs)
        if not scale > 0:
            raise ValueError(f"scale must be positive, got {scale}.")
        self.scale = float(scale)

    def call(self, inputs):
        return inputs * self.scale

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(scale=self.scale)
        return config


@keras.saving.register_keras_serializable(package=PACKAGE)
class MemberLogProbs(keras.layers.Layer):
    """Concatenate the members' log-probabilities into meta-features for stacking.

    Args:
        kinds: per member, ``"logits"`` or ``"probs"``.
        stack_axis: ``None`` concatenates to ``(batch, K*classes)``; ``1`` stacks
            to ``(batch, K, classes)``.
    """

    def __init__(self, kinds, stack_axis=None, **kwargs):
        super().__init__(**kwargs)
        self.kinds = list(kinds)
        self.stack_axis = stack_axis

    def call(self, inputs):
        log_probs = [to_log_probs(x, kind) for x, kind in zip(inputs, self.kinds)]
        if self.stack_axis is None:
            return ops.concatenate(log_probs, axis=-1)
        return ops.stack(log_probs, axis=self.stack_axis)

    def compute_output_shape(self, input_shape):
        batch, classes = input_shape[0]
        if self.stack_axis is None:
            return (batch, classes * len(self.kinds))
        return (batch, len(self.kinds), classes)

    def get_config(self):
        config = super().get_config()
        config.update(kinds=self.kinds, stack_axis=self.stack_axis)
        return config


@keras.saving.register_keras_serializable(package=PACKAGE)
class PoolFeatures(keras.layers.Layer):
    """Average a feature map over every axis but batch and channels; flatten the rest.

    ``(batch, steps, channels)`` and ``(batch, h, w, channels)`` become
    ``(batch, channels)``; ``(batch, features)`` passes through.
    """

    def call(self, inputs):
        if len(inputs.shape) <= 2:
            return inputs
        return ops.mean(inputs, axis=tuple(range(1, len(inputs.shape) - 1)))

    def compute_output_shape(self, input_shape):
        return (input_shape[0], input_shape[-1])


@keras.saving.register_keras_serializable(package=PACKAGE)
class GatedFusion(keras.layers.Layer):
    """Project each member's features to ``units`` and mix them with learned, input-dependent gates.

    ``h_k = W_k f_k``, ``g = softmax(V [f_1, ..., f_K])``, output ``Σ g_k h_k``.

    Args:
        units: width of the fused feature.
    """

    def __init__(self, units=128, **kwargs):
        super().__init__(**kwargs)
        self.units = int(units)

    def build(self, input_shape):
        if not isinstance(input_shape, (list, tuple)) or not isinstance(input_shape[0], (list, tuple)):
            raise ValueError(f"{self.name}: expects a list of feature tensors, got {input_shape}.")
        self.projections = [
            self.add_weight(shape=(shape[-1], self.units), initializer="glorot_uniform", name=f"projection_{i}")
            for i, shape in enumerate(input_shape)
        ]
        total = sum(int(shape[-1]) for shape in input_shape)
        self.gate_kernel = self.add_weight(
            shape=(total, len(input_shape)), initializer="zeros", name="gate_kernel"
        )
        self.gate_bias = self.add_weight(shape=(len(input_shape),), initializer="zeros", name="gate_bias")

    def call(self, inputs):
        gates = ops.softmax(ops.matmul(ops.concatenate(inputs, axis=-1), self.gate_kernel) + self.gate_bias)
        projected = ops.stack([ops.matmul(f, w) for f, w in zip(inputs, self.projections)], axis=1)
        return ops.sum(projected * ops.expand_dims(gates, -1), axis=1)

    def compute_output_shape(self, input_shape):
        return (input_shape[0][0], self.units)

    def get_config(self):
        config = super().get_config()
        config.update(units=self.units)
        return config


COMBINERS = {
    "mean": MeanProbabilities,
    "weighted": MeanProbabilities,
    "logit_mean": LogitMean,
    "geometric": GeometricMean,
    "vote": MajorityVote,
}
