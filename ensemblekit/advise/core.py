"""``ek.advise``: split the data, measure barriers, build and score every candidate, cost them, recommend.

The candidates are entries of :mod:`ensemblekit.compositions` (the one registry
of compositions), under the advisor's own names (:data:`CANDIDATES`); costs come
from :mod:`ensemblekit.costs`, loss barriers from ``ensemblekit.merge.loss_barrier``.
"""

from __future__ import annotations

import dataclasses
import json

import keras
import numpy as np

from ensemblekit import _data, compositions, metrics
from ensemblekit._io import load_model
from ensemblekit._validate import check_choice, check_targets
from ensemblekit.advise.recommend import recommend
from ensemblekit.advise.table import format_table
from ensemblekit.compose._members import MemberSet
from ensemblekit.costs import COSTS, check_budget, latencies, macs
from ensemblekit.merge.barrier import BARRIER_LOSSES, POINTS, measure_path, path_loss

METRICS = ("nll", "accuracy")  # multiclass; TASK_METRICS has every task's
# What advise ranks by, per task (first: the default): NLL for classifiers, RMSE for regressors;
# binary and multilabel members may also be ranked by (macro) AUROC.
TASK_METRICS = {"multiclass": METRICS, "binary": (*METRICS, "auroc"), "multilabel": (*METRICS, "auroc"),
                "regression": ("rmse", "mae")}
TASKS = tuple(TASK_METRICS)
PATH_T = POINTS
# Latencies within 10% over the budget count as within it: repeated timings of
# one model on a shared CPU differ by that much (README, throughput section).
LATENCY_NOISE = 0.10
# The advisor's candidates: its name -> the registry's name (ensemblekit.compositions).
CANDIDATES = {
    "best_member": "best_member",
    "soup": "soup",
    "aligned_soup": "aligned_soup",
    "ties": "ties",
    "ensemble": "ensemble_logit_mean",
    "ensemble_calibrated": "calibrated_logit_mean",
    "weighted": "weighted",
    "greedy": "greedy",
    "packed": "packed_logit_mean",
    "distilled_student": "distilled_student",
    "pruned_subset": "pruned_members",
}
MERGES = tuple(name for name, entry in CANDIDATES.items() if compositions.get(entry).kind == "merge")
ROW_KEYS = ("name", "kind", "accuracy", "nll", "brier", "ece", "params", "macs", "latency_ms",
            "cost_ratio", "within_budget", "note")
_COST_KEYS = ROW_KEYS[6:]
# A row's keys per task: the task's metrics (ensemblekit.metrics), then the costs.
TASK_ROW_KEYS = {
    "multiclass": ROW_KEYS,
    "binary": ("name", "kind", "accuracy", "auroc", "nll", "brier", "ece", *_COST_KEYS),
    "multilabel": ("name", "kind", "accuracy", "auroc", "nll", "brier", "ece", *_COST_KEYS),  # macro means
    "regression": ("name", "kind", "rmse", "mae", "nll", "coverage", *_COST_KEYS),
}


