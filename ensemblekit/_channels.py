"""The one channel-coupling graph: which channels of which tensors and weights move together.

Removing a filter (``prune.channels``) or reordering hidden units
(``merge.align``) must touch every weight axis that reads or writes those
channels. Following DepGraph (Fang et al., 2023, "DepGraph: Towards Any
Structural Pruning", Sec. 3), the channel axis (last axis, ``channels_last``)
of every tensor of a functional model is followed through the graph once, and
coupled channels are joined with a union-find:

- every tensor gets a *layout*: its channel axis as a list of channel
  *groups*, one segment per group;
- a Dense/Conv/SeparableConv/Embedding layer opens a new group (its
  units/filters); depthwise convolutions, normalization, element-wise,
  spatial, size-1 ``Reshape``, per-channel scale (``LayerScale``) and
  constant (``Normalization``, ``Rescaling``) layers pass the layout on;
- ``Add``-like merges (layers or ``keras.ops``) unite their inputs' groups
  position by position (a residual block's channels move together; a
  squeeze-and-excitation gate ``(batch, 1, 1, C)`` moves with the
  ``(batch, H, W, C)`` tensor it scales), ``Concatenate`` on the last axis
  joins layouts, ``Flatten`` repeats the layout once per spatial position;
- a nested functional model is walked through with its inputs' layouts
  (DepGraph sees through modules the same way), so its groups couple with
  the outer model's;
- a composite layer (one Layer holding sublayers, not a graph: keras-hub's
  ViT patch embedding and transformer encoder, known by class name) has a kind
  of its own whose record lists every sublayer weight's channel axes; an
  encoder opens *inner* groups of its own (each block's whole attention heads,
  the units within a head, its MLP units), and records the count ties its
  config imposes (one ``num_heads``/``mlp_dim`` for all blocks,
  ``hidden_dim = num_heads * key_dim``);
- groups touching the model's input or output, or a layer the table does
  not know, are *fixed* (kept whole), with the reason.

Every layer's record says which axes of which weight variables carry which
layout, so ``prune.channels`` slices and ``merge.align`` permutes (Git
Re-Basin, Ainsworth et al., 2022, Sec. 3 and App. A) from the same facts.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import itertools
import math

import keras
import numpy as np

from ensemblekit._graph import graph_nodes, is_container, own_nodes


def _layer_types(*names):
    return tuple(getattr(keras.layers, name) for name in names if hasattr(keras.layers, name))


def _keras_src_types(module, *names):
    """Classes Keras does not export as layers: applications' own layers, ``keras.ops`` operations."""
    try:
        source = importlib.import_module(f"keras.src.{module}")
    except ImportError:  # pragma: no cover - a Keras without that module
        return ()
    return tuple(getattr(source, name) for name in names if isinstance(getattr(source, name, None), type))


# One table of layer kinds. Each kind is one way a layer treats the channel axis.
KINDS = {
    "producer": "Dense/Conv*D/Conv*DTranspose: opens a new group (its units/filters) on its output",
    "depthwise": "DepthwiseConv (depth_multiplier 1) or a Conv with groups == input channels == "
                 "filters (ConvNeXt): per-channel kernel, passes the layout on",
    "separable": "SeparableConv (depth_multiplier 1): depthwise on the input, opens a new group",
    "norm": "BatchNormalization/LayerNormalization over the last axis: per-channel parameters",
    "embedding": "Embedding: opens a new group on its feature (last) axis",
    "elementwise": "acts element by element (or, like Softmax, symmetrically over the channels); "
                   "keras.ops element-wise operations with a scalar constant; StochasticDepth",
    "reshape": "Reshape keeping the last (channel) axis, adding/removing size-1 axes before it",
    "scale": "per-channel multiplier weights on the last axis (ConvNeXt's LayerScale: x * gamma)",
    "constant": "per-channel or scalar constants (Normalization over the last axis, Rescaling)",
    "spatial": "acts per channel over the spatial axes (pooling, padding, cropping, upsampling)",
    "merge": "Add/Subtract/Multiply/Average/Maximum/Minimum (layers or keras.ops on two tensors): "
             "unites its inputs' groups position by position; a (batch, 1, 1, C) gate broadcasts",
    "concat": "Concatenate: joins the layouts on the last axis, unites them on another axis",
    "flatten": "Flatten: repeats the layout once per spatial position",
    "nested": "a nested functional/Sequential model called once: walked through with its inputs' layouts",
    "index": "x[:, i] / x[:, a:b] indexing, or keras.ops.mean/max over, axes between the batch and "
             "channel axes (ViT's class-token and average pooling)",
    "patch_embedding": "ViT's patch embedding (keras-hub ViTPatchingAndEmbedding): patch Conv, class token "
                       "and position embedding open the residual-stream group together",
    "transformer": "a transformer encoder or block (keras-hub ViTEncoder/ViTEncoderBlock: LN, "
                   "MultiHeadAttention, MLP, residual adds): passes the residual stream; each block "
                   "opens a group of whole heads and one of MLP units (Torch-Pruning's head pruning) "
                   "and permutes (never prunes) the units within its heads",
}
PRODUCERS = _layer_types("Dense", "Conv1D", "Conv2D", "Conv3D")
TRANSPOSED = _layer_types("Conv1DTranspose", "Conv2DTranspose", "Conv3DTranspose")
DEPTHWISE = _layer_types("DepthwiseConv1D", "DepthwiseConv2D")
SEPARABLE = _layer_types("SeparableConv1D", "SeparableConv2D")
NORMS = _layer_types("BatchNormalization", "LayerNormalization")
EMBEDDINGS = _layer_types("Embedding")
ELEMENTWISE = _layer_types(
    "Activation", "ReLU", "LeakyReLU", "ELU", "Softmax", "Dropout", "GaussianNoise",
    "GaussianDropout", "AlphaDropout", "ActivityRegularization", "Identity",
) + _keras_src_types("applications.convnext", "StochasticDepth")  # identity at inference
# keras.ops on a KerasTensor (``x + 3.0``, ``ops.relu(x)``) are operations of the functional graph
ELEMENTWISE_OPS = _keras_src_types(
    "ops.nn", "Relu", "Relu6", "Sigmoid", "HardSigmoid", "Silu", "HardSilu", "Gelu", "Elu", "Selu",
    "Celu", "LeakyRelu", "Softplus", "Softsign", "LogSigmoid", "TanhShrink", "HardTanh", "SoftShrink",
    "HardShrink", "SparsePlus", "Squareplus", "SparseSigmoid", "Threshold",
) + _keras_src_types(
    "ops.numpy", "Abs", "Absolute", "Negative", "Square", "Sqrt", "Exp", "Log", "Log1p", "Expm1",
    "Tanh", "Sin", "Cos", "Clip", "Reciprocal", "Sign", "Floor", "Ceil", "Round",
)
BINARY_OPS = _keras_src_types("ops.numpy", "Add", "Subtract", "Multiply", "Divide", "TrueDivide",
                              "Maximum", "Minimum", "Power")
