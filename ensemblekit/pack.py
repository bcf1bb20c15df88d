"""Weight concatenation: K members of one architecture become ONE wide model.

``pack`` rebuilds the members' shared architecture layer by layer (through
``_graph.graph_operations``) with *grouped* layers that hold all K members'
weights stacked on a member axis. Inside the packed model a tensor either has
no member axis (the shared input, before the first weighted layer) or carries
it just before the channel axis: ``(batch, ..., K, channels)``. That layout
makes the member axis free to fold into channels, so

* ``Dense`` becomes ``GroupedDense``: on the shared input one matmul with the
  K kernels concatenated, ``(in, K*units)``; afterwards an einsum over the
  stacked kernel ``(K, in, units)`` (a batched matmul);
* ``Conv1D``/``Conv2D`` become ``GroupedConv``: on the shared input one
  convolution with K*filters output channels; afterwards a grouped
  convolution with ``groups=K`` over ``(..., K*channels)``;
* ``BatchNormalization``/``LayerNormalization`` keep per-member ``(K, c)``
  parameters;
* pooling, padding, cropping and up-sampling run once on the K*channels
  view (``MemberChannels``); activations, dropout and merges (``Add``,
  ``Concatenate``, ...) are carried along unchanged;
* the K member outputs ``(batch, K, classes)`` are reduced by ``PackedOutput``
  exactly as ``ek.ensemble`` reduces them.

The idea is the "wide model" view of ensembles in BatchEnsemble (Wen et al.,
2020, arXiv:2002.06715) without the rank-1 sharing: every member keeps its own
full weights, so the packed model computes the ensemble exactly.

Each grouped layer can run its K members with one grouped op (``"grouped"``)
or a loop of K ops (``"loop"``); ``lowering="auto"`` picks per layer the one
that was faster in ``benchmarks/throughput.py`` (see ``_auto_lowering``).
"""

from __future__ import annotations

import json
import math
import threading

import keras
import numpy as np
from keras import ops

from ensemblekit._graph import (
    check_same_architecture,
    graph_operations,
    iter_layers,
    model_input_shape,
    model_output_shape,
)
from ensemblekit._io import load_members, pad_to_batches
from ensemblekit._validate import check_choice, check_output_kinds, member_label
from ensemblekit.compose import detect_output_kind
from ensemblekit.compose.layers import to_log_probs

PACKAGE = "ensemblekit"
REDUCTIONS = ("mean", "logit_mean", "none")
LOWERINGS = ("auto", "grouped", "loop")


# --------------------------------------------------------------------------- layout helpers


# Set while compile_for_inference traces a model: whether for XLA, and a lowering forced
# by autotune (both read by GroupedDense "auto").
_TRACE_STATE = threading.local()