@dataclasses.dataclass
class Advice:
    """What :func:`advise` measured and what it recommends.

    Attributes:
        recommendation: name of the recommended candidate (a row's ``name``), or
            ``None`` when no candidate fits the budget.
        reason: one paragraph quoting the numbers behind the choice.
        rows: one dict per candidate (keys ``TASK_ROW_KEYS[task]``): ``name``, ``kind``
            (``"member"``, ``"merge"``, ``"ensemble"``, ``"trained"``), the task's metrics
            on the score half (``None`` when skipped) — multiclass ``accuracy``, ``nll``,
            ``brier``, ``ece``; binary also ``auroc``; multilabel the same five, each the
            mean over labels of that label's binary metric (``auroc`` ``None`` when a label
            has one class only in the score half); regression ``rmse``, ``mae``, and
            ``nll`` (Gaussian) and ``coverage`` (±1.96σ) where the candidate has a std —
            then ``params``, ``macs`` (per sample),
            ``latency_ms`` (batch 256, only for ``cost="latency"``), ``cost_ratio``
            (cost / one member's cost), ``within_budget``, ``note`` (what it is, or
            why it was skipped).
        barriers: ``{"0-k": {...}}`` per member pair: ``t``, ``path_nll``,
            ``barrier`` and, when alignment worked, ``aligned_path_nll`` and
            ``aligned_barrier`` (score-half NLL in nats; binary cross-entropy for binary
            members, its mean over labels for multilabel ones; for regression
            ``path_mse``/``aligned_path_mse``, the barrier in MSE); empty when merges are
            impossible.
        notes: advisor-wide remarks (e.g. why weight-space merges were skipped).
        budget, cost, metric, seed: the settings used.
        fit_size, score_size: samples in the fit and score halves.
        task: the members' task (``"multiclass"``, ``"binary"``, ``"multilabel"`` or
            ``"regression"``).
        models: ``{name: keras.Model}`` of every built candidate (not in ``to_dict``).

    Example:
        >>> import keras, numpy as np
        >>> import ensemblekit as ek
        >>> ms = [keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)]) for _ in range(2)]
        >>> advice = ek.advise(ms, np.random.rand(20, 4), np.arange(20) % 3, verbose=0)
        >>> isinstance(advice, ek.Advice), advice.recommendation in advice.models
        (True, True)
        >>> [row["name"] for row in advice.to_dict()["rows"]][:3]
        ['best_member', 'soup', 'aligned_soup']
    """

    recommendation: str | None
    reason: str
    rows: list
    barriers: dict
    notes: list
    budget: float | None
    cost: str
    metric: str
    seed: int
    fit_size: int
    score_size: int
    task: str = "multiclass"
    models: dict = dataclasses.field(default_factory=dict, repr=False)

    def to_dict(self):
        """Everything but the models, as plain JSON-serialisable Python values."""
        fields = [f.name for f in dataclasses.fields(self) if f.name != "models"]
        return json.loads(json.dumps({name: getattr(self, name) for name in fields}))

    def __str__(self):
        return format_table(self)


def split_indices(n_samples, seed=0):
    """Deterministic ``(fit, score)`` index halves of ``range(n_samples)``.

    Args:
        n_samples: how many validation samples there are (at least 4).
        seed: seed of the shuffle.

    Returns:
        Two sorted ``int`` arrays; the fit half has ``n_samples // 2`` entries.

    Example:
        >>> fit, score = split_indices(6, seed=0)
        >>> len(fit), len(score), sorted([*fit, *score]) == list(range(6))
        (3, 3, True)
    """
    if n_samples < 4:
        raise ValueError(f"advise: x has {n_samples} samples; advise needs at least 4 (half to fit, half to "
                         "score).")
    order = np.random.default_rng(seed).permutation(n_samples)
    half = n_samples // 2
    return np.sort(order[:half]), np.sort(order[half:])