RESHAPES = _layer_types("Reshape")
SCALES = _keras_src_types("applications.convnext", "LayerScale")
CONSTANTS = _layer_types("Normalization", "Rescaling")
SPATIAL = _layer_types(
    "MaxPooling1D", "MaxPooling2D", "MaxPooling3D", "AveragePooling1D", "AveragePooling2D",
    "AveragePooling3D", "GlobalAveragePooling1D", "GlobalAveragePooling2D",
    "GlobalAveragePooling3D", "GlobalMaxPooling1D", "GlobalMaxPooling2D", "GlobalMaxPooling3D",
    "AdaptiveAveragePooling1D", "AdaptiveAveragePooling2D", "AdaptiveAveragePooling3D",
    "AdaptiveMaxPooling1D", "AdaptiveMaxPooling2D", "AdaptiveMaxPooling3D",
    "ZeroPadding1D", "ZeroPadding2D", "ZeroPadding3D", "Cropping1D", "Cropping2D", "Cropping3D",
    "UpSampling1D", "UpSampling2D", "UpSampling3D", "SpatialDropout1D", "SpatialDropout2D",
    "SpatialDropout3D",
)
SPATIAL_DROPOUT = _layer_types("SpatialDropout1D", "SpatialDropout2D", "SpatialDropout3D")
MERGES = _layer_types("Add", "Subtract", "Multiply", "Average", "Maximum", "Minimum")
CONCATS = _layer_types("Concatenate")
FLATTENS = _layer_types("Flatten")
INDEXING = _keras_src_types("ops.numpy", "GetItem")
AXIS_REDUCTIONS = _keras_src_types("ops.numpy", "Mean", "Max")
# keras-hub composite layers, known by class name: the library never imports keras-hub
PATCH_EMBEDDINGS = ("ViTPatchingAndEmbedding",)
ENCODERS = ("ViTEncoder",)  # blocks in ``encoder_layers``, then a final LayerNormalization ``layer_norm``
ENCODER_BLOCKS = ("ViTEncoderBlock",)  # ln_1 -> mha -> + x -> ln_2 -> mlp (dense_1, dense_2) -> + x
UNKNOWN_KIND = "it is not a layer kind the channel graph knows"
OPENERS = ("producer", "separable", "embedding", "patch_embedding")  # kinds whose output is a new group
# kinds whose output carries their (first) input's layout unchanged
PASSING = ("depthwise", "norm", "elementwise", "spatial", "reshape", "scale", "constant", "index",
           "transformer")
SUPPORTED = ("Dense, Conv1D/2D/3D(Transpose), DepthwiseConv, SeparableConv, BatchNormalization, "
             "LayerNormalization, Embedding, Flatten, Concatenate, Add/Average/Multiply/..., "
             "activations, dropout, pooling, padding, size-1 Reshape, LayerScale, Normalization, "
             "Rescaling, element-wise keras.ops, x[:, i] indexing and keras.ops.mean over token axes, nested functional/Sequential models, "
             "keras-hub ViTPatchingAndEmbedding/ViTEncoder/ViTEncoderBlock")


def _last_axis(axis, rank):
    axes = axis if isinstance(axis, (list, tuple)) else [axis]
    return len(axes) == 1 and axes[0] in (-1, rank - 1)


def _plain(layer):
    return (getattr(layer, "quantization_mode", None) is None
            and not getattr(layer, "lora_enabled", False))


def _has_graph(model):
    return isinstance(model, keras.Sequential) or hasattr(model, "operations")


def _is_depthwise_conv(layer, input_shapes):
    """A Conv with ``groups == input channels == filters``: one filter per input channel."""
    channels = input_shapes[0][-1] if input_shapes else None
    return layer.groups == channels == getattr(layer, "filters", None)


