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
  units/filters); depthwise convolutions, normalization, element-wise and
  spatial layers pass the layout on;
- ``Add``-like merges unite their inputs' groups position by position (a
  residual block's channels move together), ``Concatenate`` on the last axis
  joins layouts, ``Flatten`` repeats the layout once per spatial position;
- groups touching the model's input or output, a nested model's boundary or
  a layer the table does not know are *fixed* (kept whole), with the reason.

Every layer's record says which axes of which weight variables carry which
layout, so ``prune.channels`` slices and ``merge.align`` permutes (Git
Re-Basin, Ainsworth et al., 2022, Sec. 3 and App. A) from the same facts.
"""

from __future__ import annotations

import dataclasses
import math

import keras
import numpy as np

from ensemblekit._graph import graph_nodes, is_container


def _layer_types(*names):
    return tuple(getattr(keras.layers, name) for name in names if hasattr(keras.layers, name))


# One table of layer kinds. Each kind is one way a layer treats the channel axis.
KINDS = {
    "producer": "Dense/Conv*D/Conv*DTranspose: opens a new group (its units/filters) on its output",
    "depthwise": "DepthwiseConv (depth_multiplier 1): per-channel kernel, passes the layout on",
    "separable": "SeparableConv (depth_multiplier 1): depthwise on the input, opens a new group",
    "norm": "BatchNormalization/LayerNormalization over the last axis: per-channel parameters",
    "embedding": "Embedding: opens a new group on its feature (last) axis",
    "elementwise": "acts element by element (or, like Softmax, symmetrically over the channels)",
    "spatial": "acts per channel over the spatial axes (pooling, padding, cropping, upsampling)",
    "merge": "Add/Subtract/Multiply/Average/Maximum/Minimum: unites its inputs' groups",
    "concat": "Concatenate: joins the layouts on the last axis, unites them on another axis",
    "flatten": "Flatten: repeats the layout once per spatial position",
    "nested": "a nested keras.Model: its boundary is fixed (it is walked on its own)",
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
)
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
UNKNOWN_KIND = "it is not a layer kind the channel graph knows"
OPENERS = ("producer", "separable", "embedding")  # kinds whose output is a new group
SUPPORTED = ("Dense, Conv1D/2D/3D(Transpose), DepthwiseConv, SeparableConv, BatchNormalization, "
             "LayerNormalization, Embedding, Flatten, Concatenate, Add/Average/Multiply/..., "
             "activations, dropout, pooling, padding")


def _last_axis(axis, rank):
    axes = axis if isinstance(axis, (list, tuple)) else [axis]
    return len(axes) == 1 and axes[0] in (-1, rank - 1)


def _plain(layer):
    return (getattr(layer, "quantization_mode", None) is None
            and not getattr(layer, "lora_enabled", False))


def _classify(layer, input_shapes):
    """``(kind, None)`` or ``(None, why the channels cannot pass through layer)``."""
    if is_container(layer):
        return "nested", None
    if getattr(layer, "data_format", "channels_last") != "channels_last":
        return None, "only data_format='channels_last' is supported"
    if not _plain(layer):
        return None, "quantized or LoRA-enabled layers are not supported"
    rank = len(input_shapes[0]) if input_shapes else 0
    if isinstance(layer, PRODUCERS + TRANSPOSED):
        if getattr(layer, "groups", 1) != 1:
            return None, "grouped convolutions are not supported"
        return "producer", None
    if isinstance(layer, DEPTHWISE + SEPARABLE):
        if layer.depth_multiplier != 1:
            return None, "depth_multiplier != 1 is not supported"
        return ("depthwise" if isinstance(layer, DEPTHWISE) else "separable"), None
    if isinstance(layer, NORMS):
        if not _last_axis(layer.axis, rank):
            return None, "only normalization over the last axis is supported"
        return "norm", None
    if isinstance(layer, EMBEDDINGS):
        return "embedding", None
    if isinstance(layer, keras.layers.Softmax) and not _last_axis(layer.axis, rank):
        return None, "softmax over an axis other than the last is not supported"
    # spatial before elementwise: SpatialDropout subclasses Dropout
    for kind, types in (("spatial", SPATIAL), ("elementwise", ELEMENTWISE), ("merge", MERGES),
                        ("concat", CONCATS)):
        if isinstance(layer, types):
            return kind, None
    if isinstance(layer, FLATTENS):
        if rank and any(d is None for d in input_shapes[0][1:-1]):
            return None, "its spatial dimensions are unknown"
        return "flatten", None
    return None, f"{UNKNOWN_KIND} (supported: {SUPPORTED})"


def layer_kind(layer, input_shapes):
    """How ``layer`` treats the channel axis: one of ``KINDS``, or ``None`` if channels cannot pass.

    Args:
        layer: a Keras layer (or nested ``keras.Model``).
        input_shapes: the shapes of its inputs, batch axis included
            (``[tuple(t.shape) for t in input_tensors]``).

    Returns:
        ``"producer"``, ``"depthwise"``, ``"separable"``, ``"norm"``,
        ``"embedding"``, ``"elementwise"``, ``"spatial"``, ``"merge"``,
        ``"concat"``, ``"flatten"``, ``"nested"`` or ``None``
        (``unsupported_reason`` says why).

    Example:
        >>> import keras
        >>> layer_kind(keras.layers.Dense(4), [(None, 3)])
        'producer'
        >>> layer_kind(keras.layers.MaxPooling1D(), [(None, 8, 3)])
        'spatial'
        >>> print(layer_kind(keras.layers.Conv1D(4, 3, groups=2), [(None, 8, 2)]))
        None
    """
    return _classify(layer, input_shapes)[0]


def unsupported_reason(layer, input_shapes):
    """Why channels cannot pass through ``layer`` (one clause), or ``None`` if they can.

    Example:
        >>> import keras
        >>> unsupported_reason(keras.layers.Reshape((2, 2)), [(None, 4)])[:43]
        'it is not a layer kind the channel graph kn'
        >>> print(unsupported_reason(keras.layers.ReLU(), [(None, 4)]))
        None
    """
    return _classify(layer, input_shapes)[1]


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
            ``"out"`` if it carries its output layout.
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
    """

    layer: object
    kind: str | None
    inputs: list
    output: list
    weights: list

    @property
    def input(self):
        """The layout of the first input (``None`` without inputs)."""
        return self.inputs[0] if self.inputs else None

    def layout(self, side):
        """The layout an axis of ``side`` (``"in"``/``"out"``) carries."""
        return self.input if side == "in" else self.output