def advise(models, x, y=None, budget=None, cost="params", metric=None, base=None, verbose=1,
           seed=0, train_data=None, task=None, *, batch_size=None, steps=None):
    """Measure merging and ensembling options on held-out data and recommend one.

    The held-out data ``(x, y)`` is read once: every member predicts each sample
    once, and those predictions serve every output-level candidate (ensembles,
    weights, selection, calibration). It is then split by sample index (seeded,
    :func:`split_indices`) into a *fit* half and a *score* half. Everything fitted — the best member's choice, the
    calibration (temperature, Platt or variance scaling), ensemble weights, greedy and budgeted selection,
    BatchNorm statistics of merged models — uses the fit half only; every
    reported metric and loss barrier is measured on the score half, so the
    candidates that learn from validation data are not flattered by it.

    Merged models (and the barriers' points) must run on the inputs again. A
    dataset's inputs are therefore written, in the order the one pass read them,
    to a temporary HDF5 file (deleted afterwards) and the halves are read back
    from it by index: a dataset that reshuffles on every iteration, or a one-shot
    generator, is fine, and the images are never held in memory. In memory stay
    the labels and the members' predictions (``n x K x classes``).

    Candidates (entries of ``ensemblekit.compositions``; skipped with a stated
    reason where they do not apply): ``best_member``; ``soup``
    (``ek.merge(..., "linear")``); ``aligned_soup`` (``ek.align`` to member 0,
    then average); ``ties`` (needs ``base``); ``ensemble`` (``"logit_mean"``);
    ``ensemble_calibrated`` (``ek.calibrate``); ``weighted``
    (``ek.optimize_weights``); ``greedy`` (``ek.select``); ``packed``
    (``ek.pack``, the ensemble as one wide model); ``distilled_student``
    (``ek.distill``: the best member's architecture trained on the mean
    ensemble's soft targets; needs ``x_train``; its training time is in its
    note); ``pruned_subset`` (``ek.prune.select_members`` under the budget). Merges need members of one
    architecture; merged models with BatchNorm get ``ek.reset_bn`` on the fit half.

    The loss barrier between member 0 and member k is
    ``ensemblekit.merge.loss_barrier`` on the score half:
    ``max_t [L(θ_t) - ((1-t) L(θ_0) + t L(θ_k))]`` over ``t = 0, .25, .5, .75, 1``
    with ``θ_t = ek.merge([m0, mk], "linear", weights=[1-t, t])`` (Frankle et
    al., 2020; Ainsworth et al., 2022 after weight matching); near 0 means the
    two sit in one basin and averaging them works. With BatchNorm, every point of
    the path (endpoints included) gets ``ek.reset_bn`` on the fit half.

    The recommendation is the best candidate by ``metric`` among those within
    ``budget``; when a cheaper one is within the tolerance (0.5 accuracy or AUROC
    point, or 1% relative NLL, RMSE or MAE) of it, the cheaper one is recommended
    and the reason says so.

    Per task (``task=``, detected when ``None``):

    * multiclass: the candidates above, scored by accuracy, NLL, Brier and ECE;
      ``ensemble_calibrated`` is temperature scaling; the barrier is in NLL (nats).
    * binary (one sigmoid unit, or one logit with ``task="binary"``): the same
      candidates on the positive-class probability, scored by the binary metrics
      (accuracy, AUROC, NLL, Brier, ECE; ``ek.evaluate``'s); ``ensemble_calibrated``
      is Platt scaling; the barrier is in binary cross-entropy (nats).
    * multilabel (several sigmoid units, or logits with ``task="multilabel"``; targets
      0/1 of shape ``(n, labels)``): each label is a binary problem, and each metric is
      the unweighted mean over labels of that label's binary metric (``ek.evaluate``'s
      macro means; accuracy is the fraction of correct label decisions, NLL the mean
      per-label binary cross-entropy). ``ensemble`` and ``packed`` take the sigmoid of
      each label's mean logit; ``weighted``, ``greedy`` and ``pruned_subset`` fit the
      mean of probabilities by that NLL; ``ensemble_calibrated`` is one Platt scaling
      (slope and bias) shared by the labels, as ``ek.calibrate`` fits it: one
      temperature plus a shift, two numbers that the fit half pins down even for rare
      labels, where a slope and bias per label would overfit them; the barrier is
      the mean per-label binary cross-entropy. ``distilled_student`` is skipped
      (``ek.distill`` has no multilabel student).
    * regression: scored by RMSE (the default ``metric``) and MAE; ``ensemble`` and
      ``packed`` average the values; ``ensemble_calibrated`` is that mean with the
      members' spread as its std, variance-scaled on the fit half, which adds a
      Gaussian ``nll`` and ``coverage`` (its RMSE is the ensemble's); the barrier is
      in MSE.

    Args:
        models: list of at least two members (``keras.Model`` or ``.keras``/``.h5`` paths)
            with one ``(batch, units)`` output (and one input or several named ones): multiclass, binary or
            multilabel classifiers, or regressors.
        x: held-out data the members were not trained on (at least 4 samples): anything
            ``model.predict`` accepts (arrays, a dict/list of arrays for members with several
            inputs, a ``tf.data.Dataset`` of ``(x, y)`` such as
            ``keras.utils.image_dataset_from_directory`` gives, a ``keras.utils.PyDataset``,
            a generator), read once.
        y: its labels (integers or one-hot; 0/1 for binary; 0/1 of shape ``(n, labels)``
            for multilabel; values for regression), or ``None`` when ``x`` yields them.
        budget: ``None`` (no limit) or how many single-member costs may be spent
            (``1.0`` = one member, the mean of the members' costs; the one meaning
            of budgets, ``ensemblekit.costs``).
        cost: ``"params"``, ``"macs"`` (per sample) or ``"latency"`` (batch 256 through
            ``ek.compile_for_inference``, timed round-robin on this device; within 10%
            over the budget counts as within, timing noise).
        metric: what "best" means, one of ``TASK_METRICS[task]``: ``"nll"`` or
            ``"accuracy"`` (classifiers), also ``"auroc"`` (binary and multilabel),
            ``"rmse"`` or ``"mae"`` (regression); ``None``: ``"nll"``, or ``"rmse"`` for
            regression. One that does not apply to the task is a ``ValueError`` naming both.
        base: the model the members were fine-tuned from (model or path); enables ``ties``.
        verbose: 1 shows a progress bar and prints the table; 0 is silent.
        seed: seed of the fit/score split (and of weight matching).
        train_data: the members' training data for the ``distilled_student`` candidate
            (without it, it is skipped): ``(x_train, y_train)``, ``(x_train,)`` (soft targets
            only), or a re-iterable dataset (read once per epoch).
        task: the members' task as in ``ek.ensemble``: ``None``/``"auto"`` (detect),
            ``"multiclass"``, ``"binary"``, ``"multilabel"`` or ``"regression"`` (a linear
            one-unit output needs it, and so do multilabel logits).
        batch_size: rows per batch for arrays (default 256); datasets keep theirs.
        steps: batches to read from ``x`` (required when it is endless).

    Returns:
        An :class:`Advice` (``recommendation``, ``reason``, ``rows``, ``barriers``,
        ``to_dict()``; ``str(advice)`` is the table).

    Example:
        >>> import keras, numpy as np
        >>> import ensemblekit as ek
        >>> make = lambda s: (keras.utils.set_random_seed(s), keras.Sequential(
        ...     [keras.Input((4,)), keras.layers.Dense(8, "relu"), keras.layers.Dense(3)]))[1]
        >>> x, y = np.random.default_rng(0).normal(size=(40, 4)), np.arange(40) % 3
        >>> advice = ek.advise([make(0), make(1)], x, y, budget=1.0, verbose=0)
        >>> [row["cost_ratio"] <= 1.0 for row in advice.rows if row["name"] == advice.recommendation]
        [True]

        Regressors (a linear output: ``task="regression"``) are ranked by RMSE:

        >>> reg = lambda s: (keras.utils.set_random_seed(s), keras.Sequential(
        ...     [keras.Input((4,)), keras.layers.Dense(8, "relu"), keras.layers.Dense(1)]))[1]
        >>> advice = ek.advise([reg(0), reg(1)], x, x[:, 0], task="regression", verbose=0)
        >>> advice.task, advice.metric, list(advice.rows[0])[:6]
        ('regression', 'rmse', ['name', 'kind', 'rmse', 'mae', 'nll', 'coverage'])
    """
    budget = check_budget(budget)
    check_choice(cost, COSTS, "cost")
    if metric is not None:
        check_choice(metric, sorted({m for names in TASK_METRICS.values() for m in names}), "metric")
    if verbose not in (0, 1):
        raise ValueError(f"verbose must be 0 or 1, got {verbose!r}.")
    setup = _setup(models, x, y, base, budget, metric, seed, train_data, task, batch_size, steps, verbose)
    ctx = setup.ctx
    metric = ctx.metric
    steps = (len(ctx.models) - 1) * (ctx.architecture_difference is None) + len(CANDIDATES) + (cost == "latency")
    progress = keras.utils.Progbar(steps, verbose=verbose, unit_name="step")
    barriers = _barriers(setup, progress)
    candidates = []
    for name in list(CANDIDATES)[:-1]:  # pruned_subset comes last: it needs the members' costs
        candidates.append(_candidate(setup, name))
        progress.add(1)
    timed = _measure_latencies(setup, candidates, progress) if cost == "latency" else None
    ctx.cost = _member_costs(setup, cost, timed)
    candidates.append(_candidate(setup, "pruned_subset"))
    if timed is not None and candidates[-1].model is not None:
        timed.update(_time_models({"pruned_subset": candidates[-1].model}, setup.sample))
    progress.add(1)
    rows = [_row(setup, c, cost, budget, timed) for c in candidates]
    recommendation, reason = recommend(rows, metric, budget, cost, barriers)
    advice = Advice(recommendation, reason, rows, barriers, setup.notes, budget, cost, metric, seed,
                    len(ctx.y_fit), len(setup.y_score), ctx.task,
                    {c.name: c.model for c in candidates if c.model is not None})
    if verbose:
        print(advice)
    return advice