def _reshape_kind(layer, shape):
    """``("reshape", None)`` if ``layer`` keeps the last axis and only adds/removes size-1 axes."""
    out = tuple(layer.compute_output_shape(shape))
    if (len(shape) > 1 and len(out) > 1 and shape[-1] is not None and out[-1] == shape[-1]
            and all(d == 1 for d in shape[1:-1] + out[1:-1])):
        return "reshape", None
    return None, ("only a Reshape that keeps the last (channel) axis and adds or removes size-1 "
                  "axes before it is supported")


def _constant_kind(layer, rank):
    if isinstance(layer, keras.layers.Normalization) and layer.axis and not _last_axis(layer.axis, rank):
        return None, "only normalization over the last axis is supported"
    return "constant", None


def _index_kind(node, rank):
    """``("index", None)`` if the call's key indexes only axes between the batch and channel axes."""
    if node is None:
        return None, "its index is unknown (call it in a functional graph)"
    key = node.arguments.args[1] if len(node.arguments.args) > 1 else node.arguments.kwargs.get("key")
    key = key if isinstance(key, tuple) else (key,)
    simple = all(isinstance(k, (int, np.integer, slice)) and not isinstance(k, bool) for k in key)
    if simple and 1 < len(key) < rank and key[0] == slice(None):
        return "index", None
    return None, ("only indexing that keeps the batch and channel axes (x[:, 0], x[:, 1:3]) is "
                  "supported")


def encoder_blocks(layer):
    """The transformer blocks of a keras-hub encoder (or ``[layer]`` for one block), or ``None``.

    A block must hold a plain ``MultiHeadAttention`` (``mha``: EinsumDense
    query/key/value kernels ``(hidden, heads, head_dim)``, output kernel
    ``(heads, head_dim, hidden)``), ``layer_norm_1``/``layer_norm_2`` and an
    ``mlp`` of two Dense layers (``dense_1``, ``dense_2``).
    """
    name = type(layer).__name__
    blocks = list(getattr(layer, "encoder_layers", [])) if name in ENCODERS else [layer]
    if name in ENCODERS and not isinstance(getattr(layer, "layer_norm", None), keras.layers.LayerNormalization):
        return None
    for block in blocks:
        mha, mlp = getattr(block, "mha", None), getattr(block, "mlp", None)
        if (not isinstance(mha, keras.layers.MultiHeadAttention) or mha._output_shape is not None
                or mha._attention_axes not in (None, (1,)) or not all(map(_plain, block._flatten_layers()))
                or not all(isinstance(getattr(block, f"layer_norm_{i}", None), keras.layers.LayerNormalization)
                           for i in (1, 2))
                or not all(isinstance(getattr(mlp, d, None), keras.layers.Dense) for d in ("dense_1", "dense_2"))
                or not all(len(getattr(getattr(mha, dense, None), "kernel", np.zeros(0)).shape) == 3
                           for dense in ("_query_dense", "_key_dense", "_value_dense", "_output_dense"))):
            return None
    return blocks if blocks and layer.built else None


def _composite_kind(layer):
    """``(kind, why)`` for a keras-hub composite layer the table knows, else ``None``."""
    name = type(layer).__name__
    if name in PATCH_EMBEDDINGS:
        if not layer.built or not isinstance(getattr(layer, "patch_embedding", None), keras.layers.Conv2D):
            return None, "it is not built (no patch_embedding Conv2D)"
        return "patch_embedding", None
    if name in ENCODERS + ENCODER_BLOCKS:
        if encoder_blocks(layer) is None:
            return None, ("its blocks are not built or not LN -> MultiHeadAttention -> LN -> MLP(Dense, "
                          "Dense) with (hidden, heads, head_dim) kernels")
        return "transformer", None
    return None


def _classify(layer, input_shapes, node=None):
    """``(kind, None)`` or ``(None, why the channels cannot pass through layer)``."""
    if is_container(layer):
        if not _has_graph(layer):
            return None, "a subclassed model has no functional graph to follow"
        return "nested", None
    if getattr(layer, "data_format", "channels_last") != "channels_last":
        return None, "only data_format='channels_last' is supported"
    if not _plain(layer):
        return None, "quantized or LoRA-enabled layers are not supported"
    rank = len(input_shapes[0]) if input_shapes else 0
    composite = _composite_kind(layer)
    if composite is not None:
        return composite
    if isinstance(layer, INDEXING):
        return _index_kind(node, rank)
    if isinstance(layer, AXIS_REDUCTIONS):
        axes = layer.axis if isinstance(layer.axis, (list, tuple)) else [layer.axis]
        if rank > 2 and None not in axes and all(0 < a < rank - 1 for a in axes):
            return "index", None
        return None, "only a reduction over non-negative axes between the batch and channel axes is supported"
    if isinstance(layer, BINARY_OPS):  # with one tensor the other operand is a constant
        return ("merge" if len(input_shapes) > 1 else "elementwise"), None
    if isinstance(layer, ELEMENTWISE_OPS):
        return "elementwise", None
    if isinstance(layer, PRODUCERS + TRANSPOSED):
        if getattr(layer, "groups", 1) == 1:
            return "producer", None
        if _is_depthwise_conv(layer, input_shapes):
            return "depthwise", None
        return None, "grouped convolutions are not supported (unless groups == input channels == filters)"
    if isinstance(layer, DEPTHWISE + SEPARABLE):
        if layer.depth_multiplier != 1:
            return None, "depth_multiplier != 1 is not supported (output channel c*M+m reads input channel c)"
        return ("depthwise" if isinstance(layer, DEPTHWISE) else "separable"), None
    if isinstance(layer, NORMS):
        if not _last_axis(layer.axis, rank):
            return None, "only normalization over the last axis is supported"
        return "norm", None
    if isinstance(layer, EMBEDDINGS):
        return "embedding", None
    if isinstance(layer, keras.layers.Softmax) and not _last_axis(layer.axis, rank):
        return None, "softmax over an axis other than the last is not supported"
    if isinstance(layer, RESHAPES) and rank:
        return _reshape_kind(layer, input_shapes[0])
    if isinstance(layer, CONSTANTS):
        return _constant_kind(layer, rank)
    # spatial before elementwise: SpatialDropout subclasses Dropout
    for kind, types in (("spatial", SPATIAL), ("elementwise", ELEMENTWISE), ("merge", MERGES),
                        ("concat", CONCATS), ("scale", SCALES)):
        if isinstance(layer, types):
            return kind, None
    if isinstance(layer, FLATTENS):
        if rank and any(d is None for d in input_shapes[0][1:-1]):
            return None, "its spatial dimensions are unknown"
        return "flatten", None
    return None, f"{UNKNOWN_KIND} (supported: {SUPPORTED})"


