"""DARE: drop and rescale task vectors (Yu et al., 2024, "Language models are Super Mario")."""

from __future__ import annotations

import zlib

import numpy as np

from ensemblekit.merge.methods.base import (
    MergeMethod,
    Parameter,
    check_bool,
    check_int,
    check_number,
    deltas,
    expand,
)
from ensemblekit.merge.methods.ties import elect_and_merge


def drop_and_rescale(task_vectors, density, rng):
    """Keep each entry with probability ``density`` and divide the kept ones by it (Eq. 2)."""
    if density >= 1.0:
        return task_vectors
    keep = rng.random(task_vectors.shape) < density
    return np.where(keep, task_vectors / density, 0.0)


class Dare(MergeMethod):
    """``θ = θ_base + λ Σ_i w_i DARE(θ_i - θ_base)``; with ``sign_consensus`` a TIES merge.

    Yu et al. (2024), Sec. 3: each task-vector entry is dropped with
    probability ``1 - density`` and the survivors rescaled by ``1 / density``,
    which keeps the expected task vector. The dropped vectors are then added
    (task arithmetic; mergekit's ``dare_linear``) or, with
    ``sign_consensus=True``, sign-elected and disjointly averaged as in TIES
    (mergekit's ``dare_ties``). The drop pattern depends on ``seed`` and the
    weight path only, so a merge is reproducible.
    """

    name = "dare"
    base = "required"
    parameters = {
        "density": Parameter(0.5, check_number(0.0, 1.0, low_open=True)),
        "lambda_": Parameter(1.0, check_number()),
        "seed": Parameter(0, check_int, per_layer=False),
        "sign_consensus": Parameter(False, check_bool),
        "normalize": Parameter(False, check_bool),
    }

    def tensor_params(self, params):
        return dict(params)

    def merge_tensor(self, tensors, base, weights, path, density=0.5, lambda_=1.0, seed=0,
                     sign_consensus=False, normalize=False):
        rng = np.random.default_rng([seed, zlib.crc32(path.encode())])
        dropped = drop_and_rescale(deltas(tensors, base), density, rng)
        weighted = expand(weights, base.ndim) * dropped
        if sign_consensus:
            return base + lambda_ * elect_and_merge(weighted, weights)
        combined = np.sum(weighted, axis=0)
        if normalize:
            combined = combined / float(np.sum(weights))
        return base + lambda_ * combined


class DareTies(Dare):
    """DARE with TIES sign consensus: mergekit's ``dare_ties``."""

    name = "dare_ties"
    parameters = {**Dare.parameters, "sign_consensus": Parameter(True, check_bool)}
