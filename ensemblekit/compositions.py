"""The one registry of every composition: what it is, when it applies, how it is built.

``ek.advise``, the accuracy benchmark (``ensemblekit bench accuracy``) and
``ensemblekit demo`` all read :data:`REGISTRY`; each picks the compositions it
shows by name, gives them its own labels, and adds its own settings (the
demo's fusion epochs, the advisor's budget). Like mergekit's
``merge_methods/registry.py`` and scikit-learn's estimator lists, the registry
is data: one :class:`Composition` per entry with its ``name``, ``kind``, a
``note``, the requirements it ``requires`` (each a named check with the reason
it fails, :data:`REQUIREMENTS`) and a ``builder`` from a :class:`Context`
(members + data) to a :class:`Built` model, or a :class:`Skip` that says why not.

Kinds (:data:`KINDS`): ``"member"`` (one member as it is), ``"ensemble"``
(the members' outputs combined: fixed rules, learned weights or selection,
calibration, packing, member pruning), ``"trained"`` (a new trained part:
stacking's meta-learner, a fusion head, pruned and fine-tuned members),
``"merge"`` (weight space: one model with one member's cost).

Tasks (:data:`TASKS`): multiclass, binary (one sigmoid unit), multilabel
(several sigmoid units, or logits with ``task="multilabel"``) and regression
members; each builder takes the task's analogue (Platt scaling for a binary or
multilabel ensemble's temperature, the mean of values for a regression
ensemble's logit mean); stacking, fusion and channel pruning are multiclass only,
distillation is not for multilabel members (a :class:`Skip` says so). Metrics per
task are :data:`TASK_METRICS`, the first one the default; everything learned
from the fit data scores with the one ``ensemblekit.compose.weights.task_loss``.

Example:
    >>> import keras, numpy as np
    >>> from ensemblekit import compositions
    >>> compositions.names("merge")
    ['soup', 'aligned_soup', 'ties']
    >>> compositions.REGISTRY["ties"].requires
    ('one_architecture', 'base')
    >>> make = lambda s: (keras.utils.set_random_seed(s),
    ...     keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)]))[1]
    >>> x, y = np.random.default_rng(0).normal(size=(30, 4)), np.arange(30) % 3
    >>> ctx = compositions.Context([make(0), make(1)], x, y)
    >>> compositions.build("ensemble_mean", ctx).model.output_shape
    (None, 3)
    >>> compositions.build("ties", ctx)
    Traceback (most recent call last):
    ...
    ensemblekit.compositions.Skip: needs base= (task vectors are differences from a base model)
    >>> regressors = [keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)]) for _ in range(2)]
    >>> rctx = compositions.Context(regressors, x, x[:, 0], task="regression")
    >>> rctx.metric, compositions.build("ensemble_logit_mean", rctx).note
    ('rmse', 'mean of the values')
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import keras
import numpy as np

from ensemblekit import _data, metrics
from ensemblekit._graph import architecture_differences
from ensemblekit._outputs import detect_output_kind
from ensemblekit._validate import check_choice, check_targets
from ensemblekit.compose._members import MemberSet
from ensemblekit.compose.weights import TASK_METRICS as SELECTION_METRICS
from ensemblekit.compose.weights import check_metric, task_loss
from ensemblekit.merge.barrier import has_batchnorm

KINDS = ("member", "ensemble", "trained", "merge")
TASKS = ("multiclass", "binary", "multilabel", "regression")
# What "best" may mean per task (first: the default): task_loss's metrics, but RMSE, not MSE, for
# regression (it ranks alike and is what ek.evaluate reports).
TASK_METRICS = {task: tuple(m for m in names if m != "mse") for task, names in SELECTION_METRICS.items()}
SETTINGS = {
    "best_member_metric": None,  # what "best member" is chosen by (None: the context's metric)
    "min_weight": 1e-3,  # optimize_weights entries below this count as zero (the member is dropped)
    "ties_density": 0.2,
    "stack_cv": 5,
    "stack_epochs": 100,
    "fuse_epochs": 5,  # epochs of the fusion head on the training data
    "prune_ratio": 0.3,  # ek.prune.channels ratio of each member
    "finetune_epochs": 3,  # epochs of each channel-pruned member on the training data
    "batch_size": 64,  # batch of the trained parts
    "distill_epochs": 10,  # epochs of the distilled student on the training inputs
    "distill_temperature": 3.0,
    "tta_views": None,  # views of ek.tta (e.g. [None, Shift(1, axis=1), Shift(-1, axis=1)]); None: skipped
}


class Skip(Exception):
    """A composition that does not apply to these members or this data; the message says why.

    Example:
        >>> str(Skip("no budget given"))
        'no budget given'
    """


@dataclasses.dataclass
class Built:
    """A built composition.

    Attributes:
        model: the composition as one ``keras.Model``.
        note: one line: what it is, with what was fitted (weights, temperature, kept members).
        used: indices of the members whose cost it pays (an ensemble of them),
            or ``None`` when its cost is the model's own (merges, stacking, fusion).
        from_members: for compositions of the members' outputs: a function from
            the members' raw outputs (one per member, in ``ctx.models``' order) to
            the model's raw outputs, so scoring it calls no member again.

    Example:
        >>> Built(keras.Sequential([keras.Input((2,)), keras.layers.Dense(2)]), "a note", [0]).used
        [0]
    """

    model: keras.Model
    note: str
    used: list | None = None
    from_members: Callable | None = dataclasses.field(default=None, repr=False)

    def outputs(self, ctx, half="fit"):
        """The model's raw outputs on ``ctx``'s fit data (``half="fit"``), or on the data
        ``ctx.set_member_outputs`` was given as ``half``, from the members' outputs when
        :attr:`from_members` is known (the members are not called again)."""
        if self.from_members is not None:
            return self.from_members(ctx.member_outputs(half))
        if half != "fit":
            raise ValueError(f"{self.model.name}: outputs on {half!r} need from_members.")
        return call_outputs(self.model, ctx.x_fit)


def call_outputs(model, x, batch_size=256):
    """``model``'s raw outputs (numpy, its output structure) on ``x`` by direct calls in inference mode.

    ``x`` is in-memory data or a dataset (``ensemblekit._data`` reads it; labels
    it yields are ignored). Not ``model.predict``: that traces a new
    ``tf.function`` for every fresh model (about 0.2 s each, with retracing
    warnings), and the advisor scores a dozen throwaway merged models.
    """
    if not _data.is_dataset(x):
        x = _data.Rows(x, np.arange(_data.row_count(x)), batch_size=batch_size)
    parts = [_numpy(model(x_batch, training=False)) for x_batch, _, _ in _data.batches(x, function="call_outputs")]
    return keras.tree.map_structure(lambda *arrays: np.concatenate(arrays), *parts)


def _numpy(outputs):
    """Outputs as numpy; a list of one output (a functional model's ``[output]``) as that output."""
    if isinstance(outputs, (list, tuple)) and len(outputs) == 1:
        outputs = outputs[0]
    return keras.tree.map_structure(keras.ops.convert_to_numpy, outputs)


def _head_function(model, ctx, indices=None):
    """``Built.from_members`` of a composition ``model`` of the members ``indices`` (default all):
    :func:`member_head` run on their outputs; ``None`` when ``model`` is not such a composition."""
    positions = list(range(len(ctx.models))) if indices is None else [int(i) for i in indices]
    head = member_head(model, [ctx.models[i] for i in positions])
    if head is None:
        return None

    def run(outputs, batch_size=4096):
        inputs = [np.asarray(outputs[i]) for i in positions]
        parts = [_numpy(head([a[start:start + batch_size] for a in inputs], training=False))
                 for start in range(0, len(inputs[0]), batch_size)]
        return keras.tree.map_structure(lambda *arrays: np.concatenate(arrays), *parts)
    return run


def task_predictions(outputs, model, task="multiclass", output_kind=None):
    """``(prediction, std)`` (float64) in ``task``'s form from ``model``'s raw ``outputs``.

    Multiclass: class probabilities ``(n, classes)`` (a softmax of logits); binary: the
    positive-class probability ``(n,)``; multilabel: each label's probability
    ``(n, labels)`` (a sigmoid applied to logits); regression: the values ``(n, units)``.
    ``std`` is the model's ``"std"`` output (a regression ensemble built with
    ``uncertainty=True``) or ``None``. This is ``task_loss``'s form.

    Example:
        >>> m = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
        >>> task_predictions(np.zeros((2, 1)), m, "binary")[0].tolist()
        [0.5, 0.5]
    """
    if task == "multiclass":
        return metrics.as_probs(outputs, model, output_kind), None
    if isinstance(outputs, dict):
        return np.asarray(outputs["prediction"], "float64"), outputs.get("std")
    outputs = np.asarray(outputs, dtype="float64")
    if task == "regression":
        return outputs, None
    if (output_kind or detect_output_kind(model)) == "logits":
        outputs = 1.0 / (1.0 + np.exp(-outputs))
    return (outputs.reshape(len(outputs)) if task == "binary" else outputs), None


def call_probs(model, x, output_kind=None, batch_size=256):
    """Probabilities (float64) of ``model`` on ``x`` (:func:`call_outputs`, softmax of logits).

    Example:
        >>> m = keras.Sequential([keras.Input((2,)), keras.layers.Dense(2)])
        >>> call_probs(m, np.zeros((3, 2), "float32")).tolist()
        [[0.5, 0.5], [0.5, 0.5], [0.5, 0.5]]
    """
    return metrics.as_probs(call_outputs(model, x, batch_size), model, output_kind)


def call_predictions(model, x, task="multiclass", output_kind=None, batch_size=256):
    """``(prediction, std)`` of ``model`` on ``x`` in ``task``'s form (:func:`task_predictions`).

    Example:
        >>> m = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
        >>> call_predictions(m, np.zeros((2, 2), "float32"), "binary")[0].tolist()
        [0.5, 0.5]
    """
    return task_predictions(call_outputs(model, x, batch_size), model, task, output_kind)


def member_head(model, members):
    """A ``keras.Model`` from ``members``' outputs (as ``model`` calls them) to ``model``'s outputs.

    An ensemble is a function of its members' outputs; with their outputs
    computed once, every output-level composition is scored from them without
    calling the members again. ``None`` when ``model`` does not call each member
    exactly once or uses its input other than through them.

    Example:
        >>> ms = [keras.Sequential([keras.Input((2,)), keras.layers.Dense(3)]) for _ in range(2)]
        >>> from ensemblekit.compose import ensemble
        >>> head = member_head(ensemble(ms, "mean"), ms)
        >>> [tuple(t.shape) for t in head.inputs]
        [(None, 3), (None, 3)]
    """
    nodes = [node for depth in getattr(model, "_nodes_by_depth", {}).values() for node in depth]
    tensors = []
    for member in members:
        calls = [node for node in nodes if node.operation is member]
        if len(calls) != 1 or len(calls[0].output_tensors) != 1:
            return None
        tensors.append(calls[0].output_tensors[0])
    try:
        return keras.Model(tensors, getattr(model, "_outputs_struct", model.outputs))
    except (ValueError, TypeError):  # the graph reaches the input other than through the members
        return None


class Context:
    """What compositions are built from: the members, the data they may learn from, the settings.

    Args:
        members: at least two models (``keras.Model`` or paths) with one ``(batch, units)``
            output (one input or several): multiclass, binary or multilabel classifiers, or regressors.
        x_fit, y_fit: held-out data that everything learned fits on (weights,
            selection, stacking, calibration, which member is best): arrays (a dict of
            arrays for several inputs), or an ``ensemblekit._data.Rows`` dataset
            (``y_fit=None`` takes its labels), as ``ek.advise`` passes a dataset's half.
        x_train, y_train: the members' training data, for compositions that
            train a new part (fusion head, fine-tuning after channel pruning); a
            re-iterable dataset of ``(x, y)`` as ``x_train`` with ``y_train=None``.
        base: the model the members were fine-tuned from (for TIES).
        budget: the most ``pruned_members`` may cost, in units of the members'
            mean cost (``1.0`` = one member, K = all; see :mod:`ensemblekit.costs`).
        cost: ``"params"``, ``"macs"``, ``"latency"`` or one cost per member.
        metric: what the learned compositions optimise, one of ``TASK_METRICS[task]``
            (``None``: the first, ``"nll"`` for classifiers and ``"rmse"`` for regressors;
            another is a ``ValueError`` naming the metric and the task).
        seed: seed of alignment, stacking folds and every trained part.
        output_kind: what the members output (``None``: detected per member).
        fit_data: how notes name ``(x_fit, y_fit)``, e.g. ``"fit half"``.
        bn_data: ``"fit"`` or ``"train"``: which inputs merged models with
            BatchNorm get ``ek.reset_bn`` on.
        settings: overrides of :data:`SETTINGS` (e.g. ``{"fuse_epochs": 1}``).
        model_prefix: names built models ``<prefix><composition name>`` (default: Keras's).
        skip_errors: exception types that turn into a :class:`Skip` with their
            first line (the advisor skips, e.g., a merge of an unsupported layer).
        task: ``None``/``"auto"`` (detect), ``"multiclass"``, ``"binary"``, ``"multilabel"``
            or ``"regression"``.

    Example:
        >>> ms = [keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)]) for _ in range(2)]
        >>> ctx = Context(ms, np.zeros((6, 4)), np.arange(6) % 3, settings={"fuse_epochs": 1})
        >>> ctx.settings["fuse_epochs"], ctx.architecture_difference is None
        (1, True)
    """

    def __init__(self, members, x_fit, y_fit, *, x_train=None, y_train=None, base=None, budget=None,
                 cost="params", metric=None, seed=0, output_kind=None, fit_data="validation split",
                 bn_data="fit", settings=None, model_prefix=None, skip_errors=(), task=None):
        self.members = MemberSet(members, output_kind, min_count=2, what="compositions", task=task)
        self.members.require_single_output(TASKS, several_inputs=True)
        if isinstance(x_fit, _data.Rows):
            y_fit = x_fit.labels() if y_fit is None else y_fit
        elif _data.is_dataset(x_fit):
            raise TypeError("compositions.Context: x_fit must be arrays or an ensemblekit._data.Rows dataset, "
                            f"got {_data.data_kind(x_fit) or type(x_fit).__name__}.")
        else:
            x_fit = _data.take(x_fit, slice(None))
        self.x_fit = x_fit
        self.y_fit = check_targets(y_fit, _data.row_count(x_fit), self.members.output_shapes[0], self.task,
                                   param="y_fit")
        self.x_train, self.y_train = x_train, y_train
        metric = TASK_METRICS[self.task][0] if metric is None else check_metric(
            metric, self.task, TASK_METRICS[self.task])
        self.base, self.budget, self.cost, self.metric, self.seed = base, budget, cost, metric, seed
        self.fit_data = fit_data
        check_choice(bn_data, ("fit", "train"), "bn_data")
        self.bn_data = bn_data
        unknown = sorted(set(settings or {}) - set(SETTINGS))
        if unknown:
            raise ValueError(f"Unknown setting {unknown[0]!r}; expected one of {', '.join(SETTINGS)}.")
        self.settings = {**SETTINGS, **(settings or {})}
        self.model_prefix, self.skip_errors = model_prefix, tuple(skip_errors)
        self._built, self._cache = {}, {}

    @property
    def models(self):
        return self.members.models

    @property
    def output_kinds(self):
        return self.members.output_kinds

    @property
    def task(self):
        """The members' task: ``"multiclass"``, ``"binary"``, ``"multilabel"`` or ``"regression"``."""
        return self.members.task

    @property
    def labels(self):
        return self.members.labels

    def _once(self, key, compute):
        if key not in self._cache:
            self._cache[key] = compute()
        return self._cache[key]

    @property
    def architecture_difference(self):
        """``None``, or why weight-space compositions cannot apply: the first weight that differs."""
        def compute():
            differences = architecture_differences(self.models, self.labels)
            if not differences:
                return None
            more = f" (+{len(differences) - 1} more)" if len(differences) > 1 else ""
            return f"members differ in architecture: {differences[0]}{more}"
        return self._once("architecture", compute)

    @property
    def has_bn(self):
        return self._once("has_bn", lambda: any(has_batchnorm(m) for m in self.models))

    @property
    def fit_xy(self):
        """``(x, y)`` of the fit data as the public functions take it (``y=None`` when ``x`` yields it)."""
        return (self.x_fit, None) if _data.is_dataset(self.x_fit) else (self.x_fit, self.y_fit)

    def member_outputs(self, half="fit"):
        """The members' raw outputs (one array per member) on the fit data, computed once, or on
        the data given to :meth:`set_member_outputs` as ``half``."""
        if half == "fit":
            return self._once("outputs:fit", lambda: [call_outputs(m, self.x_fit) for m in self.models])
        return self._cache[f"outputs:{half}"]

    def set_member_outputs(self, outputs, half="fit"):
        """Use ``outputs`` (the members' raw outputs, one per member) on the fit data, or on
        another data set named ``half``, instead of calling the members."""
        self._cache[f"outputs:{half}"] = list(outputs)

    def member_predictions(self, half="fit"):
        """The members' predictions in ``task_loss``'s form, members on axis 1: probabilities
        ``(n, K, classes)`` (multiclass), ``(n, K)`` (binary), ``(n, K, labels)`` (multilabel),
        values ``(n, K, units)`` (regression); from :meth:`member_outputs`."""
        return self._once(f"predictions:{half}", lambda: np.stack(
            [task_predictions(out, m, self.task, k)[0]
             for out, m, k in zip(self.member_outputs(half), self.models, self.output_kinds)], axis=1))

    def fit_probs(self):
        """:meth:`member_predictions` on the fit data."""
        return self.member_predictions("fit")

    def predictions(self, built, half="fit"):
        """``(prediction, std)`` of a built composition in ``task_loss``'s form on the fit data
        (or ``half``), from the members' outputs where it is a function of them."""
        if built.from_members is None and half == "fit":
            return call_predictions(built.model, self.x_fit, self.task)
        return task_predictions(built.outputs(self, half), built.model, self.task)

    def aligned(self):
        """``ek.align(members, reference=0, seed=seed)``, computed once; a :class:`Skip` if it fails."""
        def compute():
            from ensemblekit.merge import align

            try:
                return align(self.models, reference=0, seed=self.seed, verbose=0)
            except ValueError as error:
                return Skip(f"align failed: {error}")
        result = self._once("aligned", compute)
        if isinstance(result, Skip):
            raise result
        return result

    def member_costs(self):
        """One cost per member in the unit of ``cost`` (``ensemblekit.costs.model_costs``)."""
        from ensemblekit.costs import model_costs

        return self._once("costs", lambda: model_costs(self.models, self.cost))

    def model_name(self, name):
        return None if self.model_prefix is None else f"{self.model_prefix}{name}"

    @property
    def bn_phrase(self):
        return f"the {self.fit_data}" if self.bn_data == "fit" else "the training data"

    def reset_bn(self, model):
        """``ek.reset_bn`` on ``bn_data`` when the members hold BatchNorm; ``model`` back."""
        if self.has_bn:
            from ensemblekit.merge import reset_bn

            reset_bn(model, self.x_fit if self.bn_data == "fit" else self.x_train, verbose=0)
        return model

    def built(self, name):
        """:func:`build` of ``name`` on this context, once: later calls return the same result."""
        if name not in self._built:
            try:
                self._built[name] = get(name).build(self)
            except Skip as reason:
                self._built[name] = reason
            except self.skip_errors as error:
                self._built[name] = Skip(str(error).splitlines()[0] if str(error) else type(error).__name__)
        result = self._built[name]
        if isinstance(result, Skip):
            raise result
        return result


# -- requirements: when a composition applies, and the reason when it does not ------------------

def _needs_budget(ctx):
    return "no budget given" if ctx.budget is None else None


def _needs_one_output_kind(ctx):
    return "members mix logit and probability outputs" if len(set(ctx.output_kinds)) > 1 else None


REQUIREMENTS = {
    "one_architecture": lambda ctx: ctx.architecture_difference,
    "one_output_kind": _needs_one_output_kind,
    "base": lambda ctx: None if ctx.base is not None else
    "needs base= (task vectors are differences from a base model)",
    "budget": _needs_budget,
    "training_data": lambda ctx: None if ctx.x_train is not None and (
        ctx.y_train is not None or _data.is_dataset(ctx.x_train)) else
    "needs the members' training data (x_train, y_train) to train its new part",
    "tta_views": lambda ctx: None if ctx.settings["tta_views"] else "no test-time views given (setting tta_views)",
    "training_inputs": lambda ctx: None if ctx.x_train is not None else
    "needs training inputs (x_train; labels optional) to train the student",
}


@dataclasses.dataclass(frozen=True)
class Composition:
    """One registry entry: a named way to turn the members into one model.

    Attributes:
        name: the registry key.
        kind: one of :data:`KINDS`.
        builder: ``builder(ctx) -> Built``; raises :class:`Skip` when it does not apply.
        requires: names in :data:`REQUIREMENTS`, checked in order before building.
        note: one line: what it is.

    Example:
        >>> REGISTRY["soup"].kind, REGISTRY["soup"].note
        ('merge', 'uniform average of the weights (ek.merge "linear")')
    """

    name: str
    kind: str
    builder: Callable
    requires: tuple = ()
    note: str = ""

    def why_not(self, ctx):
        """The reason this composition does not apply to ``ctx`` (first failed requirement), or ``None``."""
        for requirement in self.requires:
            reason = REQUIREMENTS[requirement](ctx)
            if reason:
                return reason
        return None

    def build(self, ctx):
        """The :class:`Built` composition of ``ctx``'s members; :class:`Skip` if it does not apply."""
        reason = self.why_not(ctx)
        if reason:
            raise Skip(reason)
        return self.builder(ctx)


# -- builders ---------------------------------------------------------------------------------------

ENSEMBLE_METHODS = ("mean", "logit_mean", "geometric", "vote")
ENSEMBLE_NOTES = {
    "mean": "mean of the probabilities",
    "logit_mean": "softmax of the mean logits",
    "geometric": "normalised geometric mean of the probabilities",
    "vote": "majority vote (ties broken by the mean probability)",
}


def _all(ctx):
    return list(range(len(ctx.models)))


def _best_member(ctx):
    metric = ctx.settings["best_member_metric"] or ctx.metric
    _, loss = task_loss(metric, ctx.task)
    probs = ctx.fit_probs()
    k = int(np.argmin([loss(probs[:, i], ctx.y_fit) for i in range(len(ctx.models))]))
    fit = ctx.fit_data.replace(" ", "-")
    return Built(ctx.models[k], f"{ctx.labels[k]}, best {fit} {metric}", [k], lambda outputs: outputs[k])


def _task_method(ctx, method):
    """``method`` for ``ctx.task``: regression's canonical output is the value itself, so its logit
    and geometric means are the mean of the values; a vote of values is a :class:`Skip`."""
    if ctx.task != "regression":
        return method
    if method == "vote":
        raise Skip("a vote needs class decisions; these members are regression")
    return "mean"


def _ensemble_note(ctx, method):
    if ctx.task == "regression":
        return "mean of the values"
    if ctx.task == "binary" and method in ("logit_mean", "geometric"):
        return "sigmoid of the mean logits"
    if ctx.task == "multilabel" and method in ("logit_mean", "geometric"):
        return "sigmoid of each label's mean logit"
    return ENSEMBLE_NOTES[method]


def _output_ensemble(method):
    def build(ctx):
        from ensemblekit.compose import ensemble

        used = _task_method(ctx, method)
        model = ensemble(ctx.models, used, output_kind=ctx.output_kinds, name=ctx.model_name(f"ensemble_{method}"),
                         task=ctx.task)
        return Built(model, _ensemble_note(ctx, method), _all(ctx), _head_function(model, ctx))
    return build


def _calibrated(method):
    def build(ctx):

        try:
            source = ctx.built(f"ensemble_{method}")
        except Skip:
            raise Skip("the ensemble could not be built") from None
        if ctx.task == "regression":
            return _calibrated_regression(ctx, method, source.used)
        model, scaling, from_members = _calibrated_model(ctx, source, f"calibrated_{method}")
        if ctx.task in ("binary", "multilabel"):
            shared = " shared by the labels" if ctx.task == "multilabel" else ""
            fitted = f"Platt scaling{shared} (slope {scaling.slope:.3g}, bias {scaling.bias:.3g})"
        else:
            fitted = f"temperature {float(scaling.temperature):.3g}"
        return Built(model, f"ensemble, {fitted} fitted on the {ctx.fit_data}", source.used, from_members)
    return build


def _calibrated_model(ctx, source, name):
    """``ek.calibrate(source.model, fit data)``, fitted on the source's outputs (from the members'
    outputs when it is a function of them): ``(model, scaling layer, from_members)``."""
    from ensemblekit._tasks import MemberStack
    from ensemblekit.compose import calibrate
    from ensemblekit.compose.weights import calibration_layer

    if source.from_members is None:
        model = calibrate(source.model, *ctx.fit_xy, name=ctx.model_name(name), task=ctx.task)
        return model, model.layers[-1], None
    kind = detect_output_kind(source.model)
    canonical = MemberStack(ctx.task, [kind])([source.outputs(ctx)])
    layer = calibration_layer(keras.ops.convert_to_numpy(canonical)[:, 0].astype("float64"), ctx.y_fit, ctx.task,
                              kind)
    inputs = ctx.members.shared_input()
    model = keras.Model(inputs, layer(source.model(inputs)), name=ctx.model_name(name) or
                        f"{source.model.name}_calibrated")
    return model, layer, lambda outputs: _numpy(layer(source.from_members(outputs)))


def _calibrated_regression(ctx, method, used):
    """The mean of the values with the members' spread as ``std``, variance-scaled on the fit data."""
    from ensemblekit.compose import calibrate, ensemble

    spread = ensemble(ctx.models, _task_method(ctx, method), task="regression", uncertainty=True,
                      name=ctx.model_name(f"uncertain_{method}"))
    head = _head_function(spread, ctx)
    if head is None:
        model = calibrate(spread, *ctx.fit_xy, name=ctx.model_name(f"calibrated_{method}"), task="regression")
        scale, from_members = model.get_layer("std_scaling").scale, None
    else:
        from ensemblekit.compose.weights import std_scaling_layer

        layer = std_scaling_layer(head(ctx.member_outputs()), ctx.y_fit)
        inputs = ctx.members.shared_input()
        outputs = dict(spread(inputs))
        outputs["std"] = layer(outputs["std"])
        model = keras.Model(inputs, outputs, name=ctx.model_name(f"calibrated_{method}") or
                            f"{spread.name}_calibrated")
        scale = layer.scale

        def from_members(member_outputs):
            out = dict(head(member_outputs))
            out["std"] = _numpy(layer(out["std"]))
            return out
    return Built(model, f"mean of the values, members' std scaled by {scale:.3g} (variance scaling on the "
                        f"{ctx.fit_data})", used, from_members)


def _subset_ensemble(ctx, weights, name):
    """The members with a nonzero weight as one weighted ensemble (one member: that member)."""
    from ensemblekit.compose import ensemble

    indices = [int(i) for i in np.flatnonzero(weights)]
    if len(indices) == 1:
        return ctx.models[indices[0]], indices, lambda outputs, k=indices[0]: outputs[k]
    model = ensemble([ctx.models[i] for i in indices], "weighted", weights=[weights[i] for i in indices],
                     output_kind=[ctx.output_kinds[i] for i in indices], name=ctx.model_name(name), task=ctx.task)
    return model, indices, _head_function(model, ctx, indices)


def _weights_metric(ctx):
    """``ctx.metric`` as ``optimize_weights``/``select``/``select_members`` take it (RMSE ranks as MSE does)."""
    return {"rmse": "mse", "auroc": "nll"}.get(ctx.metric, ctx.metric)


def _averaged(ctx):
    return "values" if ctx.task == "regression" else "probabilities"


def _weighted(ctx):
    from ensemblekit.compose.weights import fit_weights

    minimum = ctx.settings["min_weight"]
    weights = fit_weights(ctx.fit_probs(), ctx.y_fit, _weights_metric(ctx), ctx.task)
    # Members the optimiser all but switched off are dropped: they would cost without contributing.
    weights = np.where(weights < minimum, 0.0, weights)
    weights = weights / weights.sum()
    model, indices, from_members = _subset_ensemble(ctx, weights, "weighted")
    shown = ", ".join(f"{i}: {weights[i]:.3g}" for i in indices)
    dropped = f"; weights < {minimum:g} dropped" if len(indices) < len(weights) else ""
    return Built(model, f"mean of {_averaged(ctx)}, member weights {{{shown}}} fitted on the "
                        f"{ctx.fit_data}{dropped}", indices, from_members)


def _greedy(ctx):
    from ensemblekit.compose.weights import greedy_selection

    _, loss = task_loss(_weights_metric(ctx), ctx.task)
    chosen = greedy_selection(ctx.fit_probs(), ctx.y_fit, loss).chosen  # ek.select on the cached predictions
    counts = np.bincount(chosen, minlength=len(ctx.models))
    model, indices, from_members = _subset_ensemble(ctx, counts, "greedy")
    kept = ", ".join(f"{i}" + (f" x{counts[i]}" if counts[i] > 1 else "") for i in indices)
    return Built(model, f"members {kept} chosen greedily on the {ctx.fit_data} (mean of {_averaged(ctx)})",
                 indices, from_members)


def _multiclass_only(ctx):
    """Stacking's meta-learner, the fusion head and pruning's fine-tuning are built for class labels."""
    if ctx.task != "multiclass":
        raise Skip(f"multiclass members only; these are {ctx.task}")


def _stack_logistic(ctx):
    _multiclass_only(ctx)
    from ensemblekit.compose import stack

    cv = ctx.settings["stack_cv"]
    model = stack(ctx.models, *ctx.fit_xy, meta="logistic", cv=cv, epochs=ctx.settings["stack_epochs"],
                  output_kind=ctx.output_kinds, seed=ctx.seed, name=ctx.model_name("stack_logistic"), verbose=0)
    return Built(model, f"logistic meta-learner on the members' log-probabilities, cv={cv} on the "
                        f"{ctx.fit_data}")


def _fit(ctx, model, epochs):
    batch_size = None if _data.is_dataset(ctx.x_train) else ctx.settings["batch_size"]
    model.fit(ctx.x_train, ctx.y_train, epochs=epochs, batch_size=batch_size, verbose=0)
    return model


def _fuse_concat(ctx):
    _multiclass_only(ctx)
    from ensemblekit.compose import fuse

    epochs = ctx.settings["fuse_epochs"]
    keras.utils.set_random_seed(ctx.seed)
    model = fuse(ctx.models, taps=-2, fusion="concat", name=ctx.model_name("fuse_concat"))
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy")
    return Built(_fit(ctx, model, epochs), f"head trained {epochs} epochs on frozen penultimate features")


def _pruned_channels(ctx):
    _multiclass_only(ctx)
    from ensemblekit.compose import ensemble
    from ensemblekit.prune import channels

    ratio, epochs = ctx.settings["prune_ratio"], ctx.settings["finetune_epochs"]
    pruned = []
    for member, kind in zip(ctx.models, ctx.output_kinds):
        small = channels(member, ratio=ratio, on_unsupported="warn")
        keras.utils.set_random_seed(ctx.seed)
        small.compile(optimizer=keras.optimizers.Adam(1e-3),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=kind == "logits"))
        pruned.append(_fit(ctx, small, epochs))
    model = ensemble(pruned, "mean", output_kind=ctx.output_kinds, name=ctx.model_name("pruned_channels"))
    return Built(model, f"each member pruned ({ratio:g} of its channels), fine-tuned {epochs} epochs")