def layer_kind(layer, input_shapes, node=None):
    """How ``layer`` treats the channel axis: one of ``KINDS``, or ``None`` if channels cannot pass.

    Args:
        layer: a Keras layer, a ``keras.ops`` operation of a functional graph,
            or a nested ``keras.Model``.
        input_shapes: the shapes of its inputs, batch axis included
            (``[tuple(t.shape) for t in input_tensors]``).
        node: its call node (``"index"`` reads the index from its arguments).

    Returns:
        ``"producer"``, ``"depthwise"``, ``"separable"``, ``"norm"``,
        ``"embedding"``, ``"elementwise"``, ``"reshape"``, ``"scale"``,
        ``"constant"``, ``"spatial"``, ``"merge"``, ``"concat"``,
        ``"flatten"``, ``"nested"``, ``"index"``, ``"patch_embedding"``,
        ``"transformer"`` or ``None`` (``unsupported_reason`` says
        why). A ``"constant"`` layer or an element-wise operation whose
        per-channel constants are not weights (``Rescaling([...])``,
        ``x * np.array([...])``) still keeps its channels whole in the graph.

    Example:
        >>> import keras
        >>> layer_kind(keras.layers.Dense(4), [(None, 3)])
        'producer'
        >>> layer_kind(keras.layers.Reshape((1, 1, 3)), [(None, 3)])
        'reshape'
        >>> print(layer_kind(keras.layers.Conv1D(4, 3, groups=2), [(None, 8, 2)]))
        None
    """
    return _classify(layer, input_shapes, node)[0]


def unsupported_reason(layer, input_shapes, node=None):
    """Why channels cannot pass through ``layer`` (one clause), or ``None`` if they can.

    Example:
        >>> import keras
        >>> unsupported_reason(keras.layers.UnitNormalization(), [(None, 4)])[:43]
        'it is not a layer kind the channel graph kn'
        >>> print(unsupported_reason(keras.layers.ReLU(), [(None, 4)]))
        None
    """
    return _classify(layer, input_shapes, node)[1]


def _held_constants(layer, node):
    """Why ``layer``'s per-channel constants cannot be sliced (they are not weights), or ``None``."""
    if isinstance(layer, keras.layers.Rescaling):
        values = (layer.scale, layer.offset)
    elif isinstance(layer, keras.layers.Normalization):
        values = (layer.input_mean, layer.input_variance)
    elif node is not None and not isinstance(layer, keras.layers.Layer):
        values = [a for a in node.arguments.args if not isinstance(a, keras.KerasTensor)]
    else:
        return None
    if any(value is not None and np.size(value) > 1 for value in values):
        return "its per-channel constants are held in its config or call, not in weights"
    return None


@dataclasses.dataclass(frozen=True)
class Fixed:
    """Why a channel group is kept whole (never pruned, never permuted).

    Attributes:
        text: the reason in words, e.g. ``"model output"``.
        layer: the layer channels cannot pass through (``None`` for model
            input/output and nested model boundaries).
        why: what that layer does that the graph cannot follow.
    """

    text: str
    layer: object = None
    why: str | None = None


class _Groups:
    """Union-find over channel groups (path compression); a root may be fixed with a reason."""

    def __init__(self):
        self.parent, self.sizes, self.fixed = [], [], {}

    def new(self, size, fixed=None):
        group = len(self.parent)
        self.parent.append(group)
        self.sizes.append(None if size is None else int(size))
        if fixed is not None:
            self.fixed[group] = fixed
        return group

    def find(self, group):
        root = group
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[group] != root:
            self.parent[group], group = root, self.parent[group]
        return root

    def union(self, a, b):
        a, b = self.find(a), self.find(b)
        if a != b:
            self.parent[b] = a
            if b in self.fixed:
                self.fixed.setdefault(a, self.fixed.pop(b))

    def fix(self, groups, fixed):
        """Keep ``groups`` whole; a group keeps the first reason it was given."""
        for group in groups:
            self.fixed.setdefault(self.find(group), fixed)


@dataclasses.dataclass(frozen=True)
class WeightAxis:
    """One axis of one weight variable that carries channels.

    Attributes:
        variable: the ``keras.Variable``.
        axis: the axis (non-negative).
        side: ``"in"`` if the axis carries the layer's input layout,
            ``"out"`` if it carries its output layout, else the name of one
            of the layer's inner groups (``"0/heads"``: a composite layer's
            block 0 attention heads).
    """

    variable: object
    axis: int
    side: str


