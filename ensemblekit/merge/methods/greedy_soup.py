"""Greedy soup (Wortsman et al., 2022, "Model soups", Recipe 1)."""

from __future__ import annotations

import keras
import numpy as np

from ensemblekit._data import predict
from ensemblekit.merge.methods.base import Parameter, check_any, check_int
from ensemblekit.merge.methods.linear import Linear
from ensemblekit.metrics import accuracy


def _accuracy(model, x, y, batch_size):
    return accuracy(predict(model, x, batch_size), y)


class GreedySoup(Linear):
    """Uniform soup of the members chosen greedily on validation accuracy.

    Members are sorted by validation accuracy; starting from the best, each
    next member is added to the soup if the uniform average with it is at
    least as accurate on ``(x_val, y_val)`` as without it. The result is
    never worse on the validation set than the best member.
    """

    name = "greedy_soup"
    uses_weights = False
    streamable = False
    parameters = {
        "x_val": Parameter(None, check_any, per_layer=False),
        "y_val": Parameter(None, check_any, per_layer=False),
        "batch_size": Parameter(256, check_int, per_layer=False),
    }

    def check_params(self, params):
        checked = super().check_params(params)
        for name in ("x_val", "y_val"):
            if checked[name] is None:
                raise ValueError(f"merge method 'greedy_soup' needs {name}= (a validation set).")
        if len(checked["x_val"]) != len(checked["y_val"]):
            raise ValueError(
                f"x_val has {len(checked['x_val'])} samples but y_val has {len(checked['y_val'])}."
            )
        return checked

    def tensor_params(self, params):
        return {"normalize": True}

    def prepare(self, members, base, weights, params, merge_fn, verbose=0):
        """Choose the soup's ingredients; returns them with uniform weights."""
        x_val, y_val, batch_size = params["x_val"], params["y_val"], params["batch_size"]
        scores = [_accuracy(m, x_val, y_val, batch_size) for m in members]
        order = np.argsort(scores, kind="stable")[::-1]
        chosen, best = [int(order[0])], scores[order[0]]
        progress = keras.utils.Progbar(len(order) - 1, verbose=verbose)
        for index in order[1:]:
            candidate = merge_fn([members[i] for i in chosen + [int(index)]])
            score = _accuracy(candidate, x_val, y_val, batch_size)
            if score >= best:
                chosen.append(int(index))
                best = score
            progress.add(1)
        self.ingredients_ = sorted(chosen)
        self.member_scores_ = [float(s) for s in scores]
        return [members[i] for i in self.ingredients_], np.ones(len(self.ingredients_))
