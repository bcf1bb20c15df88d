"""Linear merge: the (weighted) model soup (Wortsman et al., 2022, "Model soups")."""

from __future__ import annotations

import numpy as np

from ensemblekit.merge.methods.base import MergeMethod, Parameter, check_bool, expand


class Linear(MergeMethod):
    """``θ = Σ_i w_i θ_i / Σ_i w_i`` (``normalize=False``: no division).

    The uniform soup of Wortsman et al. (2022), Eq. 1; mergekit's ``linear``.
    """

    name = "linear"
    parameters = {"normalize": Parameter(True, check_bool)}

    def merge_tensor(self, tensors, base, weights, path, normalize=True):
        stacked = np.stack(tensors)
        total = np.sum(expand(weights, stacked.ndim - 1) * stacked, axis=0)
        if normalize:
            weight_sum = float(np.sum(weights))
            if weight_sum == 0:
                raise ValueError(f"weights for {path!r} sum to zero; linear merge cannot normalize.")
            total = total / weight_sum
        return total