@dataclasses.dataclass
class LayerChannels:
    """What the channel graph knows about one layer call.

    Attributes:
        layer: the layer.
        kind: one of ``KINDS`` or ``None`` (channels cannot pass through it).
        inputs: the layout (list of groups) of each input tensor.
        output: the layout of its (first) output tensor.
        weights: the ``WeightAxis`` of every weight axis that carries channels.
        inner: ``{name: layout}`` of the groups a composite layer holds inside
            (a transformer block's heads, units within a head, MLP units).
        opens: the names of the inner groups it opens as prunable units
            (whole heads, MLP units); the others are only permuted.
    """

    layer: object
    kind: str | None
    inputs: list
    output: list
    weights: list
    inner: dict = dataclasses.field(default_factory=dict)
    opens: tuple = ()

    @property
    def input(self):
        """The layout of the first input (``None`` without inputs)."""
        return self.inputs[0] if self.inputs else None

    def layout(self, side):
        """The layout an axis of ``side`` (``"in"``/``"out"``/an inner group's name) carries."""
        if side == "in":
            return self.input
        return self.output if side == "out" else self.inner[side]


def _weight_axes(layer, kind):
    """The channel-carrying weight axes of ``layer`` (in before out, layer.weights order)."""
    if kind == "producer":
        rank = len(layer.kernel.shape)
        in_axis, out_axis = (rank - 1, rank - 2) if isinstance(layer, TRANSPOSED) else (rank - 2, rank - 1)
        axes = [WeightAxis(layer.kernel, in_axis, "in"), WeightAxis(layer.kernel, out_axis, "out")]
        return axes + ([WeightAxis(layer.bias, 0, "out")] if layer.bias is not None else [])
    if kind == "depthwise":  # DepthwiseConv kernel (..., C, 1); grouped Conv kernel (..., 1, C)
        rank = len(layer.kernel.shape)
        axes = [WeightAxis(layer.kernel, rank - 1 if isinstance(layer, PRODUCERS) else rank - 2, "in")]
        return axes + ([WeightAxis(layer.bias, 0, "in")] if layer.bias is not None else [])
    if kind == "separable":
        rank = len(layer.pointwise_kernel.shape)
        axes = [WeightAxis(layer.depthwise_kernel, rank - 2, "in"),
                WeightAxis(layer.pointwise_kernel, rank - 2, "in"),
                WeightAxis(layer.pointwise_kernel, rank - 1, "out")]
        return axes + ([WeightAxis(layer.bias, 0, "out")] if layer.bias is not None else [])
    if kind in ("norm", "scale"):
        return [WeightAxis(variable, 0, "in") for variable in layer.weights]
    if kind == "constant" and getattr(layer, "axis", None):  # Normalization's adapted mean/variance
        return [WeightAxis(variable, 0, "in") for variable in layer.weights if len(variable.shape) == 1]
    if kind == "embedding":
        return [WeightAxis(layer.embeddings, 1, "out")]
    if kind == "patch_embedding":
        conv = layer.patch_embedding
        axes = [WeightAxis(conv.kernel, 2, "in"), WeightAxis(conv.kernel, 3, "out")]
        axes += [WeightAxis(conv.bias, 0, "out")] if conv.bias is not None else []
        axes += [WeightAxis(v, len(v.shape) - 1, "out") for v in (getattr(layer, "class_token", None),
                 layer.position_embedding.embeddings) if v is not None]
        return axes
    if kind == "transformer":
        return _transformer_axes(layer)
    return []


def _dense_axes(dense, in_side, out_side):
    axes = [WeightAxis(dense.kernel, 0, in_side), WeightAxis(dense.kernel, 1, out_side)]
    return axes + ([WeightAxis(dense.bias, 0, out_side)] if dense.bias is not None else [])


def _attention_axes(mha, prefix):
    """A MultiHeadAttention's axes: the stream ("in"), whole heads, units within a head (q/k, v/o)."""
    heads, axes = f"{prefix}heads", []
    for dense, units in ((mha._query_dense, "qk"), (mha._key_dense, "qk"), (mha._value_dense, "vo")):
        axes += [WeightAxis(dense.kernel, 0, "in"), WeightAxis(dense.kernel, 1, heads),
                 WeightAxis(dense.kernel, 2, prefix + units)]
        if dense.bias is not None:
            axes += [WeightAxis(dense.bias, 0, heads), WeightAxis(dense.bias, 1, prefix + units)]
    out = mha._output_dense
    axes += [WeightAxis(out.kernel, 0, heads), WeightAxis(out.kernel, 1, f"{prefix}vo"),
             WeightAxis(out.kernel, 2, "in")]
    return axes + ([WeightAxis(out.bias, 0, "in")] if out.bias is not None else [])


def _transformer_axes(layer):
    """Every block's LN, attention and MLP axes (the residual stream is "in"), then the final LN."""
    axes = []
    for i, block in enumerate(encoder_blocks(layer)):
        for norm in (block.layer_norm_1, block.layer_norm_2):
            axes += [WeightAxis(v, 0, "in") for v in norm.weights]
        axes += _attention_axes(block.mha, f"{i}/")
        axes += _dense_axes(block.mlp.dense_1, "in", f"{i}/mlp") + _dense_axes(block.mlp.dense_2, f"{i}/mlp", "in")
    if type(layer).__name__ in ENCODERS:
        axes += [WeightAxis(v, 0, "in") for v in layer.layer_norm.weights]
    return axes


