"""Combining members per task: one canonical form, one reduction, one uncertainty — for every composition.

``ek.ensemble`` (a list of member outputs) and ``ek.pack`` (the members' outputs
stacked on axis 1) both reduce over members here, so they compute the same
function. Each member output is first put in its task's canonical form:

* ``"multiclass"``: log-probabilities over the last axis;
* ``"binary"`` / ``"multilabel"``: logits of each independent unit;
* ``"regression"``: the values themselves.

Regression members may also predict a variance (a second output, as in deep
ensembles); ``mixture_moments`` and ``MemberMixture`` combine (mean, variance)
pairs into the Gaussian mixture's mean and total variance.

Outputs may have any rank: ``(batch, classes)``, dense maps ``(batch, h, w, C)``
or sequences ``(batch, steps, C)`` are combined element-wise along the last axis.
"""

from __future__ import annotations

import keras
from keras import ops

from ensemblekit._outputs import TASKS, output_layers, to_log_probs

PACKAGE = "ensemblekit"
_EPSILON = 1e-7

METHODS = {
    "multiclass": ("mean", "weighted", "logit_mean", "geometric", "vote"),
    "binary": ("mean", "weighted", "logit_mean", "geometric", "vote"),
    "multilabel": ("mean", "weighted", "logit_mean", "geometric", "vote"),
    "regression": ("mean", "weighted", "median", "trimmed_mean"),
}
UNCERTAINTY = {
    "multiclass": ("predictive_entropy", "expected_entropy", "mutual_information", "disagreement"),
    "binary": ("predictive_entropy", "expected_entropy", "mutual_information", "disagreement"),
    "multilabel": ("predictive_entropy", "expected_entropy", "mutual_information", "disagreement"),
    "regression": ("std",),
}
# What a member's variance output holds (``variance_kind=``), and how it becomes a variance.
VARIANCE_KINDS = ("variance", "log_variance", "std")
MIXTURE_METHODS = ("mean", "weighted")
MIXTURE_UNCERTAINTY = ("std", "aleatoric", "epistemic")


def check_method(method, task, output="output"):
    """Raise one ``ValueError`` naming both when ``method`` makes no sense for ``task``.

    Example:
        >>> check_method("median", "regression")
        'median'
    """
    if task not in TASKS:
        raise ValueError(f"Unknown task {task!r}; expected one of {', '.join(map(repr, TASKS))}.")
    if method not in METHODS[task]:
        options = ", ".join(repr(m) for m in METHODS[task])
        raise ValueError(
            f"method {method!r} is not defined for task {task!r} ({output}); "
            f"for {task} outputs use one of {options}."
        )
    return method


def canonical(output, task, kind):
    """A member's output in its task's canonical form (see the module docstring)."""
    if task == "multiclass":
        return to_log_probs(output, kind)
    if task in ("binary", "multilabel"):
        if kind == "logits":
            return output
        p = ops.clip(output, _EPSILON, 1.0 - _EPSILON)
        return ops.log(p) - ops.log1p(-p)
    return output


def _weights(weights, count, dtype):
    if weights is None:
        weights = [1.0 / count] * count
    return ops.convert_to_tensor(weights, dtype=dtype)


def _weighted_sum(stacked, weights):
    """``Σ_k w_k stacked[:, k]`` for ``stacked`` of shape ``(batch, K, ...)``."""
    shape = [1, -1] + [1] * (len(stacked.shape) - 2)
    return ops.sum(stacked * ops.reshape(weights, shape), axis=1)