def _distilled_student(ctx):
    from ensemblekit.distill import DISTILL_TASKS, distill

    if ctx.task not in DISTILL_TASKS:
        raise Skip(f"ek.distill takes {', '.join(DISTILL_TASKS)} teachers; these members are {ctx.task}")
    best = ctx.built("best_member")
    teacher = ctx.built("ensemble_mean").model
    epochs, temperature = ctx.settings["distill_epochs"], ctx.settings["distill_temperature"]
    student, report = distill(teacher, best.model, ctx.x_train, ctx.y_train, temperature=temperature,
                              epochs=epochs, batch_size=ctx.settings["batch_size"], seed=ctx.seed,
                              verbose=0, task=ctx.task)
    student.name = ctx.model_name("distilled_student")
    targets = "targets" if ctx.task == "regression" else "soft targets"
    labels = f"labels and {targets}" if ctx.y_train is not None else f"{targets} only"
    return Built(student, f"member {best.used[0]}'s architecture and weights, distilled from ensemble_mean "
                          f"({epochs} epochs on {_training_rows(ctx)}, {labels}"
                          f"{'' if ctx.task == 'regression' else f', T={temperature:g}'}; "
                          f"training took {report.seconds:.1f} s)")


def _training_rows(ctx):
    if _data.is_dataset(ctx.x_train):
        return "the training data"
    return f"{_data.row_count(ctx.x_train)} training inputs"