def _weight_axes(layer, kind):
    """The channel-carrying weight axes of ``layer`` (in before out, layer.weights order)."""
    if kind == "producer":
        rank = len(layer.kernel.shape)
        in_axis, out_axis = (rank - 1, rank - 2) if isinstance(layer, TRANSPOSED) else (rank - 2, rank - 1)
        axes = [WeightAxis(layer.kernel, in_axis, "in"), WeightAxis(layer.kernel, out_axis, "out")]
        return axes + ([WeightAxis(layer.bias, 0, "out")] if layer.bias is not None else [])
    if kind == "depthwise":
        axes = [WeightAxis(layer.kernel, len(layer.kernel.shape) - 2, "in")]
        return axes + ([WeightAxis(layer.bias, 0, "in")] if layer.bias is not None else [])
    if kind == "separable":
        rank = len(layer.pointwise_kernel.shape)
        axes = [WeightAxis(layer.depthwise_kernel, rank - 2, "in"),
                WeightAxis(layer.pointwise_kernel, rank - 2, "in"),
                WeightAxis(layer.pointwise_kernel, rank - 1, "out")]
        return axes + ([WeightAxis(layer.bias, 0, "out")] if layer.bias is not None else [])
    if kind == "norm":
        return [WeightAxis(variable, 0, "in") for variable in layer.weights]
    if kind == "embedding":
        return [WeightAxis(layer.embeddings, 1, "out")]
    return []


def _channel_count(tensor):
    return tensor.shape[-1] if len(tensor.shape) else 1