@dataclasses.dataclass(frozen=True)
class CountTie:
    """Groups whose kept channel counts a layer's config ties together (``prune.channels`` obeys it).

    Attributes:
        layer: the layer whose config imposes the tie (one ``num_heads`` for all blocks).
        groups: groups that must keep equal counts (every block's heads, or MLP units).
        scaled: ``(layout, factor)`` or ``None``: the channels of ``layout`` keep
            ``factor`` times the count of ``groups`` (``hidden_dim = num_heads * key_dim``).
    """

    layer: object
    groups: tuple
    scaled: tuple | None = None


def _channel_count(tensor):
    return tensor.shape[-1] if len(tensor.shape) else 1


class ChannelGraph:
    """The channel layouts of every tensor of one functional model, and the coupled groups.

    Built by :func:`channel_graph`. Group ids in layouts are the ids given when
    a group was opened; ``find`` maps them to the root of their coupled set.
    Nested functional/``Sequential`` models are walked through: their layers
    get records of their own, their tensors layouts of their own.

    Attributes:
        model: the analysed model.
        layers: ``{id(layer): LayerChannels}`` in execution order (a nested
            model's record comes before its layers' records).
        layouts: ``{id(tensor): layout}`` of every KerasTensor of the graph.
    """

    def __init__(self, model):
        self.model = model
        self._groups = _Groups()
        self.layouts, self.layers = {}, {}
        self.ties = []  # CountTie of composite layers' configs
        self._nested_outputs = {}  # id(tensor) -> the nested model that returned it
        outputs = self._walk(model, None)
        for tensor in outputs:
            self._groups.fix(self.layouts[id(tensor)], Fixed("model output"))

    def _walk(self, model, input_layouts):
        """Give every tensor of ``model``'s graph a layout; return its output tensors."""
        inputs, outputs, nodes = graph_nodes(model)
        if input_layouts is not None and len(input_layouts) != len(inputs):
            raise ValueError(f"Model {self.model.name!r}: nested model {model.name!r} is called with "
                             f"{len(input_layouts)} tensors but has {len(inputs)} inputs.")
        calls = own_nodes(model)
        for i, tensor in enumerate(inputs):
            self.layouts[id(tensor)] = (list(input_layouts[i]) if input_layouts is not None else
                                        [self._groups.new(_channel_count(tensor), Fixed("model input"))])
        for layer, input_tensors, output_tensors in nodes:
            if id(layer) in self.layers:
                what = "nested model" if is_container(layer) else "layer"
                raise ValueError(
                    f"Model {self.model.name!r}: {what} {layer.name!r} ({type(layer).__name__}) is called "
                    "more than once (shared); its channels cannot be followed. Call it once, or build "
                    "one model per use."
                )
            node = calls.get(id(layer), [None])[0]
            self._visit(layer, node, input_tensors, output_tensors)
        return outputs

    def _visit(self, layer, node, input_tensors, output_tensors):
        kind, why = _classify(layer, [tuple(t.shape) for t in input_tensors], node)
        in_layouts = [self.layouts[id(t)] for t in input_tensors]
        if kind == "nested":
            self._visit_nested(layer, in_layouts, output_tensors)
            return
        out = None
        if kind is not None and len(output_tensors) != 1:
            why = "it has several outputs"
        elif kind is not None:
            out, why = self._propagate(layer, kind, node, in_layouts, input_tensors, output_tensors[0])
        if out is not None:
            outs = [out]
        else:
            kind, fixed = None, Fixed(f"layer {layer.name!r} ({type(layer).__name__}) cannot be "
                                      f"pruned or permuted through: {why}", layer, why)
            for tensor, layout in zip(input_tensors, in_layouts, strict=True):
                self._groups.fix(layout, self._reader_of_nested_output(tensor, layer) or fixed)
            outs = [[self._groups.new(_channel_count(t), fixed)] for t in output_tensors]
        for tensor, layout in zip(output_tensors, outs, strict=True):
            self.layouts[id(tensor)] = layout
        weights = _weight_axes(layer, kind)
        record = LayerChannels(layer, kind, in_layouts, outs[0] if outs else [], weights)
        if kind == "transformer":
            self._open_inner(record)
        self.layers[id(layer)] = record

    def _open_inner(self, record):
        """A transformer's groups per block: whole heads, units within a head (q/k, v/o), MLP units."""
        heads, mlps, key_dims = [], [], set()
        for i, block in enumerate(encoder_blocks(record.layer)):
            query, value = block.mha._query_dense.kernel.shape, block.mha._value_dense.kernel.shape
            sizes = {"heads": query[1], "qk": query[2], "vo": value[2],
                     "mlp": block.mlp.dense_1.kernel.shape[1]}
            for name, size in sizes.items():
                record.inner[f"{i}/{name}"] = [self._groups.new(size)]
            heads.append(record.inner[f"{i}/heads"][0])
            mlps.append(record.inner[f"{i}/mlp"][0])
            key_dims.add(int(query[2]))
            record.opens += (f"{i}/heads", f"{i}/mlp")
        scaled = (tuple(record.input), key_dims.pop()) if len(key_dims) == 1 else None
        self.ties += [CountTie(record.layer, tuple(heads), scaled), CountTie(record.layer, tuple(mlps))]

    def _visit_nested(self, model, in_layouts, output_tensors):
        """Walk a nested model's own graph with the layouts of the tensors it is called on."""
        record = LayerChannels(model, "nested", in_layouts, [], [])
        self.layers[id(model)] = record  # before its layers: execution order
        inner_outputs = self._walk(model, in_layouts)
        outs = [self.layouts[id(t)] for t in inner_outputs]
        for tensor, layout in zip(output_tensors, outs, strict=True):
            self.layouts[id(tensor)] = layout
            self._nested_outputs[id(tensor)] = model
        record.output = outs[0] if outs else []

    def _reader_of_nested_output(self, tensor, layer):
        """A nested model's output read by a layer the graph cannot follow (an ensemble's combiner)
        is kept whole as that model's output, like a model output, not as a blocked group."""
        model = self._nested_outputs.get(id(tensor))
        if model is None:
            return None
        return Fixed(f"nested model output: {model.name!r}, read by {layer.name!r}")

    def _propagate(self, layer, kind, node, in_layouts, input_tensors, output_tensor):
        """``(output layout, None)`` or ``(None, why channels cannot pass)``."""
        if kind in OPENERS:
            if kind == "embedding":  # its input's last axis holds token positions, not channels
                self._groups.fix([g for layout in in_layouts for g in layout],
                                 Fixed(f"input of embedding {layer.name!r}"))
            return [self._groups.new(output_tensor.shape[-1])], None
        if not in_layouts:
            return None, "it has no inputs"
        held = _held_constants(layer, node) if kind != "index" else None
        if held is not None:
            return None, held
        first = in_layouts[0]
        if kind in PASSING:
            before, after = _channel_count(input_tensors[0]), _channel_count(output_tensor)
            if before != after:
                return None, f"it changes the number of channels ({before} -> {after})"
            return list(first), None
        if kind == "flatten":
            return list(first) * math.prod(input_tensors[0].shape[1:-1]), None
        if kind == "concat" and _last_axis(layer.axis, len(input_tensors[0].shape)):
            return [g for layout in in_layouts for g in layout], None
        return self._unite(layer, in_layouts, input_tensors, output_tensor)

    def _unite(self, layer, in_layouts, input_tensors, output_tensor):
        """Merges (and concatenation along another axis) share channels position by position.

        An input with one channel broadcast over the others (a scalar gate) is
        kept whole; a ``(batch, 1, 1, C)`` squeeze-and-excitation gate has
        ``C`` channels and is united with the ``(batch, H, W, C)`` input.
        """
        channels = _channel_count(output_tensor)
        broadcast = [channels != 1 and _channel_count(t) == 1 for t in input_tensors]
        for layout, spread in zip(in_layouts, broadcast, strict=True):
            if spread:
                self._groups.fix(layout, Fixed(f"broadcast over the channels by {layer.name!r}"))
        layouts = [layout for layout, spread in zip(in_layouts, broadcast, strict=True) if not spread]
        sizes = [[self._groups.sizes[g] for g in layout] for layout in layouts]
        if layouts and any(s != sizes[0] for s in sizes) and self._refine(layouts):
            sizes = [[self._groups.sizes[g] for g in layout] for layout in layouts]
        if not layouts or any(s != sizes[0] for s in sizes):
            return None, f"its inputs' channel layouts differ (group sizes {sizes})"
        for layout in layouts[1:]:
            for a, b in zip(layouts[0], layout, strict=True):
                self._groups.union(a, b)
        return list(layouts[0]), None

    def _refine(self, layouts):
        """Split groups so that ``layouts`` (same channel count) have the same group boundaries.

        NASNet adds a 44-channel tensor (one group) to a concatenation of two
        22-channel ones: the 44-channel group becomes two groups of 22, in
        every layout that holds it, so channels pair up position by position.
        Returns ``False`` (nothing changed) when the counts differ or a size is unknown.
        """
        sizes = [[self._groups.sizes[self.find(g)] for g in layout] for layout in layouts]
        if any(None in s for s in sizes) or len({sum(s) for s in sizes}) != 1:
            return False
        cuts = sorted({c for s in sizes for c in itertools.accumulate(s)})
        for layout in layouts:
            start = 0
            for group in list(layout):
                size = self._groups.sizes[self.find(group)]
                inner = [c - start for c in cuts if start < c < start + size]
                if inner:
                    self._split(group, [b - a for a, b in zip([0, *inner], [*inner, size])])
                start += size
        return True

    def _split(self, group, sizes):
        """Replace ``group``'s coupled set by consecutive new groups of ``sizes`` in every layout."""
        root = self.find(group)
        members = {g for g in range(len(self._groups.parent)) if self.find(g) == root}
        fixed = self._groups.fixed.get(root)
        parts = [self._groups.new(size, fixed) for size in sizes]
        seen = set()
        for layout in self._all_layouts():
            if id(layout) in seen or not members.intersection(layout):
                continue
            seen.add(id(layout))
            layout[:] = [p for g in layout for p in (parts if g in members else [g])]
        return parts

    def _all_layouts(self):
        yield from self.layouts.values()
        for record in self.layers.values():
            yield from record.inputs
            yield record.output
            yield from record.inner.values()

    def find(self, group):
        """The root of ``group``'s coupled set."""
        return self._groups.find(group)

    def size(self, group):
        """Number of channels of ``group`` (``None`` if unknown)."""
        return self._groups.sizes[self.find(group)]

    def fixed(self, group):
        """The ``Fixed`` reason ``group`` is kept whole, or ``None`` if it may be pruned/permuted."""
        return self._groups.fixed.get(self.find(group))

    def roots(self):
        """Every coupled set's root, ascending."""
        return [g for g in range(len(self._groups.parent)) if self.find(g) == g]

    def openers(self):
        """``{root: [layers]}``: the layers that open (produce) each group, fixed groups included."""
        openers = {}
        for record in self.layers.values():
            if record.kind in OPENERS:  # one group, or several once split by ``_refine``
                for root in dict.fromkeys(self.find(g) for g in record.output):
                    openers.setdefault(root, []).append(record.layer)
            for name in record.opens:
                openers.setdefault(self.find(record.inner[name][0]), []).append(record.layer)
        return openers

    def scoring_axes(self, layer, root):
        """The weight axes of ``layer`` that write ``root``'s channels (kernels, not biases): importance reads them."""
        record = self.layers[id(layer)]
        return [w for w in record.weights if w.side != "in" and len(w.variable.shape) > 1
                and any(self.find(g) == root for g in record.layout(w.side))]

    def root_scores(self, layer, axis, scores, root):
        """Per-channel ``scores`` along ``axis`` (a ``WeightAxis`` of ``layer``) restricted to ``root``'s units.

        An output axis may hold several groups (a group split by ``_refine``):
        only ``root``'s positions are kept (summed over repeats).
        """
        rows = self.unit_positions(self.layers[id(layer)].layout(axis.side), root)
        return np.asarray(scores)[rows].sum(axis=0)

    def records(self, kind=None):
        """The ``LayerChannels`` of every layer (or of one kind), in execution order."""
        return [r for r in self.layers.values() if kind is None or r.kind == kind]

    def out_axis(self, layer):
        """The ``WeightAxis`` of ``layer``'s kernel that writes its output group (openers only)."""
        return next(w for w in self.layers[id(layer)].weights if w.side == "out")

    def unit_positions(self, layout, root):
        """``(tile, size)`` indices along an axis with ``layout``: unit ``c`` of occurrence ``s`` of ``root``."""
        rows, offset = [], 0
        for group in layout:
            size = self._groups.sizes[group]
            if self.find(group) == root:
                rows.append(offset + np.arange(size))
            offset += size
        return np.stack(rows).astype("int64") if rows else np.zeros((0, 0), "int64")

    def positions(self, layout, kept):
        """Indices along an axis with ``layout`` of the channels kept (``{root: indices}``; all if absent)."""
        parts, offset = [], 0
        for group in layout:
            root, size = self.find(group), self._groups.sizes[group]
            parts.append(offset + (np.asarray(kept[root]) if root in kept else np.arange(size)))
            offset += size
        return np.concatenate(parts).astype("int64") if parts else np.zeros(0, "int64")


