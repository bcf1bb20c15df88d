"""Pruning for Keras 3 models: magnitude masks, structural channels, ensemble members.

- :func:`magnitude`, :class:`PolynomialDecay`, :class:`ConstantSparsity`,
  :class:`PruningCallback`, :func:`strip`: unstructured / N:M pruning that you
  fine-tune through (zeros in dense kernels: smaller zipped files, not faster).
- :func:`channels`: structural pruning that removes filters/units (and every
  channel coupled to them) so the model is physically smaller and faster.
- :func:`select_members`: greedy selection of the ensemble members to keep under a budget.
- :func:`report`: parameters, zeros, MACs, zipped size, latency, accuracy before/after.

Example:
    >>> import keras
    >>> import ensemblekit as ek
    >>> model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16), keras.layers.Dense(3)])
    >>> plain = ek.prune.strip(ek.prune.magnitude(model, sparsity=0.5, scope="layer"))
    >>> [int((keras.ops.convert_to_numpy(layer.kernel) == 0).sum()) for layer in plain.layers]
    [64, 24]
    >>> ek.prune.channels(model, ratio=0.5).count_params()  # 8 of 16 hidden units removed
    99
"""

from ensemblekit.prune.channels import ChannelGroup, ChannelReport, channels
from ensemblekit.prune.magnitude import (
    ConstantSparsity,
    PolynomialDecay,
    PruningCallback,
    magnitude,
    strip,
)
from ensemblekit.prune.members import select_members
from ensemblekit.prune.report import report

__all__ = [
    "ChannelGroup",
    "ChannelReport",
    "ConstantSparsity",
    "PolynomialDecay",
    "PruningCallback",
    "channels",
    "magnitude",
    "select_members",
    "report",
    "strip",
]
