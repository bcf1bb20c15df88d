"""The grouped layers of a packed model: K members' layers as one layer each.

Inside a packed model a tensor either has no member axis (the shared input,
before the first weighted layer) or carries it just before the channel axis:
``(batch, ..., K, channels)``. That layout makes the member axis free to fold
into channels, so

* ``GroupedDense``: on the shared input one matmul with the K kernels
  concatenated, ``(in, K*units)``; afterwards an einsum over the stacked kernel
  ``(K, in, units)`` (a batched matmul) or K matmuls; ``keras.Model.quantize``
  quantizes it to int8 or int4 as Keras quantizes each member's ``Dense`` (the
  only grouped layer that quantizes; float8 leaves it float);
* ``GroupedConv`` (Conv1D/Conv2D, ``groups`` too): on the shared input one
  convolution with K*filters output channels; afterwards a grouped convolution
  over ``(..., K*channels)`` or K convolutions (a pointwise ``1x1`` one runs as
  ``GroupedDense``);
* ``GroupedDepthwiseConv``: ONE depthwise convolution over the ``(..., K*c)``
  view (member k's output channels stay contiguous); ``GroupedSeparableConv``:
  that depthwise step, then a grouped pointwise step (as ``GroupedDense``);
* ``GroupedBatchNormalization``/``GroupedLayerNormalization``/``GroupedScale``:
  per-member ``(K, c)`` parameters;
* ``MemberConstants``: each member's own constant layer (``Normalization``,
  ``Rescaling``) where the members' constants differ;
* ``GroupedPatchEmbedding``/``GroupedTransformerEncoder``: keras-hub's ViT patch
  embedding (one strided convolution with the K kernels concatenated, per-member
  class tokens and position embeddings) and transformer encoder (one einsum per
  product over ``(batch, tokens, K, hidden)``; member k's heads attend within member k);
* ``MemberChannels``: pooling, padding, cropping and up-sampling run once on
  the ``K*channels`` view; ``MemberFlatten`` flattens per member;
  ``MemberBroadcast`` gives a shared tensor the member axis;
* ``PackedOutput`` reduces the K member outputs ``(batch, K, classes)`` exactly
  as ``ek.ensemble`` does, and records what ``unpack`` needs.

Which op a grouped layer runs (``lowering``) is decided by
``ensemblekit.inference.LoweringPolicy``. Every layer is registered, so packed
models load from ``.keras`` in ``safe_mode``.
"""

from __future__ import annotations

import math

import keras
import numpy as np
from keras import ops

from ensemblekit._packed import finalize
from ensemblekit._tasks import (
    METHODS,
    UNCERTAINTY,
    canonical,
    check_method,
    member_uncertainty,
    reduce_members,
)
from ensemblekit._validate import check_choice
from ensemblekit.inference import LOWERINGS, POLICY

PACKAGE = "ensemblekit"
# ``pack(reduce=...)``: every task's methods but "weighted" (a packed model has no member weights).
REDUCTIONS = ("none", *sorted({m for methods in METHODS.values() for m in methods} - {"weighted"}))


def _renamed(config, old, new):
    """``config`` with key ``old`` renamed to ``new`` (files saved by ensemblekit 0.1 use ``old``)."""
    if old in config:
        config = dict(config)
        config.setdefault(new, config.pop(old))
    return config