def recreate(layer, config=None):
    """A new layer of ``layer``'s class from ``config`` (default: its own), even where ``get_config`` is lossy.

    ``from_config`` first. Some third-party layers' configs do not round-trip
    (keras-hub's ``ViTPatchingAndEmbedding`` reports ``num_patches`` it does
    not accept and leaves out ``use_patch_bias``): then the config is cut to
    the constructor's arguments, and arguments it lacks are read from the
    layer's attributes of the same name.

    Example:
        >>> import keras
        >>> recreate(keras.layers.Dense(3, name="d"), {"units": 5, "name": "d"}).units
        5
    """
    config = layer.get_config() if config is None else config
    try:
        return type(layer).from_config(config)
    except (TypeError, ValueError) as error:
        parameters = inspect.signature(type(layer).__init__).parameters
        named = [p for p in parameters.values() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)][1:]
        if not named:
            raise error
    arguments = {key: config[key] for key in ("name", "trainable", "dtype") if key in config}
    if isinstance(arguments.get("dtype"), dict):
        arguments["dtype"] = keras.dtype_policies.deserialize(arguments["dtype"])
    for parameter in named:
        if parameter.name in config:
            arguments[parameter.name] = config[parameter.name]
        elif hasattr(layer, parameter.name):
            arguments[parameter.name] = getattr(layer, parameter.name)
    return type(layer)(**arguments)