def _merged(ctx, name, models, method, **params):
    from ensemblekit.merge import merge

    model = ctx.reset_bn(merge(models, method, name=ctx.model_name(name), **params))
    what = {"linear": "uniform average of the weights",
            "ties": f"TIES from base (density {params.get('density', 0):g})"}[method]
    bn = f"; BatchNorm statistics reset on {ctx.bn_phrase}" if ctx.has_bn else ""
    return Built(model, what + bn)


def _soup(ctx):
    return _merged(ctx, "soup", ctx.models, "linear")


def _aligned_soup(ctx):
    built = _merged(ctx, "aligned_soup", ctx.aligned(), "linear")
    built.note = "weight matching to member 0, then " + built.note
    return built


def _ties(ctx):
    return _merged(ctx, "ties", ctx.models, "ties", base=ctx.base, density=ctx.settings["ties_density"])


def _packed(reduce):
    def build(ctx):
        from ensemblekit.pack import pack

        model = pack(ctx.models, reduce=_task_method(ctx, reduce), output_kind=ctx.output_kinds[0],
                     name=ctx.model_name(f"packed_{reduce}"), task=ctx.task)
        return Built(model, "the ensemble as one wide model (same outputs; its own latency)", _all(ctx))
    return build


def _pruned_members(ctx):
    from ensemblekit.prune.members import selection_from_predictions

    count = len(ctx.models)
    if ctx.budget >= count:
        raise Skip(f"budget {ctx.budget:g} covers all {count} members")
    try:  # ek.prune.select_members on the cached predictions
        kept = selection_from_predictions(ctx.models, ctx.output_kinds, ctx.fit_probs(), ctx.y_fit, ctx.task,
                                          ctx.budget, ctx.member_costs(), _weights_metric(ctx))
    except ValueError as error:
        raise Skip(str(error).splitlines()[0]) from None
    if len(kept.indices) > 1 and ctx.model_name("pruned_members") is not None:
        kept.model.name = ctx.model_name("pruned_members")
    weights = "/".join(f"{w:.2f}" for w in kept.weights)
    from_members = (lambda outputs, k=kept.indices[0]: outputs[k]) if len(kept.indices) == 1 else \
        _head_function(kept.model, ctx, kept.indices)
    return Built(kept.model, f"members {', '.join(map(str, kept.indices))} (weights {weights}) kept under "
                             f"the budget, chosen on the {ctx.fit_data}", kept.indices, from_members)


