"""Output-level composition: ensembles, stacking, fusion, weights, selection, calibration."""

from ensemblekit._outputs import detect_output_kind
from ensemblekit.compose.ensemble import ensemble
from ensemblekit.compose.fuse import fuse, unfreeze
from ensemblekit.compose.stack import stack
from ensemblekit.compose.weights import calibrate, optimize_weights, select

__all__ = ["calibrate", "detect_output_kind", "ensemble", "fuse", "optimize_weights", "select",
           "stack", "unfreeze"]
