"""Spherical linear interpolation of two models (Shoemake, 1985; as in mergekit)."""

from __future__ import annotations

import numpy as np

from ensemblekit.merge.methods.base import MergeMethod, Parameter, check_number

_COLINEAR = 0.9995


def slerp(v0, v1, t):
    """Interpolate ``v0`` → ``v1`` along the great circle through their directions.

    ``θ = sin((1-t)Ω)/sin Ω · v0 + sin(tΩ)/sin Ω · v1`` with ``cos Ω`` the cosine
    similarity of the flattened tensors; nearly colinear (or zero) tensors
    fall back to linear interpolation.

    Example:
        >>> import numpy as np
        >>> np.round(slerp(np.array([1.0, 0.0]), np.array([0.0, 1.0]), 0.5), 4)
        array([0.7071, 0.7071])
    """
    norm0, norm1 = np.linalg.norm(v0), np.linalg.norm(v1)
    if norm0 == 0 or norm1 == 0:
        return (1 - t) * v0 + t * v1
    cosine = float(np.clip(np.sum(v0 * v1) / (norm0 * norm1), -1.0, 1.0))
    if abs(cosine) > _COLINEAR:
        return (1 - t) * v0 + t * v1
    omega = np.arccos(cosine)
    return (np.sin((1 - t) * omega) * v0 + np.sin(t * omega) * v1) / np.sin(omega)


class Slerp(MergeMethod):
    """Slerp between exactly two models: ``t=0`` gives the first, ``t=1`` the second."""

    name = "slerp"
    n_models = 2
    uses_weights = False
    parameters = {"t": Parameter(0.5, check_number(0.0, 1.0))}

    def merge_tensor(self, tensors, base, weights, path, t=0.5):
        return slerp(tensors[0], tensors[1], t)

    def merge_statistic(self, tensors, weights, path, t=0.5):
        return (1 - t) * tensors[0] + t * tensors[1]