def _view_name(view):
    if view is None:
        return "identity"
    if hasattr(view, "offset"):
        return f"shift {view.offset:+d}"
    if hasattr(view, "fraction"):
        return f"crop {view.fraction:g}"
    return type(view).__name__.lower()


def _tta(source_name):
    def build(ctx):
        from ensemblekit.compose import tta

        source = ctx.built(source_name)
        views = ctx.settings["tta_views"]
        model = tta(source.model, views, "mean", name=ctx.model_name(f"tta_{source_name}"), task=ctx.task)
        names = ", ".join(_view_name(view) for view in views)
        return Built(model, f"{source_name} averaged over {len(views)} views ({names})")  # costs: its own
    return build


def _entries():
    def entry(name, kind, builder, requires=(), note=""):
        return Composition(name, kind, builder, tuple(requires), note)

    yield entry("best_member", "member", _best_member, note="the member with the best fit-data metric")
    for method in ENSEMBLE_METHODS:
        yield entry(f"ensemble_{method}", "ensemble", _output_ensemble(method),
                    note=f"ek.ensemble(members, {method!r}): {ENSEMBLE_NOTES[method]}")
    for method in ("mean", "logit_mean"):
        yield entry(f"calibrated_{method}", "ensemble", _calibrated(method),
                    note=f"ek.calibrate(ensemble_{method}): one temperature fitted on the fit data")
    yield entry("weighted", "ensemble", _weighted, note="ek.optimize_weights: member weights fitted on the fit data")
    yield entry("greedy", "ensemble", _greedy, note="ek.select: Caruana's greedy selection with replacement")
    yield entry("tta_best_member", "ensemble", _tta("best_member"), ("tta_views",),
                "ek.tta(best_member, views): the best member averaged over deterministic views of its input")
    yield entry("tta_ensemble_mean", "ensemble", _tta("ensemble_mean"), ("tta_views",),
                "ek.tta(ensemble_mean, views): the ensemble averaged over the views")
    for reduce in ("mean", "logit_mean"):
        yield entry(f"packed_{reduce}", "ensemble", _packed(reduce), ("one_architecture", "one_output_kind"),
                    f"ek.pack(members, {reduce!r}): ensemble_{reduce} as one wide model")
    yield entry("pruned_members", "ensemble", _pruned_members, ("budget",),
                "ek.prune.select_members: the members that best fit the budget")
    yield entry("stack_logistic", "trained", _stack_logistic,
                note="ek.stack(meta='logistic'): a meta-learner over the members' log-probabilities")
    yield entry("fuse_concat", "trained", _fuse_concat, ("training_data",),
                "ek.fuse(taps=-2, fusion='concat'): a new head on the frozen penultimate features")
    yield entry("pruned_channels", "trained", _pruned_channels, ("training_data",),
                "ek.prune.channels on each member, fine-tuned, then ensemble_mean")
    yield entry("distilled_student", "trained", _distilled_student, ("training_inputs",),
                "ek.distill: the best member's architecture trained on ensemble_mean's soft targets")
    yield entry("soup", "merge", _soup, ("one_architecture",), 'uniform average of the weights (ek.merge "linear")')
    yield entry("aligned_soup", "merge", _aligned_soup, ("one_architecture",),
                "ek.align to member 0 (weight matching), then the uniform average")
    yield entry("ties", "merge", _ties, ("one_architecture", "base"), "TIES-merging of task vectors from base")