def keep_non_finite(result, stacked, task):
    """``result`` with NaN wherever a member's canonical output feeding it is non-finite.

    A combination must not turn a member's NaN into a number: sorting (``"trimmed_mean"``
    cuts it off), ``argmax`` (a vote) and clipping would. Positions are the element-wise
    ones of ``result``; for multiclass a class distribution is NaN as a whole.

    Example:
        >>> import numpy as np
        >>> stacked = np.array([[[1.0], [np.nan]], [[1.0], [2.0]]], "float32")
        >>> keras.ops.convert_to_numpy(keep_non_finite(stacked[:, 0], stacked, "regression")).ravel().tolist()
        [nan, 1.0]
    """
    bad = ops.any(ops.logical_not(ops.isfinite(stacked)), axis=1)
    if task == "multiclass":
        bad = ops.any(bad, axis=-1, keepdims=len(result.shape) == len(bad.shape))
    # Adding NaN-or-0, not where(bad, nan, result): tf2onnx turns a float select into
    # arithmetic (cond·a + (1 - cond)·b), and 0·NaN would make every row NaN.
    return result + ops.cast(ops.where(bad, float("nan"), 0.0), result.dtype)


def member_probs(stacked, task):
    """Per-member probabilities from canonical ``(batch, K, ...)`` outputs (classification)."""
    return ops.exp(stacked) if task == "multiclass" else ops.sigmoid(stacked)


def reduce_members(stacked, task, method, weights=None, trim=0.2, threshold=0.5):
    """Combine canonical member outputs ``(batch, K, ...)`` over axis 1.

    Args:
        stacked: canonical member outputs, members on axis 1.
        task: one of ``TASKS``.
        method: one of ``METHODS[task]``.
        weights: per-member weights summing to one (``None``: uniform).
        trim: fraction cut from each end by ``"trimmed_mean"``.
        threshold: the probability above which a binary/multilabel member votes "yes".

    Returns:
        Probabilities (classification) or values (regression), ``(batch, ...)``.

    Example:
        >>> import numpy as np
        >>> x = np.array([[[1.0], [2.0], [9.0]]], "float32")
        >>> keras.ops.convert_to_numpy(reduce_members(x, "regression", "median")).tolist()
        [[2.0]]
    """
    return keep_non_finite(_reduce(stacked, task, method, weights, trim, threshold), stacked, task)


def _reduce(stacked, task, method, weights, trim, threshold):
    count = stacked.shape[1]
    w = _weights(weights, count, stacked.dtype)
    if task == "regression":
        if method == "median":
            return ops.median(stacked, axis=1)
        if method == "trimmed_mean":
            cut = int(trim * count)
            kept = ops.sort(stacked, axis=1)[:, cut:count - cut]
            return ops.mean(kept, axis=1)
        return _weighted_sum(stacked, w)
    probs = member_probs(stacked, task)
    if method in ("mean", "weighted"):
        return _weighted_sum(probs, w)
    if method in ("logit_mean", "geometric"):
        mean = _weighted_sum(stacked, w)
        return ops.softmax(mean, axis=-1) if task == "multiclass" else ops.sigmoid(mean)
    return _vote(stacked, probs, task, w, threshold)


def _vote(stacked, probs, task, w, threshold):
    """Hard (weighted) vote; ties broken by the mean probability."""
    if task == "multiclass":
        decisions = ops.one_hot(ops.argmax(stacked, axis=-1), stacked.shape[-1], dtype=stacked.dtype)
    else:
        decisions = ops.cast(probs > threshold, stacked.dtype)
    votes = _weighted_sum(decisions, w)
    mean = _weighted_sum(probs, w)
    tie_break = 0.5 * ops.min(w)
    return (votes + tie_break * mean) / (1.0 + tie_break)


def _entropy(probs, task):
    """Entropy in nats: over the class axis (multiclass) or of each Bernoulli unit."""
    if task == "multiclass":
        return -ops.sum(probs * ops.log(ops.clip(probs, _EPSILON, 1.0)), axis=-1)
    p = ops.clip(probs, _EPSILON, 1.0 - _EPSILON)
    return -(p * ops.log(p) + (1.0 - p) * ops.log(1.0 - p))