# --- setup: validation, split, member predictions -------------------------------------------

@dataclasses.dataclass
class _Setup:
    ctx: compositions.Context  # members, fit half, base, budget, metric: what candidates are built from
    x_score: object  # the score half: arrays, or a _data.Rows dataset over the stored inputs
    y_score: np.ndarray
    score_probs: np.ndarray  # (n_score, K, classes); binary (n_score, K); multilabel (n_score, K, labels);
    # regression (n_score, K, units)
    notes: list
    member_params: np.ndarray
    member_macs: np.ndarray
    sample: object  # a batch of score-half inputs (latency timing)


def _check_auroc(metric, y_score, task):
    """AUROC ranks only when every label has both classes in the score half; one error otherwise."""
    if metric != "auroc":
        return
    columns = y_score.reshape(len(y_score), -1)
    for label in range(columns.shape[1]):
        values = np.unique(columns[:, label])
        if len(values) < 2:
            which = f"label {label}" if task == "multilabel" else "the label"
            raise ValueError(
                f"metric 'auroc' needs both classes of every label in the score half; {which} is "
                f"{int(values[0])} in all {len(columns)} score-half samples. Use metric='nll' or more data.")


def _multilabel_note(ctx):
    labels = ctx.members.output_shapes[0][-1]
    return (f"multilabel members ({labels} labels): accuracy, AUROC, NLL, Brier and ECE are each label's binary "
            "metric averaged over the labels (ek.evaluate's macro means); ensemble_calibrated is one Platt "
            "scaling shared by the labels")