def _split_members(x, members):
    """``(batch, ..., K*c)`` -> ``(batch, ..., K, c)`` (a free reshape)."""
    shape = [-1 if d is None else int(d) for d in x.shape[:-1]]
    return ops.reshape(x, shape + [members, int(x.shape[-1]) // members])


def _merge_members(x):
    """``(batch, ..., K, c)`` -> ``(batch, ..., K*c)`` (a free reshape)."""
    shape = [-1 if d is None else int(d) for d in x.shape[:-2]]
    return ops.reshape(x, shape + [int(x.shape[-2]) * int(x.shape[-1])])


class _MemberLayer(keras.layers.Layer):
    """Base of the grouped layers: K members, input with or without the member axis.

    Args:
        members: K, the number of packed members.
        shared_input: True when the input has no member axis (the shared model
            input); the output always has one.
        lowering: ``"grouped"`` (one grouped op) or ``"loop"`` (K ops).
    """

    def __init__(self, members, shared_input=False, lowering="grouped", **kwargs):
        super().__init__(**kwargs)
        self.members = int(members)
        self.shared_input = bool(shared_input)
        self.lowering = check_choice(lowering, LOWERINGS, "lowering")

    def _check_input(self, input_shape):
        if not self.shared_input and (len(input_shape) < 3 or input_shape[-2] != self.members):
            raise ValueError(
                f"{self.name}: expects input (batch, ..., {self.members}, channels) with the "
                f"member axis before the channels; got {tuple(input_shape)}."
            )

    def member_weights(self, index):
        """Member ``index``'s weights, in the order of the original layer's ``get_weights()``."""
        raise NotImplementedError

    def get_config(self):
        config = super().get_config()
        config.update(members=self.members, shared_input=self.shared_input, lowering=self.lowering)
        return config

    def macs_per_sample(self):
        """Multiply-accumulates per sample: every kernel element is used once per output position."""
        kernel = getattr(self, "kernel", None)
        if kernel is None:
            return 0
        positions = math.prod(int(d) for d in self.output.shape[1:-2])
        return math.prod(int(d) for d in kernel.shape) * positions


@keras.saving.register_keras_serializable(package=PACKAGE)
class GroupedDense(_MemberLayer):
    """K ``Dense`` layers in one: ``y[..., k, :] = act(x[..., k, :] @ W_k + b_k)``.

    On the shared input the kernel is stored ``(in, K, units)`` and applied as one
    matmul ``(in, K*units)``; on member-axis input it is stored ``(K, in, units)``
    and applied with ``einsum("...ki,kio->...ko")`` (or K matmuls with ``"loop"``).

    Args:
        units: output features per member.
        activation: the members' activation.
        use_bias: whether the members have a bias.

    Example:
        >>> import numpy as np
        >>> layer = GroupedDense(3, members=2, shared_input=True)
        >>> tuple(layer(np.ones((4, 5), "float32")).shape)
        (4, 2, 3)
    """

    def __init__(self, units, members, activation=None, use_bias=True, **kwargs):
        super().__init__(members, **kwargs)
        self.units = int(units)
        self.activation = keras.activations.get(activation)
        self.use_bias = bool(use_bias)

    def build(self, input_shape):
        self._check_input(input_shape)
        features = int(input_shape[-1])
        shape = (features, self.members, self.units) if self.shared_input else (
            self.members, features, self.units)
        self.kernel = self.add_weight(shape=shape, initializer="glorot_uniform", name="kernel")
        self.bias = self.add_weight(
            shape=(self.members, self.units), initializer="zeros", name="bias"
        ) if self.use_bias else None

    def call(self, inputs):
        if self.shared_input:
            flat = ops.reshape(self.kernel, (self.kernel.shape[0], self.members * self.units))
            outputs = _split_members(ops.matmul(inputs, flat), self.members)
        elif self._use_loop(inputs):
            outputs = ops.stack(
                [ops.matmul(inputs[..., k, :], self.kernel[k]) for k in range(self.members)], axis=-2
            )
        else:
            # Explicit subscripts: TF's einsum runs "...ki,kio->...ko" about 2x slower.
            lead = "abcdefgh"[:len(inputs.shape) - 2]
            outputs = ops.einsum(f"{lead}ki,kio->{lead}ko", inputs, self.kernel)
        if self.use_bias:
            outputs = outputs + self.bias
        return self.activation(outputs)

    def _use_loop(self, inputs):
        """``"auto"``: K matmuls once the rows per member are known to be many (see ``LOOP_ROWS``).

        Not while ``compile_for_inference`` traces for XLA: there the one einsum
        measured as fast or faster at every batch size (pack_grouped_xla vs
        pack_loop_xla in benchmarks/throughput.py).
        """
        if self.lowering != "auto":
            return self.lowering == "loop"
        forced = getattr(_TRACE_STATE, "lowering", None)
        if forced is not None:  # compile_for_inference(autotune=True) is timing both
            return forced == "loop"
        if getattr(_TRACE_STATE, "xla", False):
            return False
        rows = inputs.shape[:-2]
        return all(d is not None for d in rows) and math.prod(rows) >= self.LOOP_ROWS

    # On TF CPU one einsum wins at small batches (fewer ops) while K matmuls win from
    # about 128 rows per member (TF's batched matmul is slower than K plain ones);
    # measured in benchmarks/throughput.py. Unknown batch sizes use the einsum.
    LOOP_ROWS = 128

    def compute_output_shape(self, input_shape):
        lead = tuple(input_shape[:-1]) if self.shared_input else tuple(input_shape[:-2])
        return (*lead, self.members, self.units)

    def member_weights(self, index):
        kernel = keras.ops.convert_to_numpy(self.kernel)
        kernel = kernel[:, index] if self.shared_input else kernel[index]
        if not self.use_bias:
            return [kernel]
        return [kernel, keras.ops.convert_to_numpy(self.bias)[index]]

    def get_config(self):
        config = super().get_config()
        config.update(units=self.units, activation=keras.activations.serialize(self.activation),
                      use_bias=self.use_bias)
        return config


@keras.saving.register_keras_serializable(package=PACKAGE)
class GroupedConv(_MemberLayer):
    """K ``Conv1D``/``Conv2D`` layers in one (channels last).

    The kernel is stored ``(*kernel_size, in, K*filters)``: member k owns output
    channels ``k*filters:(k+1)*filters``. On the shared input that is one
    ordinary convolution; on member-axis input ``(..., K, in)`` it is a grouped
    convolution (``groups=K``) over the ``(..., K*in)`` view, or K convolutions
    with ``lowering="loop"``.

    Args:
        rank: 1 or 2.
        filters, kernel_size, strides, padding, dilation_rate, activation,
            use_bias: as in the members' ``Conv1D``/``Conv2D``.

    Example:
        >>> import numpy as np
        >>> layer = GroupedConv(1, 4, 3, members=2, padding="same", shared_input=True)
        >>> tuple(layer(np.ones((1, 10, 1), "float32")).shape)
        (1, 10, 2, 4)
    """

    def __init__(self, rank, filters, kernel_size, members, strides=1, padding="valid",
                 dilation_rate=1, activation=None, use_bias=True, **kwargs):
        super().__init__(members, **kwargs)
        self.rank = int(rank)
        self.filters = int(filters)
        self.kernel_size = _tuple(kernel_size, self.rank)
        self.strides = _tuple(strides, self.rank)
        self.padding = padding
        self.dilation_rate = _tuple(dilation_rate, self.rank)
        self.activation = keras.activations.get(activation)
        self.use_bias = bool(use_bias)

    def build(self, input_shape):
        self._check_input(input_shape)
        if len(input_shape) != self.rank + 2 + (0 if self.shared_input else 1):
            raise ValueError(f"{self.name}: a {self.rank}D convolution cannot take input {tuple(input_shape)}.")
        channels = int(input_shape[-1])
        self.kernel = self.add_weight(
            shape=(*self.kernel_size, channels, self.members * self.filters),
            initializer="glorot_uniform", name="kernel",
        )
        self.bias = self.add_weight(
            shape=(self.members * self.filters,), initializer="zeros", name="bias"
        ) if self.use_bias else None

    def _conv(self, x, kernel):
        return ops.conv(x, kernel, strides=self.strides, padding=self.padding,
                        dilation_rate=self.dilation_rate)

    def call(self, inputs):
        if self.shared_input:
            outputs = self._conv(inputs, self.kernel)
        elif self.lowering == "loop":
            outputs = ops.concatenate([
                self._conv(inputs[..., k, :], self.kernel[..., k * self.filters:(k + 1) * self.filters])
                for k in range(self.members)
            ], axis=-1)
        else:
            outputs = self._conv(_merge_members(inputs), self.kernel)
        if self.use_bias:
            outputs = outputs + self.bias
        return self.activation(_split_members(outputs, self.members))

    def compute_output_shape(self, input_shape):
        spatial_in = input_shape[1:1 + self.rank]
        spatial = []
        for size, k, s, d in zip(spatial_in, self.kernel_size, self.strides, self.dilation_rate, strict=True):
            if size is None:
                spatial.append(None)
            elif self.padding == "same":
                spatial.append(math.ceil(size / s))
            else:
                spatial.append((size - d * (k - 1) - 1) // s + 1)
        return (input_shape[0], *spatial, self.members, self.filters)

    def member_weights(self, index):
        kernel = keras.ops.convert_to_numpy(self.kernel)[..., index * self.filters:(index + 1) * self.filters]
        if not self.use_bias:
            return [kernel]
        return [kernel, keras.ops.convert_to_numpy(self.bias)[index * self.filters:(index + 1) * self.filters]]

    def get_config(self):
        config = super().get_config()
        config.update(
            rank=self.rank, filters=self.filters, kernel_size=self.kernel_size, strides=self.strides,
            padding=self.padding, dilation_rate=self.dilation_rate,
            activation=keras.activations.serialize(self.activation), use_bias=self.use_bias,
        )
        return config


class _GroupedNormalization(_MemberLayer):
    """Shared parts of the grouped normalizations: per-member ``(K, c)`` parameters."""

    PARAMS = ()

    def __init__(self, members, epsilon=1e-3, center=True, scale=True, **kwargs):
        super().__init__(members, **kwargs)
        self.epsilon = float(epsilon)
        self.center = bool(center)
        self.scale = bool(scale)

    def build(self, input_shape):
        self._check_input(input_shape)
        shape = (self.members, int(input_shape[-1]))
        for name, initializer in self.PARAMS:
            if (name == "gamma" and not self.scale) or (name == "beta" and not self.center):
                setattr(self, name, None)
                continue
            trainable = not name.startswith("moving")
            setattr(self, name, self.add_weight(shape=shape, initializer=initializer, name=name,
                                                trainable=trainable))

    def _with_member_axis(self, inputs):
        if self.shared_input:
            return ops.expand_dims(inputs, -2)  # broadcasts against the (K, c) parameters
        return inputs

    def _affine(self, normalized):
        if self.scale:
            normalized = normalized * self.gamma
        if self.center:
            normalized = normalized + self.beta
        return normalized

    def compute_output_shape(self, input_shape):
        if self.shared_input:
            return (*input_shape[:-1], self.members, input_shape[-1])
        return tuple(input_shape)

    def member_weights(self, index):
        return [keras.ops.convert_to_numpy(getattr(self, name))[index]
                for name, _ in self.PARAMS if getattr(self, name) is not None]

    def get_config(self):
        config = super().get_config()
        config.update(epsilon=self.epsilon, center=self.center, scale=self.scale)
        return config


@keras.saving.register_keras_serializable(package=PACKAGE)
class GroupedBatchNormalization(_GroupedNormalization):
    """K inference-mode ``BatchNormalization`` layers (last axis) with ``(K, c)`` statistics.

    The packed model is an inference artefact: it always normalizes with the
    members' moving statistics, as the members do under ``predict``.

    Example:
        >>> import numpy as np
        >>> tuple(GroupedBatchNormalization(members=2)(np.ones((3, 2, 4), "float32")).shape)
        (3, 2, 4)
    """

    PARAMS = (("gamma", "ones"), ("beta", "zeros"), ("moving_mean", "zeros"),
              ("moving_variance", "ones"))

    def call(self, inputs):
        x = self._with_member_axis(inputs)
        return self._affine((x - self.moving_mean) * ops.rsqrt(self.moving_variance + self.epsilon))


@keras.saving.register_keras_serializable(package=PACKAGE)
class GroupedLayerNormalization(_GroupedNormalization):
    """K ``LayerNormalization`` layers (last axis) with ``(K, c)`` scale and offset.

    Args:
        rms_scaling: as in ``keras.layers.LayerNormalization``.

    Example:
        >>> import numpy as np
        >>> tuple(GroupedLayerNormalization(members=2)(np.ones((3, 2, 4), "float32")).shape)
        (3, 2, 4)
    """

    PARAMS = (("gamma", "ones"), ("beta", "zeros"))

    def __init__(self, members, rms_scaling=False, **kwargs):
        super().__init__(members, **kwargs)
        self.rms_scaling = bool(rms_scaling)

    def call(self, inputs):
        x = self._with_member_axis(inputs)
        if self.rms_scaling:
            normalized = x * ops.rsqrt(ops.mean(ops.square(x), axis=-1, keepdims=True) + self.epsilon)
            return normalized * self.gamma if self.scale else normalized
        mean, variance = ops.moments(x, axes=[-1], keepdims=True)
        return self._affine((x - mean) * ops.rsqrt(variance + self.epsilon))

    def get_config(self):
        config = super().get_config()
        config.update(rms_scaling=self.rms_scaling)
        return config


@keras.saving.register_keras_serializable(package=PACKAGE)
class MemberChannels(keras.layers.Wrapper):
    """Run a per-channel layer (pooling, padding, ...) once on all K members.

    ``(batch, ..., K, c)`` is viewed as ``(batch, ..., K*c)``, the wrapped
    channels-last layer runs on it, and the result is split back.

    Example:
        >>> import numpy as np
        >>> tuple(MemberChannels(keras.layers.MaxPooling1D(2), members=3)(np.ones((1, 8, 3, 4), "float32")).shape)
        (1, 4, 3, 4)
    """

    def __init__(self, layer, members, **kwargs):
        super().__init__(layer, **kwargs)
        self.members = int(members)

    def build(self, input_shape):
        self.layer.build(self._merged_shape(input_shape))
        self.built = True

    @staticmethod
    def _merged_shape(shape):
        channels = None if shape[-1] is None else shape[-2] * shape[-1]
        return (*shape[:-2], channels)

    def call(self, inputs):
        return _split_members(self.layer(_merge_members(inputs)), self.members)

    def compute_output_shape(self, input_shape):
        shape = self.layer.compute_output_shape(self._merged_shape(input_shape))
        return (*shape[:-1], self.members, input_shape[-1])

    def get_config(self):
        config = super().get_config()
        config.update(members=self.members)
        return config


@keras.saving.register_keras_serializable(package=PACKAGE)
class MemberFlatten(keras.layers.Layer):
    """``Flatten`` per member: ``(batch, ..., K, c)`` -> ``(batch, K, prod(...)*c)``.

    Example:
        >>> import numpy as np
        >>> tuple(MemberFlatten()(np.ones((2, 5, 3, 4), "float32")).shape)
        (2, 3, 20)
    """

    def call(self, inputs):
        rank = len(inputs.shape)
        if rank == 3:
            return inputs
        order = [0, rank - 2, *range(1, rank - 2), rank - 1]
        moved = ops.transpose(inputs, order)
        return ops.reshape(moved, (-1, int(inputs.shape[-2]), self._features(inputs.shape)))

    @staticmethod
    def _features(shape):
        return int(np.prod([shape[i] for i in range(1, len(shape)) if i != len(shape) - 2]))

    def compute_output_shape(self, input_shape):
        return (input_shape[0], input_shape[-2], self._features(input_shape))


@keras.saving.register_keras_serializable(package=PACKAGE)
class MemberBroadcast(keras.layers.Layer):
    """Give a tensor without member axis one: ``(batch, ..., c)`` -> ``(batch, ..., K, c)``.

    Example:
        >>> import numpy as np
        >>> tuple(MemberBroadcast(members=3)(np.ones((2, 4), "float32")).shape)
        (2, 3, 4)
    """

    def __init__(self, members, **kwargs):
        super().__init__(**kwargs)
        self.members = int(members)

    def call(self, inputs):
        return ops.repeat(ops.expand_dims(inputs, -2), self.members, axis=-2)

    def compute_output_shape(self, input_shape):
        return (*input_shape[:-1], self.members, input_shape[-1])

    def get_config(self):
        config = super().get_config()
        config.update(members=self.members)
        return config


@keras.saving.register_keras_serializable(package=PACKAGE)
class PackedOutput(keras.layers.Layer):
    """Reduce the K member outputs ``(batch, K, classes)`` like ``ek.ensemble``.

    Also the record that lets ``unpack`` give the members back: their
    architectures (``member_configs``) and which packed layer holds which
    member layer's weights (``weighted_layers``).

    Args:
        reduce: ``"mean"`` (mean of probabilities), ``"logit_mean"`` (softmax of
            the mean log-probabilities) or ``"none"`` (the members' raw outputs).
        kind: what the members output, ``"logits"`` or ``"probs"``.
        member_configs: the members' serialized architectures, as JSON strings
            (Keras would re-interpret nested model configs kept as dicts).
        weighted_layers: packed layer names, in the members' weighted-layer order.
    """

    def __init__(self, reduce="mean", kind="probs", member_configs=(), weighted_layers=(), **kwargs):
        super().__init__(**kwargs)
        self.reduce = check_choice(reduce, REDUCTIONS, "reduce")
        self.kind = kind
        self.member_configs = list(member_configs)
        self.weighted_layers = list(weighted_layers)

    @property
    def output_kind(self):
        """What the packed model outputs: probabilities once reduced, else the members' kind."""
        return self.kind if self.reduce == "none" else "probs"

    def call(self, inputs):
        if self.reduce == "none":
            return inputs
        log_probs = to_log_probs(inputs, self.kind)
        if self.reduce == "mean":
            return ops.mean(ops.exp(log_probs), axis=1)
        return ops.softmax(ops.mean(log_probs, axis=1), axis=-1)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape) if self.reduce == "none" else (input_shape[0], input_shape[-1])

    def get_config(self):
        config = super().get_config()
        config.update(reduce=self.reduce, kind=self.kind, member_configs=self.member_configs,
                      weighted_layers=self.weighted_layers)
        return config


def _tuple(value, rank):
    return tuple(int(v) for v in value) if isinstance(value, (list, tuple)) else (int(value),) * rank


# --------------------------------------------------------------------------- packing

L = keras.layers
_ELEMENTWISE = (L.Activation, L.ReLU, L.LeakyReLU, L.ELU, L.Softmax, L.Dropout, L.GaussianNoise,
                L.GaussianDropout, L.AlphaDropout, L.Identity)
_SPATIAL_DROPOUT = (L.SpatialDropout1D, L.SpatialDropout2D)
_MERGES = (L.Add, L.Subtract, L.Multiply, L.Average, L.Maximum, L.Minimum)
_CHANNELWISE = (L.MaxPooling1D, L.MaxPooling2D, L.AveragePooling1D, L.AveragePooling2D,
                L.GlobalAveragePooling1D, L.GlobalAveragePooling2D, L.GlobalMaxPooling1D,
                L.GlobalMaxPooling2D, L.ZeroPadding1D, L.ZeroPadding2D, L.Cropping1D, L.Cropping2D,
                L.UpSampling1D, L.UpSampling2D)
_SUPPORTED = ("Dense, Conv1D, Conv2D, BatchNormalization, LayerNormalization, Flatten, "
              "Concatenate, Add/Subtract/Multiply/Average/Maximum/Minimum, activations, dropout, "
              "pooling, padding, cropping, up-sampling")
# Config keys that do not change what a layer computes at inference.
_IGNORED_CONFIG = ("name", "trainable", "dtype", "seed", "rate", "stddev", "noise_shape", "momentum")


def pack(models, reduce="mean", outputs=None, lowering="auto", name=None, safe_mode=True):
    """Pack K members of one architecture into ONE model with grouped layers.

    The packed model computes every member exactly (up to float rounding) in
    one wide graph, so it replaces ``ek.ensemble`` where the members share an
    architecture and throughput matters. See the module docstring for the layout.

    Args:
        models: list of ``keras.Model`` (Sequential or functional, incl. residual
            ``Add``/``Concatenate``) or paths to ``.keras``/``.h5`` files, all of one
            architecture, one input, ``(batch, classes)`` output.
        reduce: ``"mean"`` (mean of probabilities, as ``ek.ensemble(models, "mean")``),
            ``"logit_mean"`` (as ``ek.ensemble(models, "logit_mean")``) or ``"none"``
            (the members' outputs, ``(batch, K, classes)``).
        outputs: what the members output: ``None`` detects a final softmax, or
            ``"logits"``/``"probs"``.
        lowering: ``"auto"`` (per layer, the lowering measured faster), ``"grouped"``
            (one einsum / grouped convolution per layer) or ``"loop"`` (K ops per layer).
        name: name of the packed model (default ``"packed_<reduce>"``).
        safe_mode: used when loading members from files.

    Returns:
        A ``keras.Model`` from the shared input to the reduced output; save it as
        ``.keras`` and load it in ``safe_mode``; ``unpack`` gives the members back.

    Raises:
        ValueError: the members differ in architecture, or a layer is not supported
            (the message names the member and the layer).

    Limitations: the packed model is for inference (BatchNormalization uses the
    moving statistics); layers must be channels-last; nested models and layers
    called twice inside one member are not supported.

    Example:
        >>> import keras, numpy as np
        >>> import ensemblekit as ek
        >>> members = [keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, activation="relu"),
        ...                              keras.layers.Dense(3)]) for _ in range(3)]
        >>> packed = pack(members, reduce="mean")
        >>> x = np.random.default_rng(0).normal(size=(5, 4)).astype("float32")
        >>> bool(np.allclose(packed.predict(x, verbose=0), ek.ensemble(members).predict(x, verbose=0), atol=1e-5))
        True
    """
    check_choice(reduce, REDUCTIONS, "reduce")
    check_choice(lowering, LOWERINGS, "lowering")
    models = load_members(models, min_count=2, what="pack", safe_mode=safe_mode)
    labels = [member_label(i, m) for i, m in enumerate(models)]
    check_same_architecture(models, labels)
    graphs = [_member_graph(model, label) for model, label in zip(models, labels, strict=True)]
    _check_same_layers(graphs, labels)
    kind = check_output_kinds(outputs, len(models))[0] or detect_output_kind(models[0])

    members = len(models)
    tensors, weighted = {}, []
    for position, (layer, parents) in enumerate(graphs[0]):
        if isinstance(layer, L.InputLayer):
            inputs = keras.Input(model_input_shape(models[0]), name=layer.name)
            tensors[layer.name] = (inputs, False)
            continue
        layer_inputs = [tensors[parent.name] for parent in parents]
        packed_layer = _packed_layer(layer, layer_inputs, members, lowering, labels[0])
        tensors[layer.name] = _apply(packed_layer, layer, layer_inputs, members)
        if layer.weights:
            packed_layer.set_weights(_stack_weights([g[position][0] for g in graphs], packed_layer))
            weighted.append(layer.name)

    output, has_members = tensors[graphs[0][-1][0].name]
    if not has_members:
        output = MemberBroadcast(members, name="member_broadcast_output")(output)
    member_configs = [json.dumps(keras.saving.serialize_keras_object(m)) for m in models]
    reducer = PackedOutput(reduce, kind, member_configs, weighted, name=f"packed_output_{reduce}")
    return keras.Model(inputs, reducer(output), name=name or f"packed_{reduce}")


def _member_graph(model, label):
    try:
        graph = graph_operations(model)
        model_output_shape(model)
    except ValueError as error:
        raise ValueError(f"pack: {label}: {error}") from None
    if len(model_output_shape(model)) != 1:
        raise ValueError(
            f"pack: {label} outputs shape {(None, *model_output_shape(model))}; members must be "
            "classifiers with output (batch, classes)."
        )
    for layer, _ in graph:
        if isinstance(layer, keras.Model):
            raise ValueError(
                f"pack: {label}, layer {layer.name!r} is a nested model ({type(layer).__name__}); "
                "pack members whose layers are not nested models."
            )
    return graph


def _semantic_config(layer):
    config = layer.get_config()
    return {key: value for key, value in config.items() if key not in _IGNORED_CONFIG
            and not key.endswith(("_initializer", "_regularizer", "_constraint"))}


def _check_same_layers(graphs, labels):
    reference = graphs[0]
    for label, graph in zip(labels[1:], graphs[1:], strict=True):
        if len(graph) != len(reference):
            raise ValueError(
                f"pack: {label} has {len(graph)} layers but {labels[0]} has {len(reference)}."
            )
        for (layer0, parents0), (layer, parents) in zip(reference, graph, strict=True):
            where = f"{label}, layer {layer.name!r} ({type(layer).__name__})"
            if type(layer) is not type(layer0) or _semantic_config(layer) != _semantic_config(layer0):
                raise ValueError(
                    f"pack: {where} differs from {labels[0]}'s layer {layer0.name!r} "
                    f"({type(layer0).__name__}): {_config_diff(layer0, layer)}."
                )
            if [graph.index(next(op for op in graph if op[0] is p)) for p in parents] != [
                    reference.index(next(op for op in reference if op[0] is p)) for p in parents0]:
                raise ValueError(f"pack: {where} is wired to different inputs than in {labels[0]}.")


def _config_diff(layer0, layer):
    if type(layer) is not type(layer0):
        return "different layer types"
    config0, config = _semantic_config(layer0), _semantic_config(layer)
    keys = sorted(k for k in set(config0) | set(config) if config0.get(k) != config.get(k))
    return ", ".join(f"{k}={config.get(k)!r} vs {config0.get(k)!r}" for k in keys)


def _unsupported(layer, label, reason=None):
    return ValueError(
        f"pack: {label}, layer {layer.name!r} ({type(layer).__name__}) "
        + (reason or f"is not supported; pack supports {_SUPPORTED}") + "."
    )


def _packed_layer(layer, layer_inputs, members, lowering, label):
    """The packed counterpart of member layer ``layer`` (all members' configs are equal)."""
    shared = not any(has_members for _, has_members in layer_inputs)
    config = layer.get_config()
    common = dict(members=members, shared_input=shared, name=layer.name)
    if getattr(layer, "data_format", "channels_last") != "channels_last":
        raise _unsupported(layer, label, "uses data_format='channels_first'; pack needs channels_last")
    if type(layer) is L.Dense:
        in_features = int(layer_inputs[0][0].shape[-1])
        return GroupedDense(config["units"], activation=config["activation"], use_bias=config["use_bias"],
                            lowering=_lowering(lowering, "dense", members, in_features, config["units"]),
                            **common)
    if type(layer) in (L.Conv1D, L.Conv2D):
        if config.get("groups", 1) != 1 or config["padding"] == "causal":
            raise _unsupported(layer, label, "uses groups != 1 or causal padding; pack needs groups=1 "
                                             "and 'valid'/'same' padding")
        rank = 1 if type(layer) is L.Conv1D else 2
        return GroupedConv(rank, config["filters"], config["kernel_size"], strides=config["strides"],
                           padding=config["padding"], dilation_rate=config["dilation_rate"],
                           activation=config["activation"], use_bias=config["use_bias"],
                           lowering=_lowering(lowering, "conv", members, 0, config["filters"]), **common)
    if type(layer) in (L.BatchNormalization, L.LayerNormalization):
        rank = len(layer_inputs[0][0].shape) - (0 if shared else 1)
        axis = config["axis"] if isinstance(config["axis"], int) else (
            config["axis"][0] if len(config["axis"]) == 1 else None)
        if axis not in (-1, rank - 1) or config.get("renorm") or config.get("synchronized"):
            raise _unsupported(layer, label, f"normalizes axis {config['axis']!r}; pack supports the "
                                             "last (channel) axis only, without renorm")
        norm = dict(epsilon=config["epsilon"], center=config["center"], scale=config["scale"], **common)
        if type(layer) is L.BatchNormalization:
            return GroupedBatchNormalization(**norm)
        return GroupedLayerNormalization(rms_scaling=config.get("rms_scaling", False), **norm)
    if layer.weights:
        raise _unsupported(layer, label)
    carried = type(layer).from_config(config)
    if shared:
        return carried
    if isinstance(layer, L.Softmax) and config.get("axis", -1) not in (-1, [-1]):
        raise _unsupported(layer, label, "uses an axis other than -1")
    if isinstance(layer, _ELEMENTWISE + _MERGES):
        return carried
    if isinstance(layer, _SPATIAL_DROPOUT):
        return L.Identity(name=layer.name)
    if isinstance(layer, L.Concatenate):
        rank = len(layer_inputs[0][0].shape) - (1 if layer_inputs[0][1] else 0)
        axis = config["axis"] % rank
        return L.Concatenate(axis=-1 if axis == rank - 1 else axis, name=layer.name)
    if isinstance(layer, L.Flatten):
        return MemberFlatten(name=layer.name)
    if isinstance(layer, _CHANNELWISE):
        return MemberChannels(carried, members=members, name=layer.name)
    raise _unsupported(layer, label)


def _apply(packed_layer, layer, layer_inputs, members):
    """Call ``packed_layer``; broadcast shared inputs of merges that also see member tensors."""
    has_members = [flag for _, flag in layer_inputs]
    tensors = [tensor for tensor, _ in layer_inputs]
    if any(has_members) and not all(has_members):
        tensors = [t if flag else MemberBroadcast(members, name=f"{layer.name}_broadcast_{i}")(t)
                   for i, (t, flag) in enumerate(zip(tensors, has_members, strict=True))]
    output = packed_layer(tensors if len(tensors) > 1 else tensors[0])
    return output, isinstance(packed_layer, _MemberLayer) or any(has_members)


def _stack_weights(layers, packed_layer):
    """The K members' weights of one layer, stacked into ``packed_layer``'s variables."""
    per_member = [layer.get_weights() for layer in layers]
    stacked = []
    for position, variable in enumerate(packed_layer.weights):
        arrays = [weights[position] for weights in per_member]
        if isinstance(packed_layer, GroupedConv):
            stacked.append(np.concatenate(arrays, axis=-1))
        elif isinstance(packed_layer, GroupedDense) and packed_layer.shared_input and position == 0:
            stacked.append(np.stack(arrays, axis=1))
        else:
            stacked.append(np.stack(arrays, axis=0))
        if stacked[-1].shape != tuple(variable.shape):
            raise ValueError(
                f"pack: layer {packed_layer.name!r}: stacked weight {variable.name!r} has shape "
                f"{stacked[-1].shape}, expected {tuple(variable.shape)}."
            )
    return stacked


def _lowering(lowering, kind, members, in_features, out_features):
    return _auto_lowering(kind, members, in_features, out_features) if lowering == "auto" else lowering


def _auto_lowering(kind, members, in_features, out_features):
    """The lowering that measured faster for this layer kind (benchmarks/throughput.py).

    Measured on a 2-core CPU with TF 2.21 (benchmarks/results/throughput.md):
    Dense on member-axis input is faster as one einsum over the stacked kernel
    at small batches and as K matmuls at large ones, so ``GroupedDense`` decides
    per traced shape (``"auto"``, see ``GroupedDense.LOOP_ROWS``); Conv1D/Conv2D
    are faster as K convolutions than as one ``groups=K`` convolution, whose
    TF CPU kernel is slower than K plain oneDNN convolutions.
    """
    return "auto" if kind == "dense" else "loop"


def unpack(packed):
    """Give back the K members of a packed model, with exactly their weights.

    Args:
        packed: a model returned by ``pack`` (or loaded from its ``.keras`` file).

    Returns:
        A list of K ``keras.Model``, each with its original architecture and name.

    Example:
        >>> import keras, numpy as np
        >>> members = [keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)]) for _ in range(2)]
        >>> back = unpack(pack(members))
        >>> all(np.array_equal(a, b) for a, b in zip(back[1].get_weights(), members[1].get_weights()))
        True
    """
    if not isinstance(packed, keras.Model):
        raise TypeError(f"unpack expects a keras.Model made by pack, got {type(packed).__name__}.")
    records = [layer for layer in packed.layers if isinstance(layer, PackedOutput)]
    if len(records) != 1:
        raise ValueError(f"Model {packed.name!r} was not made by ek.pack (it has no PackedOutput layer).")
    record = records[0]
    members = []
    for index, config in enumerate(record.member_configs):
        member = keras.saving.deserialize_keras_object(json.loads(config))
        weighted = [layer for layer, _ in graph_operations(member) if layer.weights]
        for layer, packed_name in zip(weighted, record.weighted_layers, strict=True):
            layer.set_weights(packed.get_layer(packed_name).member_weights(index))
        members.append(member)
    return members


# --------------------------------------------------------------------------- compiled inference


class InferenceFunction:
    """``model`` as one compiled call: ``f(x)`` returns the model's output (numpy).

    Made by ``compile_for_inference``; ``fn`` is the backend-compiled function
    (``tf.function`` or ``jax.jit``) for callers that want backend tensors.
    ``lowerings_`` maps each input shape that was autotuned to the grouped-dense
    lowering that measured faster for it (``"grouped"`` or ``"loop"``).
    """

    def __init__(self, model, fn, jit_compile, to_numpy=keras.ops.convert_to_numpy, lowerings=None):
        self.model = model
        self.fn = fn
        self.jit_compile = jit_compile
        self._to_numpy = to_numpy
        self.lowerings_ = {} if lowerings is None else lowerings

    def __call__(self, x):
        return self._to_numpy(self.fn(x))

    def predict(self, x, batch_size=256):
        """Run on ``x`` in batches of ``batch_size``; return numpy.

        The last batch is padded to ``batch_size`` rows (their outputs dropped),
        so one compiled shape serves any length of ``x``.
        """
        x, rows = pad_to_batches(x, batch_size)
        return np.concatenate([self(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])[:rows]


def compile_for_inference(model, jit_compile=True, autotune=True):
    """Return a callable that runs ``model`` (e.g. ``ek.ensemble``, ``ek.pack``) as one compiled call.

    On TensorFlow the model is traced once per input shape and dtype into a
    concrete function that later calls run directly (with ``jit_compile=True``:
    one XLA cluster); on JAX it is
    ``jax.jit`` of ``model.stateless_call``; on other backends it is the plain call.

    Packed models (``ek.pack(..., lowering="auto")``) can lower their grouped
    Dense layers as one einsum or as K matmuls, and which is faster depends on
    the batch size, XLA and the machine (benchmarks/throughput.py measured both
    orders on the same CPU on different days). With ``autotune=True`` the first
    call with a new input shape compiles both, times them round-robin on that
    input and keeps the faster one (recorded in ``f.lowerings_``).

    Args:
        model: any built ``keras.Model`` with one input.
        jit_compile: compile with XLA (TensorFlow); JAX always compiles.
        autotune: time both grouped-dense lowerings per input shape (only for
            models with ``lowering="auto"`` grouped Dense layers).

    Returns:
        An ``InferenceFunction``: ``f(x)`` returns the output as numpy, ``f.fn(x)``
        the backend tensor, ``f.predict(x, batch_size)`` runs in batches.

    Example:
        >>> import keras, numpy as np
        >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
        >>> f = compile_for_inference(model)
        >>> x = np.ones((2, 4), "float32")
        >>> bool(np.allclose(f(x), model.predict(x, verbose=0), atol=1e-6))
        True
    """
    if not isinstance(model, keras.Model):
        raise TypeError(f"compile_for_inference expects a keras.Model, got {type(model).__name__}.")
    if not model.built or not getattr(model, "inputs", None):
        raise ValueError(f"Model {model.name!r} is not built; give it a keras.Input or call it once first.")
    backend = keras.backend.backend()
    lowerings = {}
    tune = autotune and any(isinstance(layer, GroupedDense) and layer.lowering == "auto"
                            for _, layer in iter_layers(model))
    if backend == "tensorflow":
        import tensorflow as tf

        fn = _shape_dispatch(_tf_compiler(model, jit_compile), tf.convert_to_tensor,
                             lowerings if tune else None)
        return InferenceFunction(model, fn, jit_compile, to_numpy=_to_numpy, lowerings=lowerings)
    if backend == "jax":
        import jax.numpy as jnp

        fn = _shape_dispatch(_jax_compiler(model), jnp.asarray, lowerings if tune else None)
        return InferenceFunction(model, fn, jit_compile, to_numpy=_to_numpy, lowerings=lowerings)

    def fn(x):
        return model(x, training=False)

    return InferenceFunction(model, fn, jit_compile)


def _shape_dispatch(compile_for_shape, convert, lowerings=None):
    """``fn(x)``: one compiled call per input shape and dtype, made on first use.

    Calling a ``tf.function`` costs a signature match (and, with numpy input,
    a retracing check) on every call, and even a concrete function binds its
    arguments to the signature again: at small batches that Python overhead was
    most of the time per call (benchmarks/throughput.py). Here each input shape
    and dtype is compiled once by ``compile_for_shape(lowering, x)`` and later
    calls go straight to it; static shapes also let ``GroupedDense(lowering="auto")``
    pick its lowering per batch size. When ``lowerings`` is a dict, both grouped-
    dense lowerings are compiled, timed on the first input, and the faster kept.
    """
    candidates = (None,) if lowerings is None else ("grouped", "loop")
    compiled = {}

    def fn(x):
        x = convert(x)
        key = (tuple(x.shape), str(x.dtype))
        call = compiled.get(key)
        if call is None:
            calls = {lowering: compile_for_shape(lowering, x) for lowering in candidates}
            choice = None if lowerings is None else _fastest(calls, x)
            if lowerings is not None:
                lowerings[key[0]] = choice
            call = compiled[key] = calls[choice]
        return call(x)

    return fn


class _Tracing:
    """While tracing: tell GroupedDense "auto" whether XLA compiles and which lowering is forced."""

    def __init__(self, xla, lowering):
        self.xla, self.lowering = bool(xla), lowering

    def __enter__(self):
        _TRACE_STATE.xla, _TRACE_STATE.lowering = self.xla, self.lowering

    def __exit__(self, *exc):
        _TRACE_STATE.xla, _TRACE_STATE.lowering = False, None


def _tf_compiler(model, jit_compile):
    """``compile_for_shape`` on TF: a concrete function per shape, called without re-binding."""
    import tensorflow as tf

    def compile_for_shape(lowering, x):
        traced = tf.function(lambda t: model(t, training=False), jit_compile=bool(jit_compile))
        with _Tracing(jit_compile, lowering):
            return _direct_call(traced.get_concrete_function(tf.TensorSpec(x.shape, x.dtype)))

    return compile_for_shape


def _jax_compiler(model):
    """``compile_for_shape`` on JAX: ``jax.jit`` of ``stateless_call``, traced now for ``x``'s shape."""
    import jax

    def compile_for_shape(lowering, x):
        step = jax.jit(lambda tv, ntv, t: model.stateless_call(tv, ntv, t, training=False)[0])

        def call(t):
            # The variables' current arrays, read at each call: Keras' own jitted
            # predict/fit donate (delete) the arrays they were given, so a snapshot
            # taken earlier would be stale after the model is used elsewhere.
            return step([v.value for v in model.trainable_variables],
                        [v.value for v in model.non_trainable_variables], t)

        with _Tracing(True, lowering):
            call(x)  # trace and compile for this shape under the forced lowering
        return call

    return compile_for_shape


def _fastest(calls, x, rounds=5):
    """The key of the fastest of ``calls`` on ``x`` (median of ``rounds`` round-robin runs)."""
    from ensemblekit.bench.throughput import time_paths

    seconds = time_paths({name: (lambda call=call: _to_numpy(call(x))) for name, call in calls.items()},
                         repeats=rounds, target_s=0.005, warmup=1)
    return min(seconds, key=seconds.get)


def _direct_call(function):
    """``function(tensor)`` without re-binding the signature (``_call_flat``, where TF has it)."""
    call_flat = getattr(function, "_call_flat", None)
    if call_flat is None:
        return function
    captured = function.captured_inputs
    return lambda tensor: call_flat([tensor], captured)


def _to_numpy(output):
    return output.numpy() if hasattr(output, "numpy") else np.asarray(output)
