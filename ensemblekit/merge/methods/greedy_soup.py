"""Greedy soup (Wortsman et al., 2022, "Model soups", Recipe 1)."""

from __future__ import annotations

import keras
import numpy as np

from ensemblekit._data import check_reiterable, collect
from ensemblekit._outputs import as_probs
from ensemblekit.merge.methods.base import Parameter, check_any, check_int
from ensemblekit.merge.methods.linear import Linear
from ensemblekit.metrics import accuracy


def _accuracy(model, validation_data, batch_size):
    """Accuracy of ``model`` on ``validation_data``, in one pass (its labels with its outputs)."""
    x, y = validation_data if isinstance(validation_data, tuple) else (validation_data, None)
    data = collect([model], x, y, batch_size=batch_size, function="merge(method='greedy_soup')",
                   argument="validation_data", needs_labels=True)
    return accuracy(as_probs(data.outputs[0], model), np.asarray(data.y).reshape(-1))


class GreedySoup(Linear):
    """Uniform soup of the members chosen greedily on validation accuracy.

    Members are sorted by validation accuracy; starting from the best, each
    next member is added to the soup if the uniform average with it is at
    least as accurate on ``validation_data`` as without it. The result is
    never worse on the validation set than the best member.

    ``validation_data`` is ``(x, y)`` (arrays) or a dataset of ``(x, y)``
    (``tf.data``, ``PyDataset``, or a function returning a fresh generator): it
    is read once per candidate soup, so a one-shot generator is refused.
    """

    name = "greedy_soup"
    uses_weights = False
    streamable = False
    parameters = {
        "validation_data": Parameter(None, check_any, per_layer=False),
        "batch_size": Parameter(256, check_int, per_layer=False),
    }

    def check_params(self, params):
        checked = super().check_params(params)
        data = checked["validation_data"]
        if data is None:
            raise ValueError("merge method 'greedy_soup' needs validation_data= ((x, y) or a dataset "
                             "of (x, y)): the held-out set the soup is chosen on.")
        if isinstance(data, list) or (isinstance(data, tuple) and len(data) != 2):
            raise ValueError("merge method 'greedy_soup': validation_data must be a tuple (x, y) or a "
                             f"dataset of (x, y), got a {type(data).__name__} of {len(data)}.")
        check_reiterable(data, "merge(method='greedy_soup')", "validation_data")
        return checked

    def tensor_params(self, params):
        return {"normalize": True}

    def prepare(self, members, base, weights, params, merge_fn, verbose=0):
        """Choose the soup's ingredients; returns them with uniform weights."""
        data, batch_size = params["validation_data"], params["batch_size"]
        scores = [_accuracy(m, data, batch_size) for m in members]
        order = np.argsort(scores, kind="stable")[::-1]
        chosen, best = [int(order[0])], scores[order[0]]
        progress = keras.utils.Progbar(len(order) - 1, verbose=verbose)
        for index in order[1:]:
            candidate = merge_fn([members[i] for i in chosen + [int(index)]])
            score = _accuracy(candidate, data, batch_size)
            if score >= best:
                chosen.append(int(index))
                best = score
            progress.add(1)
        self.ingredients_ = sorted(chosen)
        self.member_scores_ = [float(s) for s in scores]
        return [members[i] for i in self.ingredients_], np.ones(len(self.ingredients_))