def _load_base(base):
    if base is None or isinstance(base, keras.Model):
        return base
    if isinstance(base, (str, bytes)) or hasattr(base, "__fspath__"):
        return load_model(base, label="base")
    raise TypeError(f"base must be a keras.Model or a path to a .keras/.h5 file, got {type(base).__name__}.")


def _setup(models, x, y, base, budget, metric, seed, train_data, task, batch_size, steps, verbose):
    members = MemberSet(models, min_count=2, what="advise", task=task)
    members.require_single_output(TASKS, several_inputs=True)
    if metric is not None and metric not in TASK_METRICS[members.task]:
        options = ", ".join(map(repr, TASK_METRICS[members.task]))
        raise ValueError(f"metric {metric!r} does not apply to {members.task} members; expected one of {options}.")
    base = _load_base(base)
    x_train, y_train = _train_data(train_data, members)
    # One pass: every member on each batch as it arrives; a dataset's inputs kept on disk for the halves.
    store = _data.InputStore() if _data.is_dataset(x) else None
    data = _data.collect(members.models, x, y, batch_size=batch_size, steps=steps, function="advise",
                         needs_labels=True, verbose=verbose, sink=None if store is None else store.append)
    _data.refuse_sample_weight(data, "advise")
    outputs = [_single(out) for out in data.outputs]
    metrics.check_finite_members(members.models, data, outputs, "advise", "x", members.labels)
    y = check_targets(data.y, data.rows, members.output_shapes[0], members.task, param="y")
    fit, score = split_indices(data.rows, seed)
    _check_auroc(metric, y[score], members.task)
    if store is None:
        x_fit, x_score = _data.take(x, fit), _data.take(x, score)
        sample = _data.take(x_score, slice(0, 256))
    else:
        rows = batch_size or _data.DEFAULT_BATCH_SIZE
        x_fit, x_score = _data.Rows(store, fit, y, rows), _data.Rows(store, score, y, rows)
        sample = x_score[0][0]
    ctx = compositions.Context(
        members.models, x_fit, y[fit], base=base, budget=budget, metric=metric, seed=seed,
        x_train=x_train, y_train=y_train,
        output_kind=members.output_kinds, fit_data="fit half", bn_data="fit", model_prefix="advise_",
        skip_errors=(ValueError,), task=members.task)  # an unsupported layer, ...: a skipped row
    ctx.set_member_outputs([out[fit] for out in outputs])
    ctx.set_member_outputs([out[score] for out in outputs], "score")
    notes = [_multilabel_note(ctx)] if members.task == "multilabel" else []
    if ctx.architecture_difference:
        notes.append(f"weight-space merges skipped: {ctx.architecture_difference}")
    return _Setup(ctx, x_score, y[score], ctx.member_predictions("score"), notes,
                  np.array([m.count_params() for m in members.models], dtype="float64"),
                  np.array([macs(m) for m in members.models], dtype="float64"), sample)


