"""Which axes of which weights share a permutation, read off the channel-coupling graph.

Permuting the hidden units of a layer (and, consistently, every weight axis
that reads them) leaves the network's function unchanged. The groups of units
that must move together are the coupled channel groups of
``ensemblekit._channels`` (DepGraph, Fang et al., 2023): Dense/Conv/
SeparableConv/Embedding units, carried through BN/LN, depthwise convolutions,
activations, pooling, padding, size-1 ``Reshape``, ``LayerScale`` and
``Normalization``, united by residual ``Add``-like merges and
squeeze-and-excitation gates, joined by ``Concatenate`` and tiled by
``Flatten``; with ``nested=True``, followed through nested models. In a
transformer block (keras-hub's ViT) whole heads are one group, the units
within a head two more (query/key and value/output, the same permutation in
every head), the MLP units another; the residual stream is one group across
the patch embedding, every block and the final LayerNormalization. Groups
reaching a model input or output are never permuted. This replaces the hand-written
per-architecture specs of Git Re-Basin (Ainsworth et al., 2022, Sec. 3 and
App. A).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from ensemblekit._channels import channel_graph
from ensemblekit._graph import weight_refs


@dataclasses.dataclass
class PermutationSpec:
    """The permutation groups of a model.

    Attributes:
        sizes: ``{group: number of units}``.
        axes: ``{weight index: [(axis, group, tile), ...]}``: ``group``
            occurs ``tile`` times along ``axis`` (``tile > 1`` after a
            ``Flatten``).
        sources: ``{group: [layers whose outputs carry it untiled]}`` (for
            activation matching).
        positions: ``{(weight index, axis, group): (tile, size) index array}``:
            where unit ``c`` of occurrence ``s`` lies along the axis; without an
            entry it is ``s * size + c`` (one group, channels-last flattening).

    Example:
        >>> import keras
        >>> m = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3), keras.layers.Dense(2)])
        >>> permutation_spec(m).weights_of(0)
        [(0, 1, 1), (1, 0, 1), (2, 0, 1)]
    """

    sizes: dict
    axes: dict
    sources: dict
    positions: dict = dataclasses.field(default_factory=dict, repr=False)

    def weights_of(self, group):
        """``[(weight index, axis, tile)]`` for every weight axis in ``group``."""
        return [(w, axis, tile) for w, entries in self.axes.items()
                for axis, g, tile in entries if g == group]

    def unit_positions(self, index, axis, group):
        """``(tile, size)`` indices of ``group``'s units along ``axis`` of weight ``index``."""
        if (index, axis, group) in self.positions:
            return self.positions[(index, axis, group)]
        tile = next(t for a, g, t in self.axes[index] if (a, g) == (axis, group))
        size = self.sizes[group]
        return np.arange(tile)[:, None] * size + np.arange(size)[None, :]


def _unsupported(model, layer, why):
    return ValueError(f"Model {model.name!r}: align cannot permute through layer {layer.name!r} "
                      f"({type(layer).__name__}): {why}.")


def _check_permutable(graph, nested):
    """ValueError naming the first nested model (unless ``nested``), or layer that fixes a group of units."""
    inner = graph.records("nested")
    if inner and not nested:
        raise _unsupported(graph.model, inner[0].layer, "nested models are not supported unless "
                           "permutation_spec(model, nested=True); or build one flat model")
    for root in graph.openers():
        fixed = graph.fixed(root)
        if fixed is not None and fixed.layer is not None:
            raise _unsupported(graph.model, fixed.layer, fixed.why)


def permutation_spec(model, nested=False):
    """Derive the permutation groups of ``model`` from its channel-coupling graph.

    Args:
        model: a functional or ``Sequential`` Keras model (each layer called once).
        nested: follow the units through nested functional/``Sequential``
            models (a transfer-learning base, ConvNeXt's stem), whose
            weight axes then point at the nested layers' variables
            (``weight_refs`` lists them), and ``sources`` may hold nested
            layers. ``False`` (the default, what ``align`` asks for while its
            activation matching finds layers by name in the outer model)
            raises a ``ValueError`` naming the first nested model.

    Returns:
        A ``PermutationSpec`` over the indices of ``weight_refs(model)``.

    Raises:
        ValueError: naming the model and a layer (and its class) the
            permutation cannot pass through.

    Example:
        >>> import keras
        >>> m = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8), keras.layers.Dense(2)])
        >>> spec = permutation_spec(m)
        >>> list(spec.sizes.values()), spec.axes
        ([8], {0: [(1, 0, 1)], 1: [(0, 0, 1)], 2: [(0, 0, 1)]})
    """
    graph = channel_graph(model)
    _check_permutable(graph, nested)
    live = [root for root in graph.roots() if graph.fixed(root) is None]
    number = {root: i for i, root in enumerate(live)}
    index_of = {id(ref.variable): i for i, ref in enumerate(weight_refs(model))}
    axes, positions = {}, {}
    for record in graph.records():
        for weight in record.weights:
            layout = record.layout(weight.side)
            index = index_of[id(weight.variable)]
            for root in dict.fromkeys(graph.find(g) for g in layout):
                if root not in number:
                    continue
                units = graph.unit_positions(layout, root)
                axes.setdefault(index, []).append((weight.axis, number[root], len(units)))
                if len(layout) != len(units):  # other groups share the axis (Concatenate)
                    positions[(index, weight.axis, number[root])] = units
    sources = {number[root]: layers for root, layers in graph.openers().items() if root in number}
    sizes = {number[root]: graph.size(root) for root in live}
    return PermutationSpec(sizes=sizes, axes=dict(sorted(axes.items())), sources=sources,
                           positions=positions)


__all__ = ["PermutationSpec", "permutation_spec"]
