"""Task arithmetic (Ilharco et al., 2023, "Editing models with task arithmetic")."""

from __future__ import annotations

import numpy as np

from ensemblekit.merge.methods.base import (
    MergeMethod,
    Parameter,
    check_bool,
    check_number,
    deltas,
    expand,
)


class TaskArithmetic(MergeMethod):
    """``θ = θ_base + λ Σ_i w_i (θ_i - θ_base)`` (divided by ``Σ w_i`` if ``normalize``).

    Task vectors ``τ_i = θ_i - θ_base`` are added to the base (Ilharco et al.,
    2023, Sec. 2); negative weights negate a task.
    """

    name = "task_arithmetic"
    base = "required"
    parameters = {
        "lambda_": Parameter(1.0, check_number()),
        "normalize": Parameter(False, check_bool),
    }

    def merge_tensor(self, tensors, base, weights, path, lambda_=1.0, normalize=False):
        task_vectors = deltas(tensors, base)
        combined = np.sum(expand(weights, base.ndim) * task_vectors, axis=0)
        if normalize:
            combined = combined / float(np.sum(weights))
        return base + lambda_ * combined
