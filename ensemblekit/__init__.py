"""ensemblekit: compose several trained Keras 3 models into one.

Example:
    >>> import keras, numpy as np
    >>> import ensemblekit as ek
    >>> members = [keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)]) for _ in range(3)]
    >>> ek.ensemble(members).predict(np.zeros((1, 4)), verbose=0).shape
    (1, 3)
"""

from ensemblekit import advise, deploy, merge, pack, prune
from ensemblekit._data import predict
from ensemblekit._outputs import detect_output_kind
from ensemblekit.advise import Advice
from ensemblekit.compose import (
    calibrate,
    ensemble,
    fuse,
    optimize_weights,
    select,
    stack,
    tta,
    unfreeze,
)
from ensemblekit.deploy import export, serve
from ensemblekit.distill import DistillReport, distill
from ensemblekit.inference import compile_for_inference
from ensemblekit.merge import align, reset_bn
from ensemblekit.metrics import evaluate, pareto
from ensemblekit.pack import unpack
from ensemblekit.quantize import QuantizeReport, quantize

# ``ek.advise``, ``ek.merge`` and ``ek.pack`` are the packages, callable as their main
# function (``ek.merge(models, "ties")``), so ``import ensemblekit.merge.core`` still works.

__version__ = "0.1.0"

__all__ = [
    "Advice",
    "advise",
    "align",
    "calibrate",
    "compile_for_inference",
    "deploy",
    "detect_output_kind",
    "distill",
    "DistillReport",
    "ensemble",
    "evaluate",
    "export",
    "fuse",
    "merge",
    "optimize_weights",
    "pack",
    "pareto",
    "predict",
    "prune",
    "quantize",
    "QuantizeReport",
    "reset_bn",
    "select",
    "serve",
    "stack",
    "tta",
    "unfreeze",
    "unpack",
]
