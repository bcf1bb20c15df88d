"""Which axes of which weights share a permutation, derived from the functional graph.

Permuting the hidden units of a layer (and, consistently, the input axis of
every layer that reads them) leaves the network's function unchanged. This
module finds those groups automatically by propagating a "channel group" along
the last axis of every tensor of a Keras functional model:

- ``Dense``/``Conv*D`` open a new group on their output units (kernel's last
  axis, bias); the next layer's kernel input axis joins it.
- ``BatchNormalization``/``LayerNormalization`` (last axis) carry the group
  into their parameters; activations, dropout, pooling and padding pass it on.
- ``Add``/``Average``/``Multiply``/... join the groups of their inputs
  (residual connections share one permutation).
- ``Flatten`` after a conv tiles the channel group over the spatial positions.
- Groups reaching a model output or a model input are never permuted.

This replaces the hand-written per-architecture specs of the Git Re-Basin code
(Ainsworth et al., 2022, Sec. 3 and App. A).
"""

from __future__ import annotations

import dataclasses
import math

import keras

from ensemblekit._graph import graph_operations, own_nodes, weight_refs

L = keras.layers
PASS_THROUGH = (
    L.Activation, L.ReLU, L.LeakyReLU, L.ELU, L.Softmax, L.Dropout, L.SpatialDropout1D,
    L.SpatialDropout2D, L.SpatialDropout3D, L.GaussianNoise, L.GaussianDropout, L.AlphaDropout,
    L.ActivityRegularization, L.Identity, L.MaxPooling1D, L.MaxPooling2D, L.MaxPooling3D,
    L.AveragePooling1D, L.AveragePooling2D, L.AveragePooling3D, L.GlobalAveragePooling1D,
    L.GlobalAveragePooling2D, L.GlobalAveragePooling3D, L.GlobalMaxPooling1D,
    L.GlobalMaxPooling2D, L.GlobalMaxPooling3D, L.ZeroPadding1D, L.ZeroPadding2D,
    L.ZeroPadding3D, L.Cropping1D, L.Cropping2D, L.Cropping3D, L.UpSampling1D, L.UpSampling2D,
    L.UpSampling3D,
)
JOINING = (L.Add, L.Subtract, L.Average, L.Maximum, L.Minimum, L.Multiply)
CONVS = (L.Conv1D, L.Conv2D, L.Conv3D)


@dataclasses.dataclass
class PermutationSpec:
    """The permutation groups of a model.

    Attributes:
        sizes: ``{group: number of units}``.
        axes: ``{weight index: [(axis, group, tile), ...]}``; the axis has
            length ``tile * sizes[group]`` and unit ``c`` of spatial slot ``s`` is
            index ``s * size + c`` (channels-last flattening).
        sources: ``{group: [layers whose outputs carry it untiled]}`` (for
            activation matching).
    """

    sizes: dict
    axes: dict
    sources: dict

    def weights_of(self, group):
        """``[(weight index, axis, tile)]`` for every weight axis in ``group``."""
        return [(w, axis, tile) for w, entries in self.axes.items()
                for axis, g, tile in entries if g == group]


class _Groups:
    """Union-find over channel groups, with the 'fixed' (never permuted) mark."""

    def __init__(self):
        self.parent, self.size, self.fixed = {}, {}, set()

    def new(self, size):
        group = len(self.parent)
        self.parent[group], self.size[group] = group, size
        return group

    def find(self, group):
        while self.parent[group] != group:
            group = self.parent[group]
        return group

    def join(self, channels, layer):
        """Join the channel groups feeding ``layer``; returns the joint one (or ``None``)."""
        if any(c is None for c in channels):
            for c in channels:
                if c is not None:
                    self.fixed.add(self.find(c[0]))
            return None
        if len({c[1] for c in channels}) > 1:
            raise _unsupported(layer, "its inputs flatten channels differently")
        root = self.find(channels[0][0])
        for group, _ in channels[1:]:
            other = self.find(group)
            if other != root:
                self.parent[other] = root
                if other in self.fixed:
                    self.fixed.add(root)
        return (root, channels[0][1])


def _unsupported(layer, why):
    return ValueError(
        f"align cannot permute through layer {layer.name!r} ({type(layer).__name__}): {why}."
    )


def _channels_last(layer):
    if getattr(layer, "data_format", "channels_last") != "channels_last":
        raise _unsupported(layer, "only data_format='channels_last' is supported")


def _normalized_axis(layer):
    axis = layer.axis if isinstance(layer.axis, (list, tuple)) else [layer.axis]
    rank = len(layer.input.shape)
    return [a % rank for a in axis] == [rank - 1]


