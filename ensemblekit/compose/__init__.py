"""Output-level composition: ensembles, stacking, fusion, weights, selection, calibration."""

from ensemblekit._outputs import detect_output_kind
from ensemblekit.compose.ensemble import ensemble
from ensemblekit.compose.fuse import fuse, unfreeze
from ensemblekit.compose.stack import stack
from ensemblekit.compose.views import CenterCrop, Flip, Shift, tta
from ensemblekit.compose.weights import calibrate, optimize_weights, select

__all__ = ["calibrate", "CenterCrop", "detect_output_kind", "ensemble", "Flip", "fuse",
           "optimize_weights", "select", "Shift", "stack", "tta", "unfreeze"]