def channel_graph(model):
    """Follow the channel axis of every tensor of ``model`` and couple the channels that move together.

    Args:
        model: a functional or ``Sequential`` Keras model (``channels_last``).
            Nested functional/``Sequential`` models (a base model called
            inside a transfer-learning model, ConvNeXt's stem) are walked
            through: their layers' records point at their own variables.

    Returns:
        A :class:`ChannelGraph`.

    Raises:
        ValueError: for a model without a functional graph, or a layer or
            nested model called more than once (naming it and its class).

    Example:
        >>> import keras
        >>> x = keras.Input((4,))
        >>> h = keras.layers.Dense(8, name="h")(x)
        >>> y = keras.layers.Add()([h, keras.layers.Dense(8, name="r")(h)])
        >>> graph = channel_graph(keras.Model(x, keras.layers.Dense(2, name="out")(y)))
        >>> {graph.size(root): [layer.name for layer in layers] for root, layers in graph.openers().items()}
        {8: ['h', 'r'], 2: ['out']}
        >>> graph.fixed(graph.layers[id(graph.model.get_layer("out"))].output[0]).text
        'model output'
    """
    return ChannelGraph(model)


__all__ = ["KINDS", "ChannelGraph", "CountTie", "Fixed", "LayerChannels", "WeightAxis", "channel_graph",
           "layer_kind", "recreate", "unsupported_reason"]
