"""TIES-merging: trim, elect sign, disjoint merge (Yadav et al., 2023)."""

from __future__ import annotations

import math

import numpy as np

from ensemblekit.merge.methods.base import MergeMethod, Parameter, check_number, deltas, expand


def trim(task_vectors, density):
    """Keep the top ``density`` fraction of entries by magnitude in each task vector (step 1)."""
    if density >= 1.0:
        return task_vectors
    flat = task_vectors.reshape(len(task_vectors), -1)
    keep = max(1, math.ceil(density * flat.shape[1])) if density > 0 else 0
    trimmed = np.zeros_like(flat)
    if keep:
        top = np.argpartition(-np.abs(flat), keep - 1, axis=1)[:, :keep]
        rows = np.arange(len(flat))[:, None]
        trimmed[rows, top] = flat[rows, top]
    return trimmed.reshape(task_vectors.shape)


def elect_and_merge(weighted, weights):
    """Elect each entry's sign by total mass, average the agreeing entries (steps 2-3).

    Args:
        weighted: stacked ``w_i τ_i`` (after trimming/dropping).
        weights: per-member weights (the divisor of the disjoint mean).
    """
    elected = np.sign(np.sum(weighted, axis=0))
    agrees = (np.sign(weighted) == elected) & (weighted != 0)
    numerator = np.sum(np.where(agrees, weighted, 0.0), axis=0)
    divisor = np.sum(np.where(agrees, expand(weights, weighted.ndim - 1), 0.0), axis=0)
    return np.divide(numerator, divisor, out=np.zeros_like(numerator), where=divisor != 0)


class Ties(MergeMethod):
    """``θ = θ_base + λ · disjoint_mean(elect(trim(θ_i - θ_base, density)))``.

    Yadav et al. (2023), "TIES-Merging: Resolving interference when merging
    models", Alg. 1: trim each task vector to its top-``density`` magnitudes,
    elect a sign per entry from the summed (weighted) trimmed vectors, then
    average only the entries that agree with it. ``density=0.2`` is the paper's
    ``k=20%``.
    """

    name = "ties"
    base = "required"
    parameters = {
        "density": Parameter(0.2, check_number(0.0, 1.0, low_open=True)),
        "lambda_": Parameter(1.0, check_number()),
    }

    def merge_tensor(self, tensors, base, weights, path, density=0.2, lambda_=1.0):
        trimmed = trim(deltas(tensors, base), density)
        weighted = expand(weights, base.ndim) * trimmed
        return base + lambda_ * elect_and_merge(weighted, weights)
