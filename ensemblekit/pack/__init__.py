"""Weight concatenation: K members of one architecture become ONE wide model.

``ek.pack(models)`` (this package is callable: it runs :func:`pack`) returns one
``keras.Model`` whose grouped layers (``ensemblekit.pack.layers``) hold all K
members' weights and compute every member exactly, so it equals
``ek.ensemble(models)``; ``ek.pack.unpack`` gives the members back. Run it with
``ek.compile_for_inference`` (``ensemblekit.inference``) for one compiled call.

Example:
    >>> import keras, numpy as np
    >>> import ensemblekit as ek
    >>> members = [keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)]) for _ in range(2)]
    >>> packed = ek.pack(members)
    >>> [type(layer).__name__ for layer in packed.layers[1:]]
    ['GroupedDense', 'PackedOutput']
"""

from ensemblekit._callable import make_callable
from ensemblekit.pack.build import pack, unpack
from ensemblekit.pack.layers import (
    GroupedBatchNormalization,
    GroupedConv,
    GroupedDense,
    GroupedDepthwiseConv,
    GroupedLayerNormalization,
    GroupedPatchEmbedding,
    GroupedScale,
    GroupedSeparableConv,
    GroupedTransformerEncoder,
    MemberBroadcast,
    MemberChannels,
    MemberConstants,
    MemberFlatten,
    PackedOutput,
)

__all__ = [
    "GroupedBatchNormalization",
    "GroupedConv",
    "GroupedDense",
    "GroupedDepthwiseConv",
    "GroupedLayerNormalization",
    "GroupedPatchEmbedding",
    "GroupedScale",
    "GroupedSeparableConv",
    "GroupedTransformerEncoder",
    "MemberBroadcast",
    "MemberChannels",
    "MemberConstants",
    "MemberFlatten",
    "PackedOutput",
    "pack",
    "unpack",
]

make_callable(__name__, pack)