def member_uncertainty(stacked, task, weights=None, threshold=0.5):
    """What the members' spread says about each prediction.

    Classification: ``predictive_entropy`` H(p̄) of the mean probabilities,
    ``expected_entropy`` Σ w_k H(p_k) (aleatoric), ``mutual_information`` their
    difference (epistemic, ≥ 0, zero when the members agree exactly) and
    ``disagreement``, the weighted fraction of members whose decision differs
    from the mean's. Multiclass reduces the class axis; binary/multilabel are
    per unit. Regression: ``std``, the members' (weighted) standard deviation.

    Args:
        stacked: canonical member outputs ``(batch, K, ...)``.
        task: one of ``TASKS``.
        weights: per-member weights summing to one (``None``: uniform).

    Returns:
        A dict of tensors, keys ``UNCERTAINTY[task]``.

    Example:
        >>> import numpy as np
        >>> same = np.log(np.full((2, 3, 4), 0.25, "float32"))
        >>> mi = member_uncertainty(same, "multiclass")["mutual_information"]
        >>> float(keras.ops.max(keras.ops.abs(mi))) < 1e-6
        True
    """
    count = stacked.shape[1]
    w = _weights(weights, count, stacked.dtype)
    if task == "regression":
        mean = _weighted_sum(stacked, w)
        variance = _weighted_sum(ops.square(stacked - ops.expand_dims(mean, 1)), w)
        return {"std": keep_non_finite(ops.sqrt(ops.maximum(variance, 0.0)), stacked, task)}
    probs = member_probs(stacked, task)
    mean = _weighted_sum(probs, w)
    predictive = _entropy(mean, task)
    expected = _weighted_sum(_entropy(probs, task), w)
    if task == "multiclass":
        differs = ops.not_equal(ops.argmax(probs, axis=-1), ops.expand_dims(ops.argmax(mean, axis=-1), 1))
    else:
        differs = ops.not_equal(probs > threshold, ops.expand_dims(mean > threshold, 1))
    values = {
        "predictive_entropy": predictive,
        "expected_entropy": expected,
        "mutual_information": ops.maximum(predictive - expected, 0.0),
        "disagreement": _weighted_sum(ops.cast(differs, stacked.dtype), w),
    }
    return {key: keep_non_finite(value, stacked, task) for key, value in values.items()}


class _MemberLayer(keras.layers.Layer):
    """Shared by ``MemberReduce`` and ``MemberUncertainty``: canonical, stacked member outputs.

    The input is either a list of the K member outputs (``ek.ensemble``) or one
    tensor with members on axis 1 (``ek.pack``); ``kinds`` has one kind per
    member (one for all, for a stacked input).
    """

    def __init__(self, task, kinds, member_weights=None, threshold=0.5, **kwargs):
        kwargs.setdefault("dtype", "float32")  # reduce over members in float32 under mixed precision
        super().__init__(**kwargs)
        if task not in TASKS:
            raise ValueError(f"{self.name}: unknown task {task!r}; expected one of {TASKS}.")
        self.task = task
        self.kinds = list(kinds)
        self.member_weights = None if member_weights is None else [float(w) for w in member_weights]
        self.threshold = float(threshold)

    def build(self, input_shape):
        if isinstance(input_shape, (list, tuple)) and input_shape and isinstance(input_shape[0], (list, tuple)):
            first = tuple(input_shape[0])
            for index, shape in enumerate(input_shape):
                if tuple(shape)[1:] != first[1:]:
                    raise ValueError(
                        f"{self.name}: member {index} outputs shape {tuple(shape)} but member 0 "
                        f"outputs {first}; every member must output the same shape."
                    )

    def stacked(self, inputs):
        if isinstance(inputs, (list, tuple)):
            return ops.stack([canonical(ops.cast(x, "float32"), self.task, k)
                              for x, k in zip(inputs, self.kinds)], axis=1)
        return canonical(ops.cast(inputs, "float32"), self.task, self.kinds[0])

    def get_config(self):
        config = super().get_config()
        config.update(task=self.task, kinds=self.kinds, member_weights=self.member_weights,
                      threshold=self.threshold)
        return config