def _split_members(x, num_members):
    """``(batch, ..., K*c)`` -> ``(batch, ..., K, c)`` (a free reshape)."""
    shape = [-1 if d is None else int(d) for d in x.shape[:-1]]
    return ops.reshape(x, shape + [num_members, int(x.shape[-1]) // num_members])


def _merge_members(x):
    """``(batch, ..., K, c)`` -> ``(batch, ..., K*c)`` (a free reshape)."""
    shape = [-1 if d is None else int(d) for d in x.shape[:-2]]
    return ops.reshape(x, shape + [int(x.shape[-2]) * int(x.shape[-1])])


def _repeat_members(x, num_members):
    """``(batch, ..., c)`` -> ``(batch, ..., K*c)``: the shared input once per member."""
    return ops.tile(x, [1] * (len(x.shape) - 1) + [num_members])


def _grouped_matmul(inputs, kernel, loop):
    """``y[..., k, :] = x[..., k, :] @ kernel[k]``: one einsum, or K matmuls with ``loop``."""
    if loop:
        return ops.stack([ops.matmul(inputs[..., k, :], kernel[k]) for k in range(kernel.shape[0])],
                         axis=-2)
    # Explicit subscripts: TF's einsum runs "...ki,kio->...ko" about 2x slower.
    lead = "abcdefgh"[:len(inputs.shape) - 2]
    return ops.einsum(f"{lead}ki,kio->{lead}ko", inputs, kernel)


def _conv_output_shape(input_shape, rank, kernel_size, strides, padding, dilation_rate):
    """The spatial sizes a channels-last convolution gives (``None`` stays unknown)."""
    spatial = []
    for size, k, s, d in zip(input_shape[1:1 + rank], kernel_size, strides, dilation_rate, strict=True):
        if size is None:
            spatial.append(None)
        elif padding == "same":
            spatial.append(math.ceil(size / s))
        else:
            spatial.append((size - d * (k - 1) - 1) // s + 1)
    return tuple(spatial)


def _numpy(variable):
    return keras.ops.convert_to_numpy(variable)


class _MemberLayer(keras.layers.Layer):
    """Base of the grouped layers: K members, input with or without the member axis.

    Args:
        num_members: K, the number of packed members.
        shared_input: True when the input has no member axis (the shared model
            input); the output always has one.
        lowering: ``"grouped"`` (one grouped op), ``"loop"`` (K ops) or ``"auto"``
            (decided when traced, see ``ensemblekit.inference.LoweringPolicy``).
    """

    def __init__(self, num_members, shared_input=False, lowering="grouped", **kwargs):
        super().__init__(**kwargs)
        self.num_members = int(num_members)
        self.shared_input = bool(shared_input)
        self.lowering = check_choice(lowering, LOWERINGS, "lowering")
        self.forced_lowering = None  # set by compile_for_inference while it traces

    @classmethod
    def from_config(cls, config):
        return super().from_config(_renamed(config, "members", "num_members"))

    def _check_input(self, input_shape):
        if not self.shared_input and (len(input_shape) < 3 or input_shape[-2] != self.num_members):
            raise ValueError(
                f"{self.name}: expects input (batch, ..., {self.num_members}, channels) with the "
                f"member axis before the channels; got {tuple(input_shape)}."
            )

    def member_weights(self, index):
        """Member ``index``'s weights, in the order of the original layer's ``get_weights()``."""
        return [self._member_slice(position, _numpy(variable), index)
                for position, variable in enumerate(self.weights)]

    def set_member_weights(self, per_member):
        """Load the K members' weights (each in its layer's ``get_weights()`` order); the inverse
        of ``member_weights``."""
        stacked = []
        for position, variable in enumerate(self.weights):
            array = self._stacked(position, [np.asarray(weights[position]) for weights in per_member])
            if array.shape != tuple(variable.shape):
                raise ValueError(
                    f"pack: layer {self.name!r}: stacked weight {variable.name!r} has shape "
                    f"{array.shape}, expected {tuple(variable.shape)}."
                )
            stacked.append(array)
        self.set_weights(stacked)

    def _stacked(self, position, arrays):
        """Weight ``position`` of all members as this layer stores it (default: a new axis 0)."""
        return np.stack(arrays, axis=0)

    def _member_slice(self, position, array, index):
        """Member ``index``'s part of stored weight ``position`` (the inverse of ``_stacked``)."""
        return array[index]

    def _use_loop(self, inputs):
        """Whether a member-axis input runs as K ops (``"loop"``) rather than one grouped op."""
        if self.lowering != "auto":
            return self.lowering == "loop"
        rows = inputs.shape[:-2]
        known = all(d is not None for d in rows)
        return POLICY.choose(math.prod(rows) if known else None, self.forced_lowering) == "loop"

    def get_config(self):
        config = super().get_config()
        config.update(num_members=self.num_members, shared_input=self.shared_input,
                      lowering=self.lowering)
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
    and applied with ``einsum("...ki,kio->...ko")`` (or K matmuls with ``"loop"``;
    ``"auto"`` asks ``ensemblekit.inference.POLICY`` per traced shape).

    ``quantize("int8")`` (called by ``keras.Model.quantize``) stores the kernel
    int8 in the same layout with abs-max scales ``kernel_scale`` of shape
    ``(K, units)`` and runs W8A8 as ``keras.layers.Dense`` does; ``"int4"``
    stores it packed two per byte (weight-only, per channel or in blocks of
    input rows with zero points, as ``Dense``); float8 raises
    ``NotImplementedError`` (Keras then warns and leaves the layer float).

    Args:
        units: output features per member.
        activation: the members' activation.
        use_bias: whether the members have a bias.

    Example:
        >>> import numpy as np
        >>> layer = GroupedDense(3, num_members=2, shared_input=True)
        >>> tuple(layer(np.ones((4, 5), "float32")).shape)
        (4, 2, 3)
    """

    def __init__(self, units, num_members, activation=None, use_bias=True, **kwargs):
        super().__init__(num_members, **kwargs)
        self.units = int(units)
        self.activation = keras.activations.get(activation)
        self.use_bias = bool(use_bias)

    def build(self, input_shape):
        self._check_input(input_shape)
        features = int(input_shape[-1])
        shape = (features, self.num_members, self.units) if self.shared_input else (
            self.num_members, features, self.units)
        if self.quantization_mode:  # loading a quantized layer: its variables come from the file
            self.quantized_build(shape, self.quantization_mode)
        else:
            self.kernel = self.add_weight(shape=shape, initializer="glorot_uniform", name="kernel")
        self.bias = self.add_weight(
            shape=(self.num_members, self.units), initializer="zeros", name="bias"
        ) if self.use_bias else None

    def call(self, inputs):
        return self._finish(self._matmul(inputs, self.kernel))

    def _matmul(self, inputs, kernel):
        """``inputs @ W_k`` per member, ``(batch, ..., K, units)``; int8 operands give int32."""
        if self.shared_input:
            flat = ops.reshape(kernel, (kernel.shape[0], self.num_members * self.units))
            return _split_members(ops.matmul(inputs, flat), self.num_members)
        return _grouped_matmul(inputs, kernel, self._use_loop(inputs))

    def _finish(self, outputs):
        if self.use_bias:
            outputs = outputs + self.bias
        return self.activation(outputs)

    # Quantization as keras.layers.Dense does it, member k's part being exactly Keras' quantized
    # Dense of member k. int8 (W8A8 dynamic): the kernel stored int8 with one abs-max scale per
    # member and unit, ``kernel_scale`` (K, units); inputs quantized per row (per member on
    # member-axis input) when called. int4 (weight-only): two values per byte along the units axis,
    # per-channel symmetric scales (K, units), or blocks of ``block_size`` input rows with a scale
    # and a zero point each (Keras' default ``int4/128``), dequantized when called.

    def quantize(self, mode=None, type_check=True, config=None):
        """Quantize the kernel in place (``keras.Model.quantize`` calls this): ``"int8"`` or ``"int4"``.

        Raises:
            NotImplementedError: another mode (``keras.Model.quantize`` warns and
                leaves the layer float).
        """
        if mode not in ("int8", "int4"):
            raise NotImplementedError(
                f"Layer {type(self).__name__} quantizes to int8 and int4 only (Keras' Dense schemes); "
                f"mode={mode!r} leaves {self.name!r} float."
            )
        kernel = _numpy(self.kernel)
        block_size = self._int4_block_size(config) if mode == "int4" else None
        values, state = (self._int8_values(kernel) if mode == "int8"
                         else self._int4_values(kernel, block_size))
        del self.kernel
        self.quantized_build(kernel.shape, mode, config)
        self.kernel.assign(values)
        for name, value in state.items():
            getattr(self, name).assign(value)
        if self.dtype_policy.quantization_mode is None:
            policy = mode if mode == "int8" else f"int4/{block_size or -1}"
            self.dtype_policy = keras.dtype_policies.get(f"{policy}_from_{self.dtype_policy.name}")

    @property
    def _feature_axis(self):
        """The kernel's input-feature axis: scales are per (member, unit) over it."""
        return 0 if self.shared_input else 1

    def _int8_values(self, kernel):
        values, scale = keras.quantizers.abs_max_quantize(kernel, axis=self._feature_axis, to_numpy=True)
        return values, {"kernel_scale": ops.squeeze(scale, axis=self._feature_axis)}

    def _int4_values(self, kernel, block_size):
        """The packed int4 kernel and its scales (and zero points), as Keras' Dense makes them."""
        if block_size is None:
            values, scale = keras.quantizers.abs_max_quantize(
                kernel, axis=self._feature_axis, value_range=(-8, 7), dtype="int8", to_numpy=True)
            state = {"kernel_scale": ops.squeeze(scale, axis=self._feature_axis)}
        else:  # per member: (in, units) -> values (in, units), scale and zero (groups, units)
            member_axis = 1 - self._feature_axis
            parts = [keras.quantizers.abs_max_quantize_grouped_with_zero_point(
                np.take(kernel, k, axis=member_axis), block_size, to_numpy=True)
                for k in range(self.num_members)]
            values, scale, zero = (np.stack([_numpy(part[i]) for part in parts], axis=member_axis)
                                   for i in range(3))
            state = {"kernel_scale": scale, "kernel_zero": zero}
        return keras.quantizers.pack_int4(values, axis=-1)[0], state

    def _int4_block_size(self, config=None):
        """Rows per int4 block from ``config`` (quantizing) or the dtype policy (loading); None: per channel."""
        if isinstance(config, keras.quantizers.Int4QuantizationConfig):
            block_size = config.block_size
        else:
            block_size = getattr(self.dtype_policy, "block_size", None)
        return None if block_size in (None, -1) else int(block_size)

    def quantized_build(self, kernel_shape, mode, config=None):
        if mode not in ("int8", "int4"):
            raise self._quantization_mode_error(mode)
        block_size = self._int4_block_size(config) if mode == "int4" else None
        features = int(kernel_shape[self._feature_axis])
        scale_shape = [self.num_members, self.units]
        if block_size is not None:
            scale_shape.insert(self._feature_axis, math.ceil(features / block_size))
        stored_shape = kernel_shape if mode == "int8" else (*kernel_shape[:-1], (self.units + 1) // 2)
        self.kernel = self.add_weight(shape=stored_shape, initializer="zeros", dtype="int8",
                                      trainable=False, name="kernel")
        self.kernel_scale = self.add_weight(shape=scale_shape, initializer="ones", trainable=False,
                                            name="kernel_scale")
        if block_size is not None:
            self.kernel_zero = self.add_weight(shape=scale_shape, initializer="zeros", dtype="int8",
                                               trainable=False, name="kernel_zero")
            self.g_idx = self.add_weight(  # each input row's block, as Keras' Dense stores it
                shape=(features,), dtype="float32", trainable=False, name="g_idx",
                initializer=lambda shape, dtype: ops.floor_divide(ops.arange(features, dtype=dtype),
                                                                  block_size))
        self._is_quantized = True

    def _int8_call(self, inputs, training=None):
        @ops.custom_gradient
        def int8_matmul(inputs, kernel, kernel_scale):
            def grad_fn(*args, upstream=None):
                if upstream is None:
                    (upstream,) = args
                return self._inputs_gradient(upstream, self._dequantized(kernel, kernel_scale)), None, None

            quantized_inputs, inputs_scale = keras.quantizers.abs_max_quantize(inputs, axis=-1)
            if self.shared_input:  # one row scale for all members: (batch, ..., 1) -> (batch, ..., 1, 1)
                inputs_scale = ops.expand_dims(inputs_scale, -1)
            outputs = ops.cast(self._matmul(quantized_inputs, kernel), self.compute_dtype)
            return ops.divide(outputs, ops.multiply(kernel_scale, inputs_scale)), grad_fn

        return self._finish(int8_matmul(inputs, ops.convert_to_tensor(self.kernel),
                                        ops.convert_to_tensor(self.kernel_scale)))

    def _int4_call(self, inputs, training=None):
        if hasattr(self, "kernel_zero"):
            return self._finish(self._matmul(inputs, self._int4_kernel()))
        values = keras.quantizers.unpack_int4(self.kernel, self.units, axis=-1)
        outputs = ops.cast(self._matmul(inputs, values), self.compute_dtype)
        return self._finish(ops.divide(outputs, self.kernel_scale))

    def _dequantized(self, kernel, kernel_scale):
        """The float kernel a per-channel one stands for, ``kernel / scale``, in the stored layout."""
        scale = ops.expand_dims(kernel_scale, self._feature_axis)
        return ops.divide(ops.cast(kernel, self.compute_dtype), scale)

    def _int4_kernel(self):
        """The float kernel an int4 one stands for, in the float layout."""
        values = keras.quantizers.unpack_int4(self.kernel, self.units, axis=-1)
        if not hasattr(self, "kernel_zero"):
            return self._dequantized(values, self.kernel_scale)
        blocks = ops.cast(self.g_idx, "int32")
        scale = ops.take(self.kernel_scale, blocks, axis=self._feature_axis)
        zero = ops.cast(ops.take(self.kernel_zero, blocks, axis=self._feature_axis), scale.dtype)
        return ops.cast(ops.multiply(ops.subtract(values, zero), scale), self.compute_dtype)

    def _inputs_gradient(self, upstream, float_kernel):
        """``d(inputs @ W) / d inputs`` for the gradient of the int8 call."""
        if self.shared_input:
            flat = ops.reshape(float_kernel, (float_kernel.shape[0], self.num_members * self.units))
            return ops.matmul(_merge_members(upstream), ops.transpose(flat))
        lead = "abcdefgh"[:len(upstream.shape) - 2]
        return ops.einsum(f"{lead}ko,kio->{lead}ki", upstream, float_kernel)

    def member_weights(self, index):
        """Member ``index``'s ``[kernel, bias]``; a quantized kernel comes back dequantized
        (float32, e.g. ``int8 / scale``), not as the float kernel it was made from."""
        if not self.quantization_mode:
            return super().member_weights(index)
        kernel = (self._dequantized(self.kernel, self.kernel_scale) if self.quantization_mode == "int8"
                  else self._int4_kernel())
        kernel = np.take(_numpy(kernel).astype("float32"), index, axis=1 - self._feature_axis)
        return [kernel, *([_numpy(self.bias)[index]] if self.use_bias else [])]

    def _quantized_variables(self):
        """What a quantized layer saves, in Keras' ``Dense`` order: kernel, bias, kernel_scale,
        then int4 blocks' kernel_zero and g_idx."""
        return [self.kernel, *([self.bias] if self.use_bias else []), self.kernel_scale,
                *([self.kernel_zero, self.g_idx] if hasattr(self, "kernel_zero") else [])]

    def save_own_variables(self, store):
        if not self.quantization_mode:  # float layers keep the default format
            return super().save_own_variables(store)
        for position, variable in enumerate(self._quantized_variables()):
            store[str(position)] = variable

    def load_own_variables(self, store):
        if not self.quantization_mode:
            return super().load_own_variables(store)
        variables = self._quantized_variables()
        if len(store.keys()) != len(variables):
            raise ValueError(f"{self.name}: the file holds {len(store.keys())} variables for this "
                             f"{self.quantization_mode} layer, expected {len(variables)} "
                             f"({', '.join(v.name for v in variables)}).")
        for position, variable in enumerate(variables):
            variable.assign(store[str(position)])

    def compute_output_shape(self, input_shape):
        lead = tuple(input_shape[:-1]) if self.shared_input else tuple(input_shape[:-2])
        return (*lead, self.num_members, self.units)

    def macs_per_sample(self):
        """``in * K * units`` per position (an int4 kernel stores ``units / 2`` columns)."""
        positions = math.prod(int(d) for d in self.output.shape[1:-2])
        return positions * int(self.kernel.shape[self._feature_axis]) * self.num_members * self.units

    def _stacked(self, position, arrays):
        return np.stack(arrays, axis=1 if self.shared_input and position == 0 else 0)

    def _member_slice(self, position, array, index):
        return array[:, index] if self.shared_input and position == 0 else array[index]

    def get_config(self):
        config = super().get_config()
        config.update(units=self.units, activation=keras.activations.serialize(self.activation),
                      use_bias=self.use_bias)
        return config


class _WindowedLayer(_MemberLayer):
    """Shared parts of the grouped convolutions: window geometry, activation, bias, output size."""

    def __init__(self, rank, kernel_size, num_members, strides=1, padding="valid", dilation_rate=1,
                 activation=None, use_bias=True, **kwargs):
        super().__init__(num_members, **kwargs)
        self.rank = int(rank)
        self.kernel_size = _tuple(kernel_size, self.rank)
        self.strides = _tuple(strides, self.rank)
        self.padding = padding
        self.dilation_rate = _tuple(dilation_rate, self.rank)
        self.activation = keras.activations.get(activation)
        self.use_bias = bool(use_bias)

    def _spatial_output(self, input_shape):
        return _conv_output_shape(input_shape, self.rank, self.kernel_size, self.strides,
                                  self.padding, self.dilation_rate)

    def get_config(self):
        config = super().get_config()
        config.update(
            rank=self.rank, kernel_size=self.kernel_size, strides=self.strides, padding=self.padding,
            dilation_rate=self.dilation_rate, activation=keras.activations.serialize(self.activation),
            use_bias=self.use_bias,
        )
        return config


@keras.saving.register_keras_serializable(package=PACKAGE)
class GroupedConv(_WindowedLayer):
    """K ``Conv1D``/``Conv2D`` layers in one (channels last), ``groups`` included.

    The kernel is stored ``(*kernel_size, in/groups, K*filters)``: member k owns
    output channels ``k*filters:(k+1)*filters``. On the shared input that is one
    ordinary convolution; on member-axis input ``(..., K, in)`` it is a grouped
    convolution (``K*groups`` groups) over the ``(..., K*in)`` view, or K
    convolutions with ``lowering="loop"``; a pointwise (``1x1``, stride 1)
    convolution runs as ``GroupedDense`` does (one einsum or K matmuls; ``pack``
    gives it the Dense lowering). Members with ``groups > 1`` (ConvNeXt's
    depthwise ``Conv2D``) see the shared input once per member.

    Args:
        rank: 1 or 2.
        filters, kernel_size, strides, padding, dilation_rate, groups, activation,
            use_bias: as in the members' ``Conv1D``/``Conv2D``.

    Example:
        >>> import numpy as np
        >>> layer = GroupedConv(1, 4, 3, num_members=2, padding="same", shared_input=True)
        >>> tuple(layer(np.ones((1, 10, 1), "float32")).shape)
        (1, 10, 2, 4)
    """

    def __init__(self, rank, filters, kernel_size, num_members, strides=1, padding="valid",
                 dilation_rate=1, groups=1, activation=None, use_bias=True, **kwargs):
        super().__init__(rank, kernel_size, num_members, strides=strides, padding=padding,
                         dilation_rate=dilation_rate, activation=activation, use_bias=use_bias, **kwargs)
        self.filters = int(filters)
        self.groups = int(groups)

    def build(self, input_shape):
        self._check_input(input_shape)
        if len(input_shape) != self.rank + 2 + (0 if self.shared_input else 1):
            raise ValueError(f"{self.name}: a {self.rank}D convolution cannot take input {tuple(input_shape)}.")
        channels = int(input_shape[-1])
        if channels % self.groups or self.filters % self.groups:
            raise ValueError(f"{self.name}: groups={self.groups} must divide the input channels "
                             f"({channels}) and filters ({self.filters}).")
        self.kernel = self.add_weight(
            shape=(*self.kernel_size, channels // self.groups, self.num_members * self.filters),
            initializer="glorot_uniform", name="kernel",
        )
        self.bias = self.add_weight(
            shape=(self.num_members * self.filters,), initializer="zeros", name="bias"
        ) if self.use_bias else None

    def _conv(self, x, kernel):
        return ops.conv(x, kernel, strides=self.strides, padding=self.padding,
                        dilation_rate=self.dilation_rate)

    @property
    def pointwise(self):
        """A ``1x1``, stride-1, ungrouped convolution: a Dense per position and member."""
        return self.groups == 1 and set(self.kernel_size) == {1} and set(self.strides) == {1}

    def call(self, inputs):
        if self.shared_input and self.groups == 1:
            outputs = self._conv(inputs, self.kernel)
        elif self.shared_input:
            outputs = self._conv(_repeat_members(inputs, self.num_members), self.kernel)
        elif self.pointwise:
            # (in, K*filters) -> (K, in, filters): GroupedDense's einsum or K matmuls (``lowering``)
            kernel = ops.reshape(self.kernel, (-1, self.num_members, self.filters))
            outputs = _merge_members(_grouped_matmul(inputs, ops.transpose(kernel, (1, 0, 2)),
                                                     self._use_loop(inputs)))
        elif self.lowering == "loop":
            outputs = ops.concatenate([
                self._conv(inputs[..., k, :], self.kernel[..., k * self.filters:(k + 1) * self.filters])
                for k in range(self.num_members)
            ], axis=-1)
        else:
            outputs = self._conv(_merge_members(inputs), self.kernel)
        if self.use_bias:
            outputs = outputs + self.bias
        return self.activation(_split_members(outputs, self.num_members))

    def compute_output_shape(self, input_shape):
        return (input_shape[0], *self._spatial_output(input_shape), self.num_members, self.filters)

    def _stacked(self, position, arrays):
        return np.concatenate(arrays, axis=-1)

    def _member_slice(self, position, array, index):
        return array[..., index * self.filters:(index + 1) * self.filters]

    def get_config(self):
        config = super().get_config()
        config.update(filters=self.filters, groups=self.groups)
        return config


@keras.saving.register_keras_serializable(package=PACKAGE)
class GroupedDepthwiseConv(_WindowedLayer):
    """K ``DepthwiseConv1D``/``DepthwiseConv2D`` layers as ONE depthwise convolution.

    Member k's ``c`` input channels are channels ``k*c:(k+1)*c`` of the
    ``(..., K*c)`` view, and a depthwise convolution writes input channel ``i``'s
    ``depth_multiplier`` outputs at ``i*M:(i+1)*M``, so member k's ``c*M``
    outputs are contiguous too: the kernel is the members' kernels concatenated
    on the channel axis, ``(*kernel_size, K*c, M)``, and one op computes all K.
    The shared input is seen once per member.

    Args:
        rank: 1 or 2.
        kernel_size, strides, padding, dilation_rate, depth_multiplier, activation,
            use_bias: as in the members' depthwise layers.

    Example:
        >>> import numpy as np
        >>> layer = GroupedDepthwiseConv(2, 3, num_members=2, padding="same", depth_multiplier=2)
        >>> tuple(layer(np.ones((1, 8, 8, 2, 3), "float32")).shape)
        (1, 8, 8, 2, 6)
    """

    def __init__(self, rank, kernel_size, num_members, strides=1, padding="valid", dilation_rate=1,
                 depth_multiplier=1, activation=None, use_bias=True, **kwargs):
        super().__init__(rank, kernel_size, num_members, strides=strides, padding=padding,
                         dilation_rate=dilation_rate, activation=activation, use_bias=use_bias, **kwargs)
        self.depth_multiplier = int(depth_multiplier)

    def build(self, input_shape):
        self._check_input(input_shape)
        if len(input_shape) != self.rank + 2 + (0 if self.shared_input else 1):
            raise ValueError(f"{self.name}: a {self.rank}D depthwise convolution cannot take input "
                             f"{tuple(input_shape)}.")
        channels = self.num_members * int(input_shape[-1])
        self.kernel = self.add_weight(shape=(*self.kernel_size, channels, self.depth_multiplier),
                                      initializer="glorot_uniform", name="kernel")
        self.bias = self.add_weight(shape=(channels * self.depth_multiplier,), initializer="zeros",
                                    name="bias") if self.use_bias else None

    def _depthwise(self, inputs):
        merged = _repeat_members(inputs, self.num_members) if self.shared_input else _merge_members(inputs)
        outputs = ops.depthwise_conv(merged, self.kernel, strides=self.strides, padding=self.padding,
                                     dilation_rate=self.dilation_rate)
        return outputs

    def call(self, inputs):
        outputs = self._depthwise(inputs)
        if self.use_bias:
            outputs = outputs + self.bias
        return self.activation(_split_members(outputs, self.num_members))

    def compute_output_shape(self, input_shape):
        return (input_shape[0], *self._spatial_output(input_shape), self.num_members,
                int(input_shape[-1]) * self.depth_multiplier)

    def _stacked(self, position, arrays):
        return np.concatenate(arrays, axis=-2 if position == 0 else 0)

    def _member_slice(self, position, array, index):
        size = array.shape[-2 if position == 0 else 0] // self.num_members
        part = slice(index * size, (index + 1) * size)
        return array[..., part, :] if position == 0 else array[part]

    def get_config(self):
        config = super().get_config()
        config.update(depth_multiplier=self.depth_multiplier)
        return config


@keras.saving.register_keras_serializable(package=PACKAGE)
class GroupedSeparableConv(GroupedDepthwiseConv):
    """K ``SeparableConv1D``/``SeparableConv2D`` layers: one depthwise conv, then a grouped pointwise step.

    The depthwise step is ``GroupedDepthwiseConv``'s one op; the pointwise
    ``1x1`` convolution is a per-position Dense per member, run like
    ``GroupedDense`` on ``(..., K, c*M)``: one einsum over the stacked pointwise
    kernel ``(K, c*M, filters)`` or K matmuls (``lowering``).

    Args:
        filters: output channels per member.
        rank, kernel_size, strides, padding, dilation_rate, depth_multiplier,
            activation, use_bias: as in the members' separable layers.

    Example:
        >>> import numpy as np
        >>> layer = GroupedSeparableConv(2, 5, 3, num_members=2, padding="same")
        >>> tuple(layer(np.ones((1, 8, 8, 2, 3), "float32")).shape)
        (1, 8, 8, 2, 5)
    """

    def __init__(self, rank, filters, kernel_size, num_members, **kwargs):
        super().__init__(rank, kernel_size, num_members, **kwargs)
        self.filters = int(filters)

    def build(self, input_shape):
        self._check_input(input_shape)
        if len(input_shape) != self.rank + 2 + (0 if self.shared_input else 1):
            raise ValueError(f"{self.name}: a {self.rank}D separable convolution cannot take input "
                             f"{tuple(input_shape)}.")
        channels = int(input_shape[-1])
        self.depthwise_kernel = self.add_weight(
            shape=(*self.kernel_size, self.num_members * channels, self.depth_multiplier),
            initializer="glorot_uniform", name="depthwise_kernel")
        self.pointwise_kernel = self.add_weight(
            shape=(self.num_members, channels * self.depth_multiplier, self.filters),
            initializer="glorot_uniform", name="pointwise_kernel")
        self.bias = self.add_weight(shape=(self.num_members, self.filters), initializer="zeros",
                                    name="bias") if self.use_bias else None

    @property
    def kernel(self):
        return self.depthwise_kernel

    def call(self, inputs):
        depthwise = _split_members(self._depthwise(inputs), self.num_members)
        outputs = _grouped_matmul(depthwise, self.pointwise_kernel, self._use_loop(depthwise))
        if self.use_bias:
            outputs = outputs + self.bias
        return self.activation(outputs)

    def compute_output_shape(self, input_shape):
        return (*super().compute_output_shape(input_shape)[:-1], self.filters)

    def _stacked(self, position, arrays):
        if position == 0:
            return np.concatenate(arrays, axis=-2)
        if position == 1:  # (1, ..., c*M, filters) -> (K, c*M, filters)
            return np.stack([a.reshape(a.shape[-2:]) for a in arrays], axis=0)
        return np.stack(arrays, axis=0)

    def _member_slice(self, position, array, index):
        if position == 0:
            return super()._member_slice(0, array, index)
        if position == 1:
            return array[index].reshape((1,) * self.rank + array.shape[1:])
        return array[index]

    def macs_per_sample(self):
        positions = math.prod(int(d) for d in self.output.shape[1:-2])
        depthwise = math.prod(int(d) for d in self.depthwise_kernel.shape)
        return positions * (depthwise + math.prod(int(d) for d in self.pointwise_kernel.shape))

    def get_config(self):
        config = super().get_config()
        config.update(filters=self.filters)
        return config


@keras.saving.register_keras_serializable(package=PACKAGE)
class GroupedScale(_MemberLayer):
    """K per-channel multipliers (ConvNeXt's ``LayerScale``: ``x * gamma``) with ``(K, c)`` gamma.

    Example:
        >>> import numpy as np
        >>> tuple(GroupedScale(num_members=2)(np.ones((3, 4, 2, 5), "float32")).shape)
        (3, 4, 2, 5)
    """

    def build(self, input_shape):
        self._check_input(input_shape)
        self.gamma = self.add_weight(shape=(self.num_members, int(input_shape[-1])), initializer="ones",
                                     name="gamma")

    def call(self, inputs):
        if self.shared_input:
            inputs = ops.expand_dims(inputs, -2)
        return inputs * self.gamma

    def compute_output_shape(self, input_shape):
        if self.shared_input:
            return (*input_shape[:-1], self.num_members, input_shape[-1])
        return tuple(input_shape)


@keras.saving.register_keras_serializable(package=PACKAGE)
class MemberConstants(_MemberLayer):
    """K members' constant layers (``Normalization``, ``Rescaling``) whose constants differ.

    Each member keeps its own layer (and constants); on the shared input their K
    outputs are stacked on a new member axis, on member-axis input member k's
    layer sees member k's slice. Where all members' constants are equal ``pack``
    carries one copy instead.

    Args:
        member_layers: the K layers (configs are deserialized when loading).

    Example:
        >>> import numpy as np
        >>> layer = MemberConstants([keras.layers.Rescaling(s) for s in (1.0, 2.0)], num_members=2,
        ...                         shared_input=True)
        >>> layer(np.ones((1, 3), "float32")).numpy().tolist()
        [[[1.0, 1.0, 1.0], [2.0, 2.0, 2.0]]]
    """

    def __init__(self, member_layers, num_members=None, **kwargs):
        layers = [keras.saving.deserialize_keras_object(layer) if isinstance(layer, dict) else layer
                  for layer in member_layers]
        super().__init__(len(layers) if num_members is None else num_members, **kwargs)
        if len(layers) != self.num_members:
            raise ValueError(f"{self.name}: {len(layers)} member_layers for {self.num_members} members.")
        self.member_layers = layers

    def build(self, input_shape):
        self._check_input(input_shape)
        member_shape = tuple(input_shape) if self.shared_input else (*input_shape[:-2], input_shape[-1])
        for layer in self.member_layers:
            if not layer.built:  # layers deserialized from a saved config come built
                layer.build(member_shape)

    def call(self, inputs):
        if self.shared_input:
            return ops.stack([layer(inputs) for layer in self.member_layers], axis=-2)
        return ops.stack([layer(inputs[..., k, :]) for k, layer in enumerate(self.member_layers)],
                         axis=-2)

    def compute_output_shape(self, input_shape):
        if self.shared_input:
            return (*input_shape[:-1], self.num_members, input_shape[-1])
        return tuple(input_shape)

    def member_weights(self, index):
        return self.member_layers[index].get_weights()

    def set_member_weights(self, per_member):
        for layer, weights in zip(self.member_layers, per_member, strict=True):
            layer.set_weights(weights)
            finalize(layer)

    def get_config(self):
        config = super().get_config()
        config.update(member_layers=[keras.saving.serialize_keras_object(layer)
                                     for layer in self.member_layers])
        return config


class _GroupedNormalization(_MemberLayer):
    """Shared parts of the grouped normalizations: per-member ``(K, c)`` parameters."""

    PARAMS = ()

    def __init__(self, num_members, epsilon=1e-3, center=True, scale=True, **kwargs):
        super().__init__(num_members, **kwargs)
        self.epsilon = float(epsilon)
        self.center = bool(center)
        self.scale = bool(scale)

    def build(self, input_shape):
        self._check_input(input_shape)
        shape = (self.num_members, int(input_shape[-1]))
        for name, initializer in self.PARAMS:
            if (name == "gamma" and not self.scale) or (name == "beta" and not self.center):
                setattr(self, name, None)
                continue
            trainable = not name.startswith("moving")
            # autocast=False: the parameters stay float32 under mixed precision, as in Keras'
            # own BatchNormalization.
            setattr(self, name, self.add_weight(shape=shape, initializer=initializer, name=name,
                                                trainable=trainable, autocast=False))

    def _with_member_axis(self, inputs):
        # Normalize in float32 whatever the compute dtype (``call`` casts the result back),
        # as Keras' BatchNormalization and LayerNormalization do.
        inputs = ops.cast(inputs, "float32")
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
            return (*input_shape[:-1], self.num_members, input_shape[-1])
        return tuple(input_shape)

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
        >>> tuple(GroupedBatchNormalization(num_members=2)(np.ones((3, 2, 4), "float32")).shape)
        (3, 2, 4)
    """

    PARAMS = (("gamma", "ones"), ("beta", "zeros"), ("moving_mean", "zeros"),
              ("moving_variance", "ones"))

    def call(self, inputs):
        x = self._with_member_axis(inputs)
        normalized = (x - self.moving_mean) * ops.rsqrt(self.moving_variance + self.epsilon)
        return ops.cast(self._affine(normalized), self.compute_dtype)


@keras.saving.register_keras_serializable(package=PACKAGE)
class GroupedLayerNormalization(_GroupedNormalization):
    """K ``LayerNormalization`` layers (last axis) with ``(K, c)`` scale and offset.

    Args:
        rms_scaling: as in ``keras.layers.LayerNormalization``.

    Example:
        >>> import numpy as np
        >>> tuple(GroupedLayerNormalization(num_members=2)(np.ones((3, 2, 4), "float32")).shape)
        (3, 2, 4)
    """

    PARAMS = (("gamma", "ones"), ("beta", "zeros"))

    def __init__(self, num_members, rms_scaling=False, **kwargs):
        super().__init__(num_members, **kwargs)
        self.rms_scaling = bool(rms_scaling)

    def call(self, inputs):
        x = self._with_member_axis(inputs)
        if self.rms_scaling:
            normalized = x * ops.rsqrt(ops.mean(ops.square(x), axis=-1, keepdims=True) + self.epsilon)
            return ops.cast(normalized * self.gamma if self.scale else normalized, self.compute_dtype)
        mean, variance = ops.moments(x, axes=[-1], keepdims=True)
        return ops.cast(self._affine((x - mean) * ops.rsqrt(variance + self.epsilon)), self.compute_dtype)

    def get_config(self):
        config = super().get_config()
        config.update(rms_scaling=self.rms_scaling)
        return config


def _stacked_layer_norm(x, gamma, beta, epsilon):
    """LayerNormalization over the last axis with per-member ``(K, c)`` scale and offset."""
    mean, variance = ops.moments(x, axes=[-1], keepdims=True)
    return (x - mean) * ops.rsqrt(variance + epsilon) * gamma + beta


@keras.saving.register_keras_serializable(package=PACKAGE)
class GroupedPatchEmbedding(_MemberLayer):
    """K ViT patch embeddings (keras-hub ``ViTPatchingAndEmbedding``) on the shared image.

    One strided convolution with the K kernels concatenated, ``(p, p, c, K*h)``;
    the patches become tokens ``(batch, patches, K, h)``, member k's class token
    is put first and its position embeddings are added. Weights are stored in
    the member layer's order, each with a leading member axis: class token
    ``(K, 1, 1, h)``, kernel ``(K, p, p, c, h)``, bias ``(K, h)``, position
    embeddings ``(K, positions, h)``.

    Args:
        patch_size: ``(p, p)``.
        hidden_dim: ``h``, features per token.
        use_class_token: whether a class token is put before the patches.
        use_bias: whether the patch convolution has a bias.

    Example:
        >>> import numpy as np
        >>> layer = GroupedPatchEmbedding((4, 4), 6, num_members=2, shared_input=True)
        >>> tuple(layer(np.ones((1, 8, 8, 3), "float32")).shape)
        (1, 5, 2, 6)
    """

    def __init__(self, patch_size, hidden_dim, num_members, use_class_token=True, use_bias=True, **kwargs):
        super().__init__(num_members, **kwargs)
        self.patch_size = tuple(int(p) for p in patch_size)
        self.hidden_dim = int(hidden_dim)
        self.use_class_token = bool(use_class_token)
        self.use_bias = bool(use_bias)

    def build(self, input_shape):
        if not self.shared_input or len(input_shape) != 4:
            raise ValueError(f"{self.name}: expects the shared image (batch, height, width, channels); "
                             f"got {tuple(input_shape)}.")
        k, h = self.num_members, self.hidden_dim
        grid = [int(size) // p for size, p in zip(input_shape[1:3], self.patch_size, strict=True)]
        self.num_positions = grid[0] * grid[1] + int(self.use_class_token)
        self.class_token = self.add_weight(shape=(k, 1, 1, h), name="class_token") \
            if self.use_class_token else None
        self.kernel = self.add_weight(shape=(k, *self.patch_size, int(input_shape[-1]), h), name="kernel")
        self.bias = self.add_weight(shape=(k, h), initializer="zeros", name="bias") if self.use_bias else None
        self.position_embeddings = self.add_weight(shape=(k, self.num_positions, h),
                                                   name="position_embeddings")

    def call(self, inputs):
        k, h = self.num_members, self.hidden_dim
        kernel = ops.reshape(ops.transpose(self.kernel, (1, 2, 3, 0, 4)), (*self.kernel.shape[1:4], k * h))
        patches = ops.conv(inputs, kernel, strides=self.patch_size, padding="valid")
        if self.use_bias:
            patches = patches + ops.reshape(self.bias, (k * h,))
        tokens = ops.reshape(patches, (-1, patches.shape[1] * patches.shape[2], k, h))
        if self.use_class_token:
            token = ops.transpose(self.class_token, (1, 2, 0, 3))  # (1, 1, K, h)
            tokens = ops.concatenate([ops.tile(token, (ops.shape(tokens)[0], 1, 1, 1)), tokens], axis=1)
        return tokens + ops.transpose(self.position_embeddings, (1, 0, 2))

    def compute_output_shape(self, input_shape):
        grid = [int(size) // p for size, p in zip(input_shape[1:3], self.patch_size, strict=True)]
        return (input_shape[0], grid[0] * grid[1] + int(self.use_class_token), self.num_members, self.hidden_dim)

    def macs_per_sample(self):
        """0, as ``costs.layer_macs`` counts the member's composite layer: packed == sum of members."""
        return 0

    def get_config(self):
        config = super().get_config()
        config.update(patch_size=self.patch_size, hidden_dim=self.hidden_dim,
                      use_class_token=self.use_class_token, use_bias=self.use_bias)
        return config


@keras.saving.register_keras_serializable(package=PACKAGE)
class GroupedTransformerEncoder(_MemberLayer):
    """K pre-norm transformer encoders (keras-hub ``ViTEncoder``/``ViTEncoderBlock``) on ``(batch, tokens, K, h)``.

    Each block: ``x + MHA(LN1(x))``, then ``+ MLP(LN2(x))``; an encoder ends
    with a final LayerNormalization (``final_norm``). Every product is one
    einsum over the member axis (member k's heads attend within member k);
    the members' weights are stacked on a leading axis in the member layer's
    weight order (per block: LN1, query, key, value, attention output, LN2,
    MLP Dense 1 and 2; then the final LN), e.g. query kernels ``(K, h, heads, head_dim)``.

    Args:
        num_layers: blocks.
        num_heads, key_dim, value_dim: the attention's heads and their sizes.
        mlp_dim: MLP units.
        epsilon: the LayerNormalizations' epsilon.
        use_attention_bias, use_mlp_bias: whether those layers have biases.
        activation: the MLP's first activation (keras-hub ViT: ``"gelu"``).
        final_norm: a final LayerNormalization after the blocks (``ViTEncoder``).

    Example:
        >>> import numpy as np
        >>> layer = GroupedTransformerEncoder(1, 2, 3, 3, 8, num_members=2)
        >>> tuple(layer(np.ones((1, 5, 2, 6), "float32")).shape)
        (1, 5, 2, 6)
    """

    def __init__(self, num_layers, num_heads, key_dim, value_dim, mlp_dim, num_members, epsilon=1e-6,
                 use_attention_bias=True, use_mlp_bias=True, activation="gelu", final_norm=True, **kwargs):
        super().__init__(num_members, **kwargs)
        self.num_layers, self.num_heads = int(num_layers), int(num_heads)
        self.key_dim, self.value_dim, self.mlp_dim = int(key_dim), int(value_dim), int(mlp_dim)
        self.epsilon = float(epsilon)
        self.use_attention_bias, self.use_mlp_bias = bool(use_attention_bias), bool(use_mlp_bias)
        self.activation = keras.activations.get(activation)
        self.final_norm = bool(final_norm)

    def _dense(self, name, kernel_shape, bias_shape, use_bias):
        kernel = self.add_weight(shape=(self.num_members, *kernel_shape), name=f"{name}_kernel")
        bias = self.add_weight(shape=(self.num_members, *bias_shape), initializer="zeros",
                               name=f"{name}_bias") if use_bias else None
        return kernel, bias

    def _norm(self, name, hidden):
        return (self.add_weight(shape=(self.num_members, hidden), initializer="ones", name=f"{name}_gamma"),
                self.add_weight(shape=(self.num_members, hidden), initializer="zeros", name=f"{name}_beta"))

    def build(self, input_shape):
        self._check_input(input_shape)
        if self.shared_input or len(input_shape) != 4:
            raise ValueError(f"{self.name}: expects tokens with the member axis (batch, tokens, "
                             f"{self.num_members}, hidden); got {tuple(input_shape)}.")
        h, n = int(input_shape[-1]), self.num_heads
        self.blocks = []
        for i in range(self.num_layers):
            attention = self.use_attention_bias
            self.blocks.append(dict(
                norm_1=self._norm(f"block_{i}_norm_1", h),
                query=self._dense(f"block_{i}_query", (h, n, self.key_dim), (n, self.key_dim), attention),
                key=self._dense(f"block_{i}_key", (h, n, self.key_dim), (n, self.key_dim), attention),
                value=self._dense(f"block_{i}_value", (h, n, self.value_dim), (n, self.value_dim), attention),
                output=self._dense(f"block_{i}_output", (n, self.value_dim, h), (h,), attention),
                norm_2=self._norm(f"block_{i}_norm_2", h),
                mlp_1=self._dense(f"block_{i}_mlp_1", (h, self.mlp_dim), (self.mlp_dim,), self.use_mlp_bias),
                mlp_2=self._dense(f"block_{i}_mlp_2", (self.mlp_dim, h), (h,), self.use_mlp_bias),
            ))
        self.norm = self._norm("final_norm", h) if self.final_norm else None

    @staticmethod
    def _project(x, weights, equation):
        kernel, bias = weights
        y = ops.einsum(equation, x, kernel)
        return y if bias is None else y + bias

    def _attention(self, x, block):
        """Multi-head attention of each member's tokens with its own heads (as keras MultiHeadAttention)."""
        query = self._project(x, block["query"], "btkh,khnd->btknd") * (1.0 / math.sqrt(float(self.key_dim)))
        key = self._project(x, block["key"], "btkh,khnd->btknd")
        value = self._project(x, block["value"], "btkh,khnd->btknd")
        scores = ops.softmax(ops.einsum("bsknd,btknd->bknts", key, query), axis=-1)
        attended = ops.einsum("bknts,bsknd->btknd", scores, value)
        return self._project(attended, block["output"], "btknd,kndh->btkh")

    def call(self, inputs):
        x = inputs
        for block in self.blocks:
            x = x + self._attention(_stacked_layer_norm(x, *block["norm_1"], self.epsilon), block)
            y = _stacked_layer_norm(x, *block["norm_2"], self.epsilon)
            y = self.activation(self._project(y, block["mlp_1"], "btkh,khm->btkm"))
            x = x + self._project(y, block["mlp_2"], "btkm,kmh->btkh")
        return _stacked_layer_norm(x, *self.norm, self.epsilon) if self.final_norm else x

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def macs_per_sample(self):
        """0, as ``costs.layer_macs`` counts the member's composite layer: packed == sum of members."""
        return 0

    def get_config(self):
        config = super().get_config()
        config.update(num_layers=self.num_layers, num_heads=self.num_heads, key_dim=self.key_dim,
                      value_dim=self.value_dim, mlp_dim=self.mlp_dim, epsilon=self.epsilon,
                      use_attention_bias=self.use_attention_bias, use_mlp_bias=self.use_mlp_bias,
                      activation=keras.activations.serialize(self.activation), final_norm=self.final_norm)
        return config


@keras.saving.register_keras_serializable(package=PACKAGE)
class MemberChannels(keras.layers.Wrapper):
    """Run a per-channel layer (pooling, padding, ...) once on all K members.

    ``(batch, ..., K, c)`` is viewed as ``(batch, ..., K*c)``, the wrapped
    channels-last layer runs on it, and the result is split back.

    Example:
        >>> import numpy as np
        >>> tuple(MemberChannels(keras.layers.MaxPooling1D(2), num_members=3)(np.ones((1, 8, 3, 4), "float32")).shape)
        (1, 4, 3, 4)
    """

    def __init__(self, layer, num_members, **kwargs):
        super().__init__(layer, **kwargs)
        self.num_members = int(num_members)

    @classmethod
    def from_config(cls, config, custom_objects=None):
        return super().from_config(_renamed(config, "members", "num_members"), custom_objects)

    def build(self, input_shape):
        self.layer.build(self._merged_shape(input_shape))
        self.built = True

    @staticmethod
    def _merged_shape(shape):
        channels = None if shape[-1] is None else shape[-2] * shape[-1]
        return (*shape[:-2], channels)

    def call(self, inputs):
        return _split_members(self.layer(_merge_members(inputs)), self.num_members)

    def compute_output_shape(self, input_shape):
        shape = self.layer.compute_output_shape(self._merged_shape(input_shape))
        return (*shape[:-1], self.num_members, input_shape[-1])

    def get_config(self):
        config = super().get_config()
        config.update(num_members=self.num_members)
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
        >>> tuple(MemberBroadcast(num_members=3)(np.ones((2, 4), "float32")).shape)
        (2, 3, 4)
    """

    def __init__(self, num_members, **kwargs):
        super().__init__(**kwargs)
        self.num_members = int(num_members)

    @classmethod
    def from_config(cls, config):
        return super().from_config(_renamed(config, "members", "num_members"))

    def call(self, inputs):
        return ops.repeat(ops.expand_dims(inputs, -2), self.num_members, axis=-2)

    def compute_output_shape(self, input_shape):
        return (*input_shape[:-1], self.num_members, input_shape[-1])

    def get_config(self):
        config = super().get_config()
        config.update(num_members=self.num_members)
        return config


@keras.saving.register_keras_serializable(package=PACKAGE)
class PackedOutput(keras.layers.Layer):
    """Reduce the K member outputs ``(batch, ..., K, units)`` like ``ek.ensemble``.

    The reduction is ``ensemblekit._tasks.reduce_members``, the one
    ``ek.ensemble`` uses, so a packed model equals the ensemble for every task.
    Also the record that lets ``unpack`` give the members back: their
    architectures (``member_configs``) and which packed layer holds which
    member layer's weights (``weighted_layers``).

    Args:
        reduce: ``"none"`` (the members' raw outputs) or a method of
            ``ensemblekit._tasks.METHODS[task]`` (``"mean"``, ``"logit_mean"``, ...).
        member_output_kind: what the members output, ``"logits"`` or ``"probs"``.
        member_configs: the members' serialized architectures, as JSON strings
            (Keras would re-interpret nested model configs kept as dicts).
        weighted_layers: packed layer names, in the members' weighted-layer order.
        task: the members' task (``"multiclass"``, ``"binary"``, ``"multilabel"``, ``"regression"``).
        uncertainty: output ``{"prediction", <uncertainty keys>}`` as ``ek.ensemble(..., uncertainty=True)``.
        trim, threshold: as in ``ek.ensemble``.
    """

    def __init__(self, reduce="mean", member_output_kind="probs", member_configs=(),
                 weighted_layers=(), task="multiclass", uncertainty=False, trim=0.2, threshold=0.5,
                 **kwargs):
        kwargs.setdefault("dtype", "float32")  # outputs in float32 under mixed precision too
        super().__init__(**kwargs)
        self.task = task
        self.reduce = reduce if reduce == "none" else check_method(reduce, task, f"layer {self.name!r}")
        if uncertainty and reduce == "none":
            raise ValueError(f"{self.name}: uncertainty needs a reduction; reduce='none' returns the members' outputs.")
        self.member_output_kind = member_output_kind
        self.member_configs = list(member_configs)
        self.weighted_layers = list(weighted_layers)
        self.uncertainty = bool(uncertainty)
        self.trim = float(trim)
        self.threshold = float(threshold)

    @property
    def output_kind(self):
        """What the packed model outputs: probabilities once reduced, else the members' kind."""
        return self.member_output_kind if self.reduce == "none" else "probs"

    @classmethod
    def from_config(cls, config):
        return super().from_config(_renamed(config, "kind", "member_output_kind"))

    def call(self, inputs):
        inputs = ops.cast(inputs, "float32")  # reduce in float32 under mixed precision too
        # Inside the packed model the member axis sits before the channels, (batch, ..., K, units);
        # members on axis 1, as ``ek.ensemble`` stacks them (a no-op for (batch, K, units)).
        inputs = ops.moveaxis(inputs, -2, 1)
        if self.reduce == "none":
            return inputs
        stacked = canonical(inputs, self.task, self.member_output_kind)
        prediction = reduce_members(stacked, self.task, self.reduce, trim=self.trim, threshold=self.threshold)
        if not self.uncertainty:
            return prediction
        return {"prediction": prediction,
                **member_uncertainty(stacked, self.task, threshold=self.threshold)}

    def compute_output_shape(self, input_shape):
        input_shape = (input_shape[0], input_shape[-2], *input_shape[1:-2], input_shape[-1])
        if self.reduce == "none":
            return tuple(input_shape)
        prediction = (input_shape[0], *input_shape[2:])
        if not self.uncertainty:
            return prediction
        per_sample = prediction[:-1] if self.task == "multiclass" else prediction
        return {"prediction": prediction, **{key: per_sample for key in UNCERTAINTY[self.task]}}

    def get_config(self):
        config = super().get_config()
        config.update(reduce=self.reduce, member_output_kind=self.member_output_kind,
                      member_configs=self.member_configs,
                      weighted_layers=self.weighted_layers, task=self.task,
                      uncertainty=self.uncertainty, trim=self.trim, threshold=self.threshold)
        return config


def _tuple(value, rank):
    return tuple(int(v) for v in value) if isinstance(value, (list, tuple)) else (int(value),) * rank