def _propagate(layer, channels, groups, weight_axes):
    """The channel group of ``layer``'s output; records its weights' axes in ``weight_axes``."""
    variables = layer.weights
    incoming = channels[0] if channels else None
    if isinstance(layer, L.Dense) or isinstance(layer, CONVS):
        if isinstance(layer, CONVS):
            _channels_last(layer)
            if getattr(layer, "groups", 1) != 1:
                raise _unsupported(layer, "grouped convolutions are not supported")
        kernel_rank = len(layer.kernel.shape)
        out = groups.new(layer.kernel.shape[-1])
        if incoming is not None:
            if isinstance(layer, CONVS) and incoming[1] != 1:
                raise _unsupported(layer, "its input channels are tiled by a Flatten")
            weight_axes[id(layer.kernel)] = [(kernel_rank - 2, *incoming)]
        weight_axes.setdefault(id(layer.kernel), []).append((kernel_rank - 1, out, 1))
        if layer.bias is not None:
            weight_axes[id(layer.bias)] = [(0, out, 1)]
        return (out, 1), layer
    if isinstance(layer, (L.BatchNormalization, L.LayerNormalization)):
        if not _normalized_axis(layer):
            raise _unsupported(layer, "only normalization over the last axis is supported")
        for variable in variables:
            if incoming is not None:
                weight_axes[id(variable)] = [(0, *incoming)]
        return incoming, None
    if isinstance(layer, L.Embedding):
        out = groups.new(layer.embeddings.shape[-1])
        weight_axes[id(layer.embeddings)] = [(1, out, 1)]
        return (out, 1), layer
    if isinstance(layer, L.Flatten):
        if incoming is None:
            return None, None
        _channels_last(layer)
        spatial = math.prod(layer.input.shape[1:-1])
        return (incoming[0], incoming[1] * spatial), None
    if isinstance(layer, PASS_THROUGH):
        if isinstance(layer, L.Softmax) and not _normalized_axis(layer):
            raise _unsupported(layer, "softmax over an axis other than the last")
        if hasattr(layer, "data_format"):
            _channels_last(layer)
        return incoming, None
    if isinstance(layer, JOINING):
        return groups.join(channels, layer), None
    if all(c is None for c in channels):
        return None, None  # e.g. Rescaling/Normalization on the raw input: nothing to permute
    raise _unsupported(layer, "it is not a layer whose units can be permuted (supported: Dense, "
                       "Conv1D/2D/3D, BatchNormalization, LayerNormalization, Embedding, Flatten, "
                       "Add/Average/Multiply/..., activations, dropout, pooling, padding)")


def permutation_spec(model):
    """Derive the permutation groups of ``model`` from its functional graph.

    Args:
        model: a functional or ``Sequential`` Keras model (no nested models,
            each layer called once).

    Returns:
        A ``PermutationSpec`` over the indices of ``weight_refs(model)``.

    Raises:
        ValueError: naming a layer the permutation cannot pass through.

    Example:
        >>> import keras
        >>> m = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8), keras.layers.Dense(2)])
        >>> spec = permutation_spec(m)
        >>> list(spec.sizes.values()), spec.axes
        ([8], {0: [(1, 0, 1)], 1: [(0, 0, 1)], 2: [(0, 0, 1)]})
    """
    groups, weight_axes, channel_of, sources = _Groups(), {}, {}, {}
    calls = own_nodes(model)
    for layer, parents in graph_operations(model):
        if isinstance(layer, keras.Model):
            raise _unsupported(layer, "nested models are not supported; build one flat model")
        if len(calls.get(id(layer), ())) > 1:
            raise _unsupported(layer, "it is called more than once (shared layer)")
        if isinstance(layer, L.InputLayer):
            channel_of[id(layer)] = None
            continue
        channels = [channel_of[id(parent)] for parent in parents]
        channel_of[id(layer)], source = _propagate(layer, channels, groups, weight_axes)
        if source is not None:
            sources.setdefault(channel_of[id(layer)][0], []).append(source)
    for tensor in model.outputs:
        channel = channel_of[id(tensor._keras_history.operation)]
        if channel is not None:
            groups.fixed.add(groups.find(channel[0]))
    return _collect(model, groups, weight_axes, sources)


def _collect(model, groups, weight_axes, sources):
    """Resolve joined groups, drop fixed ones, index by weight position."""
    live = {g for g in groups.parent if groups.find(g) == g and g not in groups.fixed}
    renumber = {g: i for i, g in enumerate(sorted(live))}
    axes = {}
    for index, ref in enumerate(weight_refs(model)):
        entries = [(axis, renumber[groups.find(g)], tile)
                   for axis, g, tile in weight_axes.get(id(ref.variable), [])
                   if groups.find(g) in live]
        if entries:
            axes[index] = entries
    merged_sources = {}
    for group, layers in sources.items():
        root = groups.find(group)
        if root in live:
            merged_sources.setdefault(renumber[root], []).extend(layers)
    sizes = {renumber[g]: groups.size[g] for g in live}
    return PermutationSpec(sizes=sizes, axes=axes, sources=merged_sources)