def _single(outputs):
    """A member's one output (a functional model may give it as a list of one)."""
    return outputs[0] if isinstance(outputs, (list, tuple)) and len(outputs) == 1 else outputs


def _train_data(train_data, members):
    """``(x_train, y_train)`` from ``train_data``: ``(x, y)``, ``(x,)`` or a re-iterable dataset."""
    if train_data is None:
        return None, None
    if _data.is_dataset(train_data):
        _data.check_reiterable(train_data, "advise", "train_data")
        return train_data, None
    if not isinstance(train_data, tuple) or len(train_data) not in (1, 2):
        raise TypeError(f"advise: train_data must be a tuple (x_train, y_train) or (x_train,), or a dataset; "
                        f"got {type(train_data).__name__}.")
    x_train, y_train = (*train_data, None)[:2]
    rows = _data.row_count(_data.take(x_train, slice(None)))
    if y_train is not None:
        y_train = check_targets(y_train, rows, members.output_shapes[0], members.task, param="train_data y")
    return x_train, y_train


# --- loss barriers ------------------------------------------------------------------------------

def _barriers(setup, progress):
    """Barriers from member 0 to each member on the score half, plain and after ``ek.align``."""
    ctx = setup.ctx
    if ctx.architecture_difference is not None:
        return {}
    try:
        aligned, align_reason = ctx.aligned(), None
    except compositions.Skip as reason:
        aligned, align_reason = None, str(reason)
        setup.notes.append(align_reason)
    bn_data = ctx.x_fit if ctx.has_bn else None
    y_score = None if _data.is_dataset(setup.x_score) else setup.y_score  # a dataset yields its labels
    path = f"path_{BARRIER_LOSSES[ctx.task]}"
    barriers = {}
    # The endpoints are the members themselves (without BatchNorm reset): their losses come from
    # the members' one pass; aligned members compute what the members compute.
    outputs = ctx.member_outputs("score")
    ends = [path_loss(out, setup.y_score, m, ctx.task, ctx.output_kinds[0]) for out, m in zip(outputs, ctx.models)]
    for k in range(1, len(ctx.models)):
        plain = measure_path(ctx.models[0], ctx.models[k], setup.x_score, y_score, PATH_T, bn_data, ctx.task,
                             ctx.output_kinds[0], ends=(ends[0], ends[k]))
        entry = {"t": list(PATH_T), path: plain.path, "barrier": plain.barrier,
                 f"aligned_{path}": None, "aligned_barrier": None, "note": align_reason or ""}
        if aligned is not None:
            matched = measure_path(aligned[0], aligned[k], setup.x_score, y_score, PATH_T, bn_data, ctx.task,
                                   ctx.output_kinds[0], ends=(ends[0], ends[k]))
            entry.update({f"aligned_{path}": matched.path, "aligned_barrier": matched.barrier})
        barriers[f"0-{k}"] = entry
        progress.add(1)
    return barriers


# --- candidates ---------------------------------------------------------------------------------

@dataclasses.dataclass
class _Candidate:
    name: str
    kind: str
    model: keras.Model | None = None
    probs: np.ndarray | None = None  # score half (the task's prediction: probabilities or values)
    std: np.ndarray | None = None  # score half, regression candidates with a predictive std
    used: list | None = None  # member indices whose cost it pays (None: cost of `model` itself)
    note: str = ""


