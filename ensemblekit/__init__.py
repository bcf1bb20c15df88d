"""ensemblekit: compose several trained Keras 3 models into one.

Example:
    >>> import keras, numpy as np
    >>> import ensemblekit as ek
    >>> members = [keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)]) for _ in range(3)]
    >>> ek.ensemble(members).predict(np.zeros((1, 4)), verbose=0).shape
    (1, 3)
"""

from ensemblekit import deploy, prune
from ensemblekit.advise import Advice, advise
from ensemblekit.compose import (
    calibrate,
    detect_output_kind,
    ensemble,
    fuse,
    optimize_weights,
    select,
    stack,
    unfreeze,
)
from ensemblekit.deploy import export, serve
from ensemblekit.merge import align, merge, reset_bn
from ensemblekit.metrics import evaluate, pareto
from ensemblekit.pack import compile_for_inference, pack, unpack

# ``ek.merge`` and ``ek.pack`` are the functions; their modules stay importable as
# ``from ensemblekit.merge import ...`` / ``from ensemblekit.pack import ...``.

__version__ = "0.1.0"

__all__ = [
    "Advice",
    "advise",
    "align",
    "calibrate",
    "compile_for_inference",
    "deploy",
    "detect_output_kind",
    "ensemble",
    "evaluate",
    "export",
    "fuse",
    "merge",
    "optimize_weights",
    "pack",
    "pareto",
    "prune",
    "reset_bn",
    "select",
    "serve",
    "stack",
    "unfreeze",
    "unpack",
]