@keras.saving.register_keras_serializable(package=PACKAGE)
class MemberStack(_MemberLayer):
    """The members' outputs in canonical form, stacked: ``(batch, K, ...)`` (for fitting on validation data)."""

    def call(self, inputs):
        return self.stacked(inputs)


@keras.saving.register_keras_serializable(package=PACKAGE)
class MemberReduce(_MemberLayer):
    """Combine member outputs of any task with one method (see ``reduce_members``).

    Args:
        task: ``"multiclass"``, ``"binary"``, ``"multilabel"`` or ``"regression"``.
        method: one of ``METHODS[task]``.
        kinds: per member, ``"logits"`` or ``"probs"`` (ignored for regression).
        member_weights: per-member weights summing to one (``None``: uniform).
        trim: fraction cut from each end by ``"trimmed_mean"``.
        threshold: binary/multilabel vote threshold.
    """

    def __init__(self, task, method, kinds, member_weights=None, trim=0.2, threshold=0.5, **kwargs):
        super().__init__(task, kinds, member_weights=member_weights, threshold=threshold, **kwargs)
        self.method = check_method(method, task, f"layer {self.name!r}")
        if not 0.0 <= trim < 0.5:
            raise ValueError(f"{self.name}: trim must be in [0, 0.5), got {trim}.")
        self.trim = float(trim)

    @property
    def output_kind(self):
        return None if self.task == "regression" else "probs"

    def call(self, inputs):
        return reduce_members(self.stacked(inputs), self.task, self.method, self.member_weights,
                              trim=self.trim, threshold=self.threshold)

    def compute_output_shape(self, input_shape):
        if isinstance(input_shape, (list, tuple)) and isinstance(input_shape[0], (list, tuple)):
            return tuple(input_shape[0])
        return (input_shape[0], *input_shape[2:])

    def get_config(self):
        config = super().get_config()
        config.update(method=self.method, trim=self.trim)
        return config


@keras.saving.register_keras_serializable(package=PACKAGE)
class MemberUncertainty(_MemberLayer):
    """The members' uncertainty outputs (see ``member_uncertainty``), as a dict of tensors.

    Args: as ``MemberReduce`` without ``method`` and ``trim``.
    """

    def call(self, inputs):
        return member_uncertainty(self.stacked(inputs), self.task, self.member_weights,
                                  threshold=self.threshold)


# --- members that predict a variance: the Gaussian mixture ---------------------------------------

def to_variance(output, kind):
    """A member's variance output as a variance: ``"variance"`` (clipped at 0), ``exp`` of a
    ``"log_variance"``, or the square of a ``"std"``.

    Example:
        >>> import numpy as np
        >>> keras.ops.convert_to_numpy(to_variance(np.log(np.array([4.0], "float32")), "log_variance")).round(4)
        array([4.], dtype=float32)
    """
    if kind == "log_variance":
        return ops.exp(output)
    if kind == "std":
        return ops.square(output)
    return ops.maximum(output, 0.0)


