"""The loss barrier on the linear path between two models: can they be averaged?

For models ``A`` and ``B`` of one architecture, the path ``θ_t = (1-t) θ_A + t θ_B``
is built with ``merge([A, B], "linear", weights=[1-t, t])`` at a few points
``t``; the barrier is how far the loss along it rises above the straight line
between the endpoints' losses (Frankle et al., 2020, "Linear Mode
Connectivity and the Lottery Ticket Hypothesis", Def. 1; Ainsworth et al.,
2022, "Git Re-Basin", Sec. 2, after weight matching):

    barrier = max_t [L(θ_t) - ((1-t) L(θ_A) + t L(θ_B))]

with ``L`` the task's loss on ``(x, y)``: the mean negative log-likelihood
(nats) of a multiclass (softmax) or binary (sigmoid, binary cross-entropy)
classifier, the mean per-label binary cross-entropy of a multilabel one (each
label's Bernoulli NLL, averaged over labels), the mean squared error of a
regressor. Near 0: the two sit in one basin and averaging their weights works;
large: align first (``ek.align``) or ensemble their outputs instead.
"""

from __future__ import annotations

import math
import typing

import keras
import numpy as np

from ensemblekit import metrics
from ensemblekit._data import check_reiterable, collect
from ensemblekit._graph import iter_layers
from ensemblekit._outputs import as_probs, check_task, detect_output_kind, detect_task
from ensemblekit._validate import check_targets

POINTS = (0.0, 0.25, 0.5, 0.75, 1.0)
# The loss along the path, per task: NLL (nats) of classifiers (per label, averaged, for
# multilabel ones), MSE of regressors.
BARRIER_LOSSES = {"multiclass": "nll", "binary": "nll", "multilabel": "nll", "regression": "mse"}


class LossBarrier(typing.NamedTuple):
    """What :func:`loss_barrier` measured: ``barrier`` and ``path`` (the loss at each ``t``) in the
    task's loss (``BARRIER_LOSSES``: NLL in nats, or MSE), and ``t``."""

    barrier: float
    t: tuple
    path: list


def has_batchnorm(model):
    """Whether ``model`` (nested models included) holds a ``BatchNormalization`` layer.

    Example:
        >>> has_batchnorm(keras.Sequential([keras.Input((2,)), keras.layers.BatchNormalization()]))
        True
    """
    return any(isinstance(layer, keras.layers.BatchNormalization) for _, layer in iter_layers(model))


def _check_points(points):
    try:
        values = tuple(float(t) for t in points)
    except (TypeError, ValueError):
        raise TypeError(f"points must be a sequence of numbers in [0, 1], got {points!r}.") from None
    if (len(values) < 3 or values[0] != 0.0 or values[-1] != 1.0 or list(values) != sorted(set(values))
            or not all(math.isfinite(t) for t in values)):
        raise ValueError(
            f"points must rise strictly from 0 to 1 with at least one point between, got {points!r}.")
    return values


def _loss(model, x, y, task, kind, batch_size):
    """Mean loss of ``model`` on ``(x, y)``, in one pass over any data (``ensemblekit._data``): the
    labels of each pass go with that pass's outputs, so a reshuffling dataset scores right.

    Multiclass: NLL of the softmax probabilities; binary: binary cross-entropy of the
    sigmoid probability; multilabel: the binary cross-entropy of every label, averaged
    (each label has one value per sample, so this is also the mean of the per-label means);
    regression: mean squared error of the values.
    """
    data = collect([model], x, y, batch_size=batch_size, function="loss_barrier", needs_labels=True)
    return path_loss(data.outputs[0], data.y, model, task, kind)


def path_loss(outputs, y, model, task, kind):
    """:func:`_loss` of ``model`` from its raw ``outputs`` on data labelled ``y``."""
    outputs = np.asarray(outputs[0] if isinstance(outputs, (list, tuple)) else outputs, dtype="float64")
    y = check_targets(y, len(outputs), model.output_shape[1:], task, param="y")
    if task == "multiclass":
        return metrics.nll(as_probs(outputs, model, kind), y)
    if task in ("binary", "multilabel"):
        p = outputs if kind == "probs" else 1.0 / (1.0 + np.exp(-outputs))
        return metrics.binary_nll(p, y)
    return float(np.mean((outputs.reshape(y.shape) - y) ** 2))


def _barrier_task(model, task):
    """The task given, or detected from ``model`` (every task has a loss in ``BARRIER_LOSSES``)."""
    return check_task(task)[0] or detect_task(model, label=f"loss_barrier: model {model.name!r}")