REGISTRY = {entry.name: entry for entry in _entries()}


def get(name):
    """The :class:`Composition` named ``name``; a ``ValueError`` listing the names otherwise.

    Example:
        >>> get("greedy").kind
        'ensemble'
        >>> get("soop")
        Traceback (most recent call last):
        ...
        ValueError: Unknown composition 'soop'; expected one of best_member, ensemble_mean, ...
    """
    if name not in REGISTRY:
        raise ValueError(f"Unknown composition {name!r}; expected one of {', '.join(REGISTRY)}.")
    return REGISTRY[name]


def names(kind=None):
    """Registry names in order, all or of one ``kind`` (see :data:`KINDS`).

    Example:
        >>> names("trained")
        ['stack_logistic', 'fuse_concat', 'pruned_channels', 'distilled_student']
    """
    if kind is not None and kind not in KINDS:
        raise ValueError(f"Unknown kind {kind!r}; expected one of {', '.join(KINDS)}.")
    return [name for name, entry in REGISTRY.items() if kind is None or entry.kind == kind]


def build(name, ctx):
    """Build composition ``name`` on ``ctx`` (once per context): a :class:`Built`, or raise :class:`Skip`.

    Example:
        >>> ms = [keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)]) for _ in range(2)]
        >>> ctx = Context(ms, np.zeros((6, 4)), np.arange(6) % 3)
        >>> build("pruned_members", ctx)
        Traceback (most recent call last):
        ...
        ensemblekit.compositions.Skip: no budget given
    """
    get(name)
    return ctx.built(name)


def build_each(selection, ctx):
    """Build every composition of ``selection`` in order: yields ``(label, entry, Built or Skip)``.

    Args:
        selection: ``{label: registry name}`` (a consumer's own labels) or a list
            of registry names (labels = names).
        ctx: a :class:`Context`.

    Example:
        >>> ms = [keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)]) for _ in range(2)]
        >>> ctx = Context(ms, np.zeros((6, 4)), np.arange(6) % 3)
        >>> [(label, type(result).__name__) for label, _, result in
        ...  build_each({"mean": "ensemble_mean", "TIES": "ties"}, ctx)]
        [('mean', 'Built'), ('TIES', 'Skip')]
    """
    pairs = selection.items() if isinstance(selection, dict) else [(name, name) for name in selection]
    entries = [(label, get(name)) for label, name in pairs]
    for label, entry in entries:
        try:
            result = ctx.built(entry.name)
        except Skip as reason:
            result = reason
        yield label, entry, result


__all__ = ["KINDS", "REGISTRY", "REQUIREMENTS", "SETTINGS", "TASKS", "TASK_METRICS", "Built", "Composition",
           "Context", "Skip", "build", "build_each", "call_predictions", "call_probs", "get", "names"]