def mixture_moments(means, variances, weights=None):
    """Mean and variances of the (weighted) Gaussian mixture ``Σ_k w_k N(μ_k, σ_k²)``.

    Deep ensembles (Lakshminarayanan et al., 2017, eq. in §2.4): the mixture's mean
    is ``μ = Σ w_k μ_k`` and its total variance
    ``Σ w_k (σ_k² + μ_k²) - μ²``, computed as the sum of the aleatoric part
    ``Σ w_k σ_k²`` (what the members expect) and the epistemic part
    ``Σ w_k (μ_k - μ)²`` (how much they disagree), which is the same number
    without the cancellation.

    Args:
        means: member means ``(batch, K, ...)``.
        variances: member variances, the same shape.
        weights: per-member weights summing to one (``None``: uniform).

    Returns:
        ``{"prediction", "variance", "std", "aleatoric", "epistemic"}``; ``std`` is the
        members' standard deviation ``sqrt(epistemic)``, as for plain regressors.

    Example:
        >>> import numpy as np
        >>> mu, var = np.array([[[0.0], [2.0]]], "float32"), np.array([[[1.0], [3.0]]], "float32")
        >>> {k: keras.ops.convert_to_numpy(v).ravel().tolist() for k, v in mixture_moments(mu, var).items()}
        {'prediction': [1.0], 'variance': [3.0], 'std': [1.0], 'aleatoric': [2.0], 'epistemic': [1.0]}
    """
    w = _weights(weights, means.shape[1], means.dtype)
    mean = _weighted_sum(means, w)
    aleatoric = _weighted_sum(variances, w)
    epistemic = _weighted_sum(ops.square(means - ops.expand_dims(mean, 1)), w)
    return {"prediction": mean, "variance": aleatoric + epistemic, "std": ops.sqrt(epistemic),
            "aleatoric": aleatoric, "epistemic": epistemic}


def variance_pairs(variance, names):
    """Normalise ``variance=`` to ``{mean output index: variance output index}``.

    ``None``: no pairs. A name: that output is the variance of the one other
    output (members with exactly two outputs). ``{mean output: variance output}``:
    any number of pairs.

    Example:
        >>> variance_pairs("var", ["mean", "var"])
        {0: 1}
        >>> variance_pairs({"y": "y_var"}, ["label", "y", "y_var"])
        {1: 2}
    """
    if variance is None:
        return {}
    names = list(names)
    if isinstance(variance, str):
        if variance not in names:
            raise ValueError(f"variance={variance!r} is not an output; the outputs are {names}.")
        if len(names) != 2:
            raise ValueError(f"variance={variance!r} names one output but the members have {len(names)} "
                             f"outputs {names}; give variance={{mean output: variance output}}.")
        variance = {next(n for n in names if n != variance): variance}
    if not isinstance(variance, dict):
        raise TypeError(f"variance must be an output name or {{mean output: variance output}}, "
                        f"got {type(variance).__name__}.")
    for mean, var in variance.items():
        for name in (mean, var):
            if name not in names:
                raise ValueError(f"variance names output {name!r}, but the outputs are {names}.")
        if mean == var or mean in variance.values() or list(variance.values()).count(var) > 1:
            raise ValueError(f"variance pairs {variance} must pair distinct outputs, each used once.")
    return {names.index(mean): names.index(var) for mean, var in variance.items()}


def paired_task(task, name):
    """The task of an output in a variance pair: ``"regression"`` (``task`` may be ``None`` or say so).

    Example:
        >>> paired_task(None, "y")
        'regression'
    """
    if task not in (None, "auto", "regression"):
        raise ValueError(f"output {name!r} is in a variance pair, so its task is 'regression'; got task {task!r}.")
    return "regression"


def check_mixture_method(method, output="output"):
    """``method`` if a Gaussian mixture can use it (``"mean"``, ``"weighted"``), else one ``ValueError``.

    Example:
        >>> check_mixture_method("weighted")
        'weighted'
    """
    if method not in MIXTURE_METHODS:
        raise ValueError(f"method {method!r} for {output} cannot be used with a variance: the mixture's "
                         "total variance is about the (weighted) mean; use 'mean' or 'weighted'.")
    return method


def check_variance_kind(variance_kind):
    """``variance_kind`` if it is one of ``VARIANCE_KINDS``, else one ``ValueError``.

    Example:
        >>> check_variance_kind("log_variance")
        'log_variance'
    """
    if variance_kind not in VARIANCE_KINDS:
        options = ", ".join(repr(k) for k in VARIANCE_KINDS)
        raise ValueError(f"variance_kind must be one of {options}, got {variance_kind!r}.")
    return variance_kind


