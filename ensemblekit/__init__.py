"""ensemblekit: compose several trained Keras 3 models into one.

Example:
    >>> import keras, numpy as np
    >>> import ensemblekit as ek
    >>> members = [keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)]) for _ in range(3)]
    >>> ek.ensemble(members).predict(np.zeros((1, 4)), verbose=0).shape
    (1, 3)
"""

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
from ensemblekit.metrics import evaluate

__version__ = "0.1.0"

__all__ = [
    "calibrate",
    "detect_output_kind",
    "ensemble",
    "evaluate",
    "fuse",
    "optimize_weights",
    "select",
    "stack",
    "unfreeze",
]