def loss_barrier(model_a, model_b, x, y=None, points=POINTS, reset_bn_data=None, output_kind=None,
                 batch_size=None, task=None):
    """The loss barrier between two models on ``(x, y)``, and the loss along the path.

    Each point ``t`` of ``points`` is the model
    ``merge([model_a, model_b], "linear", weights=[1-t, t])``; its mean loss on
    ``(x, y)`` is one entry of ``path``: NLL in nats for classifiers (binary
    cross-entropy for one sigmoid unit, its mean over labels for several),
    mean squared error for regressors. The barrier is
    ``max_t [path(t) - ((1-t) path(0) + t path(1))]`` (Frankle et al., 2020).
    Two copies of one model have barrier 0; independently trained models
    usually have a positive one, which ``ek.align`` lowers.

    Args:
        model_a, model_b: models of one architecture: classifiers (``(batch, classes)``,
            one sigmoid unit, or several for multilabel) or regressors.
        x, y: data to measure the loss on, read once per point (arrays, a ``tf.data.Dataset``
            or ``keras.utils.PyDataset`` of ``(x, y)`` with ``y=None``; re-iterable) (labels as integers or one-hot; 0/1 for
            binary; 0/1 of shape ``(n, labels)`` for multilabel; values for regression);
            use held-out data.
        points: the ``t`` values, rising from 0 to 1 with at least one between.
        reset_bn_data: inputs for ``ek.reset_bn``. When given and the models hold
            BatchNorm, every point — the endpoints too — gets its statistics
            recomputed on it, so the path compares models whose statistics were
            computed alike (averaged running statistics do not describe averaged
            weights). Ignored for models without BatchNorm.
        output_kind: ``"logits"``/``"probs"`` (default: detected from ``model_a``).
        batch_size: samples per forward pass.
        task: ``"multiclass"``, ``"binary"``, ``"multilabel"`` or ``"regression"``
            (``None``/``"auto"``: detected from ``model_a``; a linear one-unit output,
            or multilabel logits, needs it).

    Returns:
        A :class:`LossBarrier` ``(barrier, t, path)``.

    Example:
        >>> import keras, numpy as np
        >>> from ensemblekit.merge import loss_barrier
        >>> keras.utils.set_random_seed(0)
        >>> a = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, "relu"), keras.layers.Dense(3)])
        >>> b = keras.models.clone_model(a)
        >>> x, y = np.random.default_rng(0).normal(size=(32, 4)), np.arange(32) % 3
        >>> result = loss_barrier(a, a, x, y)
        >>> abs(result.barrier) < 1e-6, result.t
        (True, (0.0, 0.25, 0.5, 0.75, 1.0))
        >>> loss_barrier(a, b, x, y).barrier > 0  # two different initialisations
        True
        >>> r = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
        >>> loss_barrier(r, r, x, x[:, 0], task="regression").barrier  # MSE along the path
        0.0
    """
    t_values = _check_points(points)
    check_reiterable(x, "loss_barrier")
    task = _barrier_task(model_a, task)
    return measure_path(model_a, model_b, x, y, t_values, reset_bn_data, task,
                        output_kind or detect_output_kind(model_a), batch_size)


def measure_path(model_a, model_b, x, y, t_values, reset_bn_data, task, kind, batch_size=None, ends=None):
    """:func:`loss_barrier` with checked arguments. ``ends``: the endpoints' losses ``(L(a), L(b))``
    when the caller knows them already (``ek.advise``, from the members' one pass); they are used
    only where the endpoints are the models themselves (no BatchNorm reset)."""
    from ensemblekit.merge.bn import reset_bn
    from ensemblekit.merge.core import merge

    reset = reset_bn_data is not None and has_batchnorm(model_a)
    path = []
    for t in t_values:
        if not reset and t in (0.0, 1.0):
            if ends is not None:
                path.append(float(ends[0] if t == 0.0 else ends[1]))
                continue
            model = model_a if t == 0.0 else model_b
        else:
            model = merge([model_a, model_b], "linear", weights=[1 - t, t], name="barrier_point")
            if reset:
                reset_bn(model, reset_bn_data)
        path.append(_loss(model, x, y, task, kind, batch_size))
    barrier = max(loss - ((1 - t) * path[0] + t * path[-1]) for t, loss in zip(t_values, path))
    return LossBarrier(float(barrier), t_values, path)


__all__ = ["BARRIER_LOSSES", "POINTS", "LossBarrier", "has_batchnorm", "loss_barrier"]