def check_variance_member(model, label, positions, pairs, names, variance_kind):
    """Raise one ``ValueError`` naming member, output and shapes unless each pair fits.

    Each variance output must have its mean's shape; a ``"variance"`` or ``"std"``
    output that ends in a linear layer (it can be negative) is refused: end it in
    ``softplus`` (or ``exp``), or say ``variance_kind="log_variance"``.

    Args:
        model: one member.
        label: how errors name it ("member 1 ('mlp_1')").
        positions: the member's position of each shared output (by name, else position).
        pairs: ``{mean output index: variance output index}`` (``variance_pairs``).
        names: the shared output names.
        variance_kind: one of ``VARIANCE_KINDS``.
    """
    layers = output_layers(model)
    for mean, var in pairs.items():
        mean_shape = tuple(model.outputs[positions[mean]].shape)
        var_shape = tuple(model.outputs[positions[var]].shape)
        if mean_shape != var_shape:
            raise ValueError(f"{label}: variance output {names[var]!r} has shape {var_shape} but its mean "
                             f"{names[mean]!r} has shape {mean_shape}; they must match.")
        layer = layers[positions[var]]
        activation = getattr(layer, "activation", None)
        if variance_kind != "log_variance" and getattr(activation, "__name__", None) == "linear":
            raise ValueError(
                f"{label}: variance output {names[var]!r} (layer {layer.name!r}, shape {var_shape}) ends "
                f"in a linear layer, so it can be negative; end it in softplus, or pass "
                "variance_kind='log_variance' if it predicts log σ².")


@keras.saving.register_keras_serializable(package=PACKAGE)
class MemberMixture(keras.layers.Layer):
    """The Gaussian mixture of members that predict a mean and a variance (see ``mixture_moments``).

    Called as ``layer(means, variances)``: each a list of the K member outputs
    (``ek.ensemble``) or one tensor with members on axis 1 (``ek.pack``).

    Args:
        variance_kind: what the variance outputs hold: ``"variance"``, ``"log_variance"`` or ``"std"``.
        member_weights: per-member weights summing to one (``None``: uniform).
        uncertainty: also output ``"std"`` (members' spread), ``"aleatoric"`` and ``"epistemic"``.
        mean_output, variance_output: the members' output names (a record for ``ek.pack``'s re-pack).

    Returns (call): ``{"prediction", "variance"}`` (and the uncertainty keys).

    Example:
        >>> import numpy as np
        >>> out = MemberMixture(uncertainty=True)([np.zeros((2, 1)), np.ones((2, 1))],
        ...                                       [np.ones((2, 1)), np.ones((2, 1))])
        >>> keras.ops.convert_to_numpy(out["variance"]).ravel().tolist()
        [1.25, 1.25]
    """

    def __init__(self, variance_kind="variance", member_weights=None, uncertainty=False, mean_output=None,
                 variance_output=None, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.variance_kind = check_variance_kind(variance_kind)
        self.member_weights = None if member_weights is None else [float(w) for w in member_weights]
        self.uncertainty = bool(uncertainty)
        self.mean_output = mean_output
        self.variance_output = variance_output

    @property
    def task(self):
        return "regression"

    @staticmethod
    def _stacked(values):
        if isinstance(values, (list, tuple)):
            return ops.stack([ops.cast(v, "float32") for v in values], axis=1)
        return ops.cast(values, "float32")

    def call(self, means, variances):
        means, variances = self._stacked(means), to_variance(self._stacked(variances), self.variance_kind)
        moments = mixture_moments(means, variances, self.member_weights)
        both = ops.concatenate([means, variances], axis=1)
        keys = ("prediction", "variance", *(MIXTURE_UNCERTAINTY if self.uncertainty else ()))
        return {key: keep_non_finite(moments[key], both, "regression") for key in keys}

    def get_config(self):
        config = super().get_config()
        config.update(variance_kind=self.variance_kind, member_weights=self.member_weights,
                      uncertainty=self.uncertainty, mean_output=self.mean_output,
                      variance_output=self.variance_output)
        return config
