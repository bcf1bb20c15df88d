"""Merge methods over tensors, one module each, looked up by name in ``registry``."""

from ensemblekit.merge.methods.base import MergeMethod, Parameter, resolve_per_layer
from ensemblekit.merge.methods.registry import METHODS, get_method

__all__ = ["METHODS", "MergeMethod", "Parameter", "get_method", "resolve_per_layer"]