class ChannelGraph:
    """The channel layouts of every tensor of one functional model, and the coupled groups.

    Built by :func:`channel_graph`. Group ids in layouts are the ids given when
    a group was opened; ``find`` maps them to the root of their coupled set.

    Attributes:
        model: the analysed model.
        layers: ``{id(layer): LayerChannels}`` in execution order.
        layouts: ``{id(tensor): layout}`` of every KerasTensor of the graph.
    """

    def __init__(self, model):
        self.model = model
        self._groups = _Groups()
        self.layouts, self.layers = {}, {}
        inputs, outputs, nodes = graph_nodes(model)
        for tensor in inputs:
            self.layouts[id(tensor)] = [self._groups.new(_channel_count(tensor), Fixed("model input"))]
        for layer, input_tensors, output_tensors in nodes:
            if id(layer) in self.layers:
                raise ValueError(
                    f"Model {model.name!r}: layer {layer.name!r} ({type(layer).__name__}) is called "
                    "more than once (a shared layer); its channels cannot be followed."
                )
            self._visit(layer, input_tensors, output_tensors)
        for tensor in outputs:
            self._groups.fix(self.layouts[id(tensor)], Fixed("model output"))

    def _visit(self, layer, input_tensors, output_tensors):
        kind, why = _classify(layer, [tuple(t.shape) for t in input_tensors])
        in_layouts = [self.layouts[id(t)] for t in input_tensors]
        out = None
        if kind == "nested":
            why = None
        elif kind is not None and len(output_tensors) != 1:
            why = "it has several outputs"
        elif kind is not None:
            out, why = self._propagate(layer, kind, in_layouts, input_tensors, output_tensors[0])
        if out is not None:
            outs = [out]
        else:
            if kind == "nested":
                fixed = Fixed(f"nested model boundary ({layer.name!r})")
            else:
                kind, fixed = None, Fixed(f"layer {layer.name!r} ({type(layer).__name__}) cannot be "
                                          f"pruned or permuted through: {why}", layer, why)
            self._groups.fix([g for layout in in_layouts for g in layout], fixed)
            outs = [[self._groups.new(_channel_count(t), fixed)] for t in output_tensors]
        for tensor, layout in zip(output_tensors, outs, strict=True):
            self.layouts[id(tensor)] = layout
        weights = _weight_axes(layer, kind)
        self.layers[id(layer)] = LayerChannels(layer, kind, in_layouts, outs[0] if outs else [], weights)

    def _propagate(self, layer, kind, in_layouts, input_tensors, output_tensor):
        """``(output layout, None)`` or ``(None, why channels cannot pass)``."""
        if kind in OPENERS:
            if kind == "embedding":  # its input's last axis holds token positions, not channels
                self._groups.fix([g for layout in in_layouts for g in layout],
                                 Fixed(f"input of embedding {layer.name!r}"))
            return [self._groups.new(output_tensor.shape[-1])], None
        if not in_layouts:
            return None, "it has no inputs"
        first = in_layouts[0]
        if kind in ("depthwise", "norm", "elementwise", "spatial"):
            return list(first), None
        if kind == "flatten":
            return list(first) * math.prod(input_tensors[0].shape[1:-1]), None
        if kind == "concat" and _last_axis(layer.axis, len(input_tensors[0].shape)):
            return [g for layout in in_layouts for g in layout], None
        # merges, and concatenation along another axis, share channels position by position
        sizes = [[self._groups.sizes[g] for g in layout] for layout in in_layouts]
        if any(s != sizes[0] for s in sizes):
            return None, f"its inputs' channel layouts differ (group sizes {sizes})"
        for layout in in_layouts[1:]:
            for a, b in zip(first, layout, strict=True):
                self._groups.union(a, b)
        return list(first), None

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
            if record.kind in OPENERS:
                openers.setdefault(self.find(record.output[0]), []).append(record.layer)
        return openers

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


def channel_graph(model):
    """Follow the channel axis of every tensor of ``model`` and couple the channels that move together.

    Args:
        model: a functional or ``Sequential`` Keras model (``channels_last``).
            Nested models are kept whole at their boundary (kind ``"nested"``).

    Returns:
        A :class:`ChannelGraph`.

    Raises:
        ValueError: for a model without a functional graph, or a layer called
            more than once (naming the layer).

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


__all__ = ["KINDS", "ChannelGraph", "Fixed", "LayerChannels", "WeightAxis", "channel_graph",
           "layer_kind", "unsupported_reason"]