def _candidate(setup, name):
    """Candidate ``name`` built from the registry and scored on the score half (or skipped)."""
    entry = compositions.get(CANDIDATES[name])
    try:
        built = compositions.build(entry.name, setup.ctx)
    except compositions.Skip as reason:
        return _Candidate(name, entry.kind, note=f"skipped: {reason}")
    if built.from_members is not None:  # from the members' score-half outputs: no member runs again
        probs, std = setup.ctx.predictions(built, "score")
    else:
        probs, std = compositions.call_predictions(built.model, setup.x_score, setup.ctx.task)
    return _Candidate(name, entry.kind, built.model, probs, std, built.used, built.note)


# --- costs --------------------------------------------------------------------------------------

def _member_costs(setup, cost, timed):
    if cost == "params":
        return setup.member_params
    if cost == "macs":
        return setup.member_macs
    return np.array([timed[f"member {k}"] for k in range(len(setup.ctx.models))], dtype="float64")


def _time_models(models, sample):
    """Milliseconds per batch of 256 of each model (``ensemblekit.costs.latencies``)."""
    return {name: seconds * 1e3 for name, seconds in latencies(models, sample).items()}


def _measure_latencies(setup, candidates, progress):
    models = {f"member {k}": m for k, m in enumerate(setup.ctx.models)}
    models.update({c.name: c.model for c in candidates if c.model is not None and c.name != "best_member"})
    timed = _time_models(models, setup.sample)
    best = candidates[0]
    if best.model is not None:
        timed["best_member"] = timed[f"member {best.used[0]}"]
    progress.add(1)
    return timed


def _row(setup, candidate, cost, budget, timed):
    row = dict.fromkeys(TASK_ROW_KEYS[setup.ctx.task])
    row.update(name=candidate.name, kind=candidate.kind, note=candidate.note, within_budget=False)
    if candidate.probs is None:
        return row
    row.update(_scores(setup.ctx.task, candidate.probs, candidate.std, setup.y_score))
    if candidate.used is None:
        row["params"], row["macs"] = int(candidate.model.count_params()), int(macs(candidate.model))
    else:
        row["params"] = int(setup.member_params[candidate.used].sum())
        row["macs"] = int(setup.member_macs[candidate.used].sum())
    if timed is not None:
        row["latency_ms"] = timed[candidate.name]
    unit = _member_costs(setup, cost, timed).mean()
    value = row["latency_ms"] if cost == "latency" else row[cost]
    row["cost_ratio"] = float(value / unit) if unit > 0 else float("nan")
    slack = 1 + LATENCY_NOISE if cost == "latency" else 1 + 1e-9
    row["within_budget"] = budget is None or row["cost_ratio"] <= budget * slack
    return row


def _scores(task, prediction, std, y):
    """The task's metrics (:mod:`ensemblekit.metrics`, as ``ek.evaluate`` reports them) of one candidate."""
    if task == "multiclass":
        return metrics.score_probs(prediction, y)
    if task == "binary":
        return _binary_scores(prediction, y)
    if task == "multilabel":
        return _macro_scores(prediction, y)
    scores = {"rmse": metrics.rmse(prediction, y), "mae": metrics.mae(prediction, y)}
    if std is not None:
        scores.update(nll=metrics.gaussian_nll(prediction, std, y), coverage=metrics.coverage(prediction, std, y))
    return scores


def _binary_scores(p, y):
    """``metrics.BINARY_METRICS`` of positive-class probabilities; AUROC ``None`` for one class only."""
    scores = {name: fn(p, y) for name, fn in metrics.BINARY_METRICS.items() if name != "auroc"}
    try:
        scores["auroc"] = metrics.auroc(p, y)
    except ValueError:  # one class only in the score half: AUROC is undefined
        scores["auroc"] = None
    return scores


def _macro_scores(p, y):
    """Each label's :func:`_binary_scores`, averaged over labels (``metrics.multilabel_metrics``'s macro
    means); AUROC is ``None`` when a label has one class only.

    Example:
        >>> p, y = np.array([[0.9, 0.2], [0.3, 0.6], [0.8, 0.7]]), np.array([[1, 0], [1, 1], [0, 1]])
        >>> _macro_scores(p, y)["auroc"] == metrics.multilabel_metrics(p, y)["auroc"]
        True
    """
    per_label = [_binary_scores(p[:, label], y[:, label]) for label in range(p.shape[1])]
    return {name: None if any(row[name] is None for row in per_label) else
            float(np.mean([row[name] for row in per_label])) for name in per_label[0]}
