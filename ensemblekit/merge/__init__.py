"""Weight-space merging: ``merge`` models into one, ``align`` their units first, ``reset_bn`` after.

This package is callable: ``ek.merge(models, method)`` runs :func:`merge`.

Example:
    >>> import keras, numpy as np
    >>> from ensemblekit.merge import merge
    >>> a = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    >>> merged = merge([a, keras.models.clone_model(a)], method="linear")
    >>> merged.count_params()
    8
"""

from ensemblekit._callable import make_callable
from ensemblekit.merge.align import align
from ensemblekit.merge.barrier import LossBarrier, loss_barrier
from ensemblekit.merge.bn import reset_bn
from ensemblekit.merge.core import MergeReport, merge
from ensemblekit.merge.methods import METHODS

__all__ = ["METHODS", "LossBarrier", "MergeReport", "align", "loss_barrier", "merge", "reset_bn"]

make_callable(__name__, merge)
