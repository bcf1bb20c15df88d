"""``ek.advise``: merge or ensemble? Measure every option on held-out data, then recommend one.

The advisor splits the validation data into a *fit* half and a *score* half,
measures the loss barrier on the linear path between members (before and after
``ek.align``), builds every applicable candidate (best member, soups, TIES,
output ensembles, calibrated / weighted / greedy / packed / budget-pruned
ensembles), scores each on the score half with :mod:`ensemblekit.metrics`,
costs each (parameters, MACs, measured latency) and recommends the best one
within a budget, preferring the cheaper of two candidates that score alike.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers

import keras
import numpy as np

from ensemblekit import metrics
from ensemblekit._graph import architecture_differences, iter_layers
from ensemblekit._io import load_model
from ensemblekit._validate import check_choice, check_labels, member_label
from ensemblekit.compose._members import Members, _shapes_compatible
from ensemblekit.compose.weights import metric_loss
from ensemblekit.costs import COSTS, latencies, macs

METRICS = ("nll", "accuracy")
PATH_T = (0.0, 0.25, 0.5, 0.75, 1.0)
# A cheaper candidate is preferred when the better one wins by less than this:
# accuracy in absolute terms (0.5 point), NLL relative to the better NLL (1%).
TOLERANCE = {"accuracy": 0.005, "nll": 0.01}
# Latencies within 10% over the budget count as within it: repeated timings of
# one model on a shared CPU differ by that much (README, throughput section).
LATENCY_NOISE = 0.10
MIN_WEIGHT = 1e-3  # optimize_weights entries below this count as zero
MERGES = ("soup", "aligned_soup", "ties")
ENSEMBLES = ("ensemble", "ensemble_calibrated", "weighted", "greedy", "packed", "pruned_subset")
CANDIDATES = ("best_member", *MERGES, *ENSEMBLES)
ROW_KEYS = ("name", "kind", "accuracy", "nll", "brier", "ece", "params", "macs", "latency_ms",
            "cost_ratio", "within_budget", "note")


@dataclasses.dataclass
class Advice:
    """What :func:`advise` measured and what it recommends.

    Attributes:
        recommendation: name of the recommended candidate (a row's ``name``), or
            ``None`` when no candidate fits the budget.
        reason: one paragraph quoting the numbers behind the choice.
        rows: one dict per candidate: ``name``, ``kind`` (``"member"``, ``"merge"``,
            ``"ensemble"``), ``accuracy``, ``nll``, ``brier``, ``ece`` (score half;
            ``None`` when skipped), ``params``, ``macs`` (per sample),
            ``latency_ms`` (batch 256, only for ``cost="latency"``), ``cost_ratio``
            (cost / one member's cost), ``within_budget``, ``note`` (what it is, or
            why it was skipped).
        barriers: ``{"0-k": {...}}`` per member pair: ``t``, ``path_nll``,
            ``barrier`` and, when alignment worked, ``aligned_path_nll`` and
            ``aligned_barrier`` (nats, score-half NLL); empty when merges are impossible.
        notes: advisor-wide remarks (e.g. why weight-space merges were skipped).
        budget, cost, metric, seed: the settings used.
        fit_size, score_size: samples in the fit and score halves.
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
    models: dict = dataclasses.field(default_factory=dict, repr=False)

    def to_dict(self):
        """Everything but the models, as plain JSON-serialisable Python values."""
        fields = [f.name for f in dataclasses.fields(self) if f.name != "models"]
        return json.loads(json.dumps({name: getattr(self, name) for name in fields}))

    def __str__(self):
        return _format_table(self)


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
        raise ValueError(f"x_val has {n_samples} samples; advise needs at least 4 (half to fit, half to score).")
    order = np.random.default_rng(seed).permutation(n_samples)
    half = n_samples // 2
    return np.sort(order[:half]), np.sort(order[half:])


def advise(models, x_val, y_val, budget=None, cost="params", metric="nll", base=None, verbose=1,
           seed=0):
    """Measure merging and ensembling options on held-out data and recommend one.

    ``(x_val, y_val)`` is split (seeded, :func:`split_indices`) into a *fit*
    half and a *score* half. Everything fitted — the best member's choice, the
    calibration temperature, ensemble weights, greedy and budgeted selection,
    BatchNorm statistics of merged models — uses the fit half only; every
    reported metric and loss barrier is measured on the score half, so the
    candidates that learn from validation data are not flattered by it.

    Candidates (skipped with a stated reason where they do not apply):
    ``best_member``; ``soup`` (``ek.merge(..., "linear")``); ``aligned_soup``
    (``ek.align`` to member 0, then average); ``ties`` (needs ``base``);
    ``ensemble`` (``"logit_mean"``); ``ensemble_calibrated`` (``ek.calibrate``);
    ``weighted`` (``ek.optimize_weights``); ``greedy`` (``ek.select``);
    ``packed`` (``ek.pack``, the ensemble as one wide model); ``pruned_subset``
    (``ek.prune.members`` under the budget). Merges need members of one
    architecture; merged models with BatchNorm get ``ek.reset_bn`` on the fit half.

    The loss barrier between member 0 and member k is
    ``max_t [L(θ_t) - ((1-t) L(θ_0) + t L(θ_k))]`` over ``t = 0, .25, .5, .75, 1``
    with ``θ_t = ek.merge([m0, mk], "linear", weights=[1-t, t])`` (Frankle et
    al., 2020; Ainsworth et al., 2022 after weight matching); near 0 means the
    two sit in one basin and averaging them works. With BatchNorm, every point of
    the path (endpoints included) gets ``ek.reset_bn`` on the fit half.

    The recommendation is the best candidate by ``metric`` among those within
    ``budget``; when a cheaper one is within the tolerance (0.5 accuracy point,
    or 1% relative NLL) of it, the cheaper one is recommended and the reason
    says so.

    Args:
        models: list of at least two members (``keras.Model`` or ``.keras``/``.h5`` paths),
            classifiers with one input and a ``(batch, classes)`` output.
        x_val, y_val: held-out data the members were not trained on (at least 4 samples;
            labels as integers or one-hot).
        budget: ``None`` (no limit) or how many single-member costs may be spent
            (``1.0`` = one member, the mean of the members' costs).
        cost: ``"params"``, ``"macs"`` (per sample) or ``"latency"`` (batch 256 through
            ``ek.compile_for_inference``, timed round-robin on this device; within 10%
            over the budget counts as within, timing noise).
        metric: ``"nll"`` or ``"accuracy"``: what "best" means.
        base: the model the members were fine-tuned from (model or path); enables ``ties``.
        verbose: 1 shows a progress bar and prints the table; 0 is silent.
        seed: seed of the fit/score split.

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
    """
    budget = _check_budget(budget)
    check_choice(cost, COSTS, "cost")
    check_choice(metric, METRICS, "metric")
    if verbose not in (0, 1):
        raise ValueError(f"verbose must be 0 or 1, got {verbose!r}.")
    setup = _setup(models, x_val, y_val, base, metric, seed)
    steps = (len(setup.models) - 1) * (setup.merge_reason is None) + len(CANDIDATES) + (cost == "latency")
    progress = keras.utils.Progbar(steps, verbose=verbose, unit_name="step")
    barriers, aligned, align_reason = _barriers(setup, progress)
    candidates = _build_candidates(setup, aligned, align_reason, progress)
    latencies = _measure_latencies(setup, candidates, progress) if cost == "latency" else None
    candidates.append(_pruned_subset(setup, budget, cost, latencies))
    if latencies is not None and candidates[-1].model is not None:
        latencies.update(_time_models({"pruned_subset": candidates[-1].model}, setup.x_score))
    progress.add(1)
    rows = [_row(setup, c, cost, budget, latencies) for c in candidates]
    recommendation, reason = _recommend(rows, metric, budget, cost, barriers)
    advice = Advice(recommendation, reason, rows, barriers, setup.notes, budget, cost, metric, seed,
                    len(setup.y_fit), len(setup.y_score),
                    {c.name: c.model for c in candidates if c.model is not None})
    if verbose:
        print(advice)
    return advice


# --- setup: validation, split, member predictions -------------------------------------------

@dataclasses.dataclass
class _Setup:
    members: Members
    x_fit: np.ndarray
    y_fit: np.ndarray
    x_score: np.ndarray
    y_score: np.ndarray
    fit_probs: np.ndarray  # (n_fit, K, classes)
    score_probs: np.ndarray
    base: keras.Model | None
    merge_reason: str | None  # why weight-space merges are impossible (None: possible)
    has_bn: bool
    metric: str
    notes: list
    member_params: np.ndarray
    member_macs: np.ndarray

    @property
    def models(self):
        return self.members.models


def _check_budget(budget):
    if budget is None:
        return None
    if isinstance(budget, bool) or not isinstance(budget, numbers.Real) or not (
            math.isfinite(budget) and budget > 0):
        raise ValueError(
            f"budget must be None or a positive number of single-member costs (1.0 = one model), "
            f"got {budget!r}.")
    return float(budget)


def _check_x(x_val, members):
    try:
        x = np.asarray(x_val, dtype="float32")
    except (TypeError, ValueError):
        raise TypeError(f"x_val must be a numeric array, got {type(x_val).__name__}.") from None
    if x.ndim < 2 or not _shapes_compatible(x.shape[1:], members.input_shape):
        raise ValueError(
            f"x_val has shape {x.shape} but {members.labels[0]} expects input shape "
            f"{(None, *members.input_shape)}.")
    return x


def _load_base(base):
    if base is None or isinstance(base, keras.Model):
        return base
    if isinstance(base, (str, bytes)) or hasattr(base, "__fspath__"):
        return load_model(base, label="base")
    raise TypeError(f"base must be a keras.Model or a path to a .keras/.h5 file, got {type(base).__name__}.")


def _setup(models, x_val, y_val, base, metric, seed):
    members = Members(models, min_count=2, what="advise")
    base = _load_base(base)
    x = _check_x(x_val, members)
    y = check_labels(y_val, len(x), members.num_classes, param="y_val")
    fit, score = split_indices(len(x), seed)
    differences = architecture_differences(members.models, members.labels)
    merge_reason = None
    if differences:
        more = f" (+{len(differences) - 1} more)" if len(differences) > 1 else ""
        merge_reason = f"members differ in architecture: {differences[0]}{more}"
    has_bn = any(isinstance(layer, keras.layers.BatchNormalization)
                 for model in members.models for _, layer in iter_layers(model))
    notes = [f"weight-space merges skipped: {merge_reason}"] if merge_reason else []
    return _Setup(members, x[fit], y[fit], x[score], y[score],
                  _member_probs(members, x[fit]), _member_probs(members, x[score]),
                  base, merge_reason, has_bn, metric, notes,
                  np.array([m.count_params() for m in members.models], dtype="float64"),
                  np.array([macs(m) for m in members.models], dtype="float64"))


def _predict_probs(model, x, kind=None, batch_size=256):
    """Probabilities of ``model`` on ``x`` by direct calls in inference mode.

    Not ``model.predict``: that traces a new ``tf.function`` for every fresh
    model (about 0.2 s each, with retracing warnings), and the advisor scores
    a dozen throwaway merged models.
    """
    outputs = [keras.ops.convert_to_numpy(model(x[i:i + batch_size], training=False))
               for i in range(0, len(x), batch_size)]
    return metrics.as_probs(np.concatenate(outputs), model, kind)


def _member_probs(members, x):
    return np.stack([_predict_probs(m, x, kind) for m, kind in zip(members.models, members.kinds)], axis=1)


# --- loss barriers ------------------------------------------------------------------------------

def _reset_if_bn(setup, model):
    if setup.has_bn:
        from ensemblekit.merge import reset_bn

        reset_bn(model, setup.x_fit)
    return model


def _path_nll(setup, first, other, k):
    """Score-half NLL of ``merge([first, other], weights=[1-t, t])`` for each ``t`` of ``PATH_T``.

    With BatchNorm every point, the endpoints included, gets ``reset_bn`` on the
    fit half, so the barrier compares models with statistics computed alike
    (members' own running statistics can be far off their reset ones).
    """
    from ensemblekit.merge import merge

    path = []
    for t in PATH_T:
        if t in (0.0, 1.0) and not setup.has_bn:
            path.append(metrics.nll(setup.score_probs[:, 0 if t == 0.0 else k], setup.y_score))
            continue
        model = _reset_if_bn(setup, merge([first, other], "linear", weights=[1 - t, t]))
        path.append(metrics.nll(_predict_probs(model, setup.x_score), setup.y_score))
    return path


def _barrier(path):
    return float(max(loss - ((1 - t) * path[0] + t * path[-1]) for t, loss in zip(PATH_T, path)))


def _barriers(setup, progress):
    """Barriers from member 0 to each member, plain and aligned; the aligned members."""
    if setup.merge_reason is not None:
        return {}, None, setup.merge_reason
    from ensemblekit.merge import align

    try:
        aligned, align_reason = align(setup.models, reference=0), None
    except ValueError as error:
        aligned, align_reason = None, f"align failed: {error}"
        setup.notes.append(align_reason)
    barriers = {}
    for k in range(1, len(setup.models)):
        path = _path_nll(setup, setup.models[0], setup.models[k], k)
        entry = {"t": list(PATH_T), "path_nll": path, "barrier": _barrier(path),
                 "aligned_path_nll": None, "aligned_barrier": None, "note": align_reason or ""}
        if aligned is not None:
            entry["aligned_path_nll"] = _path_nll(setup, aligned[0], aligned[k], k)
            entry["aligned_barrier"] = _barrier(entry["aligned_path_nll"])
        barriers[f"0-{k}"] = entry
        progress.add(1)
    return barriers, aligned, align_reason


# --- candidates ---------------------------------------------------------------------------------

@dataclasses.dataclass
class _Candidate:
    name: str
    kind: str
    model: keras.Model | None = None
    probs: np.ndarray | None = None  # score half
    used: list | None = None  # member indices whose cost it pays (None: cost of `model` itself)
    note: str = ""


def _skipped(name, kind, reason):
    return _Candidate(name, kind, note=f"skipped: {reason}")


def _build_candidates(setup, aligned, align_reason, progress):
    builders = [("best_member", lambda: _best_member(setup)),
                ("soup", lambda: _merged(setup, "soup", setup.models, "linear")),
                ("aligned_soup", lambda: _aligned_soup(setup, aligned, align_reason)),
                ("ties", lambda: _ties(setup)),
                ("ensemble", lambda: _ensemble(setup)),
                ("ensemble_calibrated", lambda: _calibrated(setup, _named(candidates, "ensemble"))),
                ("weighted", lambda: _weighted(setup)),
                ("greedy", lambda: _greedy(setup)),
                ("packed", lambda: _packed(setup))]
    candidates = []
    for name, build in builders:
        kind = "member" if name == "best_member" else "merge" if name in MERGES else "ensemble"
        if kind == "merge" and setup.merge_reason is not None:
            candidate = _skipped(name, kind, setup.merge_reason)
        else:
            try:
                candidate = build()
            except ValueError as error:  # unsupported layer, nested BatchNorm, ...
                candidate = _skipped(name, kind, str(error).splitlines()[0])
        candidates.append(candidate)
        progress.add(1)
    return candidates


def _named(candidates, name):
    return next(c for c in candidates if c.name == name)


def _scored(name, kind, setup, model, used, note):
    return _Candidate(name, kind, model, _predict_probs(model, setup.x_score), used, note)


def _best_member(setup):
    loss = metric_loss(setup.metric)
    fit_losses = [loss(setup.fit_probs[:, k], setup.y_fit) for k in range(len(setup.models))]
    k = int(np.argmin(fit_losses))
    return _Candidate("best_member", "member", setup.models[k], setup.score_probs[:, k], [k],
                      f"{member_label(k, setup.models[k])}, best fit-half {setup.metric}")


def _merged(setup, name, models, method, base=None, **params):
    from ensemblekit.merge import merge

    model = _reset_if_bn(setup, merge(models, method, base=base, name=f"advise_{name}", **params))
    what = {"linear": "uniform average of the weights", "ties": "TIES from base (density 0.2)"}[method]
    bn = "; BatchNorm statistics reset on the fit half" if setup.has_bn else ""
    return _scored(name, "merge", setup, model, None, what + bn)


def _aligned_soup(setup, aligned, align_reason):
    if aligned is None:
        return _skipped("aligned_soup", "merge", align_reason)
    candidate = _merged(setup, "aligned_soup", aligned, "linear")
    candidate.note = "weight matching to member 0, then " + candidate.note
    return candidate


def _ties(setup):
    if setup.base is None:
        return _skipped("ties", "merge", "needs base= (task vectors are differences from a base model)")
    return _merged(setup, "ties", setup.models, "ties", base=setup.base, density=0.2)


def _ensemble(setup):
    from ensemblekit.compose import ensemble

    model = ensemble(setup.models, "logit_mean", output_kind=setup.members.kinds, name="advise_ensemble")
    return _scored("ensemble", "ensemble", setup, model, list(range(len(setup.models))),
                   "softmax of the mean logits")


def _calibrated(setup, ensemble_candidate):
    from ensemblekit.compose import calibrate

    if ensemble_candidate.model is None:
        return _skipped("ensemble_calibrated", "ensemble", "the ensemble could not be built")
    model = calibrate(ensemble_candidate.model, setup.x_fit, setup.y_fit, name="advise_calibrated")
    temperature = model.layers[-1].temperature
    return _scored("ensemble_calibrated", "ensemble", setup, model, ensemble_candidate.used,
                   f"ensemble, temperature {temperature:.3g} fitted on the fit half")


def _weighted(setup):
    from ensemblekit.compose import optimize_weights

    weights = optimize_weights(setup.models, setup.x_fit, setup.y_fit, metric=setup.metric)
    # Members the optimiser all but switched off are dropped: they would cost without contributing.
    weights = np.where(weights < MIN_WEIGHT, 0.0, weights)
    model, indices = _subset_model(setup, weights / weights.sum(), "advise_weighted")
    shown = ", ".join(f"{i}: {weights[i] / weights.sum():.3g}" for i in indices)
    dropped = f"; weights < {MIN_WEIGHT:g} dropped" if len(indices) < len(weights) else ""
    return _scored("weighted", "ensemble", setup, model, indices,
                   f"mean of probabilities, member weights {{{shown}}} fitted on the fit half{dropped}")


def _subset_model(setup, counts, name):
    from ensemblekit.compose import ensemble

    indices = [int(i) for i in np.flatnonzero(counts)]
    if len(indices) == 1:
        return setup.models[indices[0]], indices
    model = ensemble([setup.models[i] for i in indices], "weighted", weights=[counts[i] for i in indices],
                     output_kind=[setup.members.kinds[i] for i in indices], name=name)
    return model, indices


def _greedy(setup):
    from ensemblekit.compose import select

    chosen = select(setup.models, setup.x_fit, setup.y_fit, metric=setup.metric)
    counts = np.bincount(chosen, minlength=len(setup.models))
    model, indices = _subset_model(setup, counts, "advise_greedy")
    kept = ", ".join(f"{i}" + (f" x{counts[i]}" if counts[i] > 1 else "") for i in indices)
    return _scored("greedy", "ensemble", setup, model, indices,
                   f"members {kept} chosen greedily on the fit half (mean of probabilities)")


def _packed(setup):
    from ensemblekit.pack import pack

    if setup.merge_reason is not None:
        return _skipped("packed", "ensemble", setup.merge_reason)
    if len(set(setup.members.kinds)) > 1:
        return _skipped("packed", "ensemble", "members mix logit and probability outputs")
    model = pack(setup.models, reduce="logit_mean", output_kind=setup.members.kinds[0], name="advise_packed")
    return _scored("packed", "ensemble", setup, model, list(range(len(setup.models))),
                   "the ensemble as one wide model (same outputs; its own latency)")


def _pruned_subset(setup, budget, cost, latencies):
    from ensemblekit.prune import members as prune_members

    if budget is None:
        return _skipped("pruned_subset", "ensemble", "no budget given")
    costs = _member_costs(setup, cost, latencies)
    fraction = budget * costs.mean() / costs.sum()
    if fraction >= 1:
        return _skipped("pruned_subset", "ensemble", f"budget {budget:g} covers all {len(costs)} members")
    try:
        kept = prune_members(setup.models, setup.x_fit, setup.y_fit, budget=fraction, cost=costs,
                             metric=setup.metric)
    except ValueError as error:
        return _skipped("pruned_subset", "ensemble", str(error).splitlines()[0])
    weights = "/".join(f"{w:.2f}" for w in kept.weights)
    return _scored("pruned_subset", "ensemble", setup, kept.model, kept.indices,
                   f"members {', '.join(map(str, kept.indices))} (weights {weights}) kept under the "
                   "budget, chosen on the fit half")


# --- costs --------------------------------------------------------------------------------------

def _member_costs(setup, cost, latencies):
    if cost == "params":
        return setup.member_params
    if cost == "macs":
        return setup.member_macs
    return np.array([latencies[f"member {k}"] for k in range(len(setup.models))], dtype="float64")


def _time_models(models, x_score):
    """Milliseconds per batch of 256 of each model (``ensemblekit.costs.latencies``)."""
    return {name: seconds * 1e3 for name, seconds in latencies(models, x_score).items()}


def _measure_latencies(setup, candidates, progress):
    models = {f"member {k}": m for k, m in enumerate(setup.models)}
    models.update({c.name: c.model for c in candidates if c.model is not None and c.name != "best_member"})
    latencies = _time_models(models, setup.x_score)
    best = candidates[0]
    if best.model is not None:
        latencies["best_member"] = latencies[f"member {best.used[0]}"]
    progress.add(1)
    return latencies


def _row(setup, candidate, cost, budget, latencies):
    row = dict.fromkeys(ROW_KEYS)
    row.update(name=candidate.name, kind=candidate.kind, note=candidate.note, within_budget=False)
    if candidate.probs is None:
        return row
    row.update(metrics.score_probs(candidate.probs, setup.y_score))
    if candidate.used is None:
        row["params"], row["macs"] = int(candidate.model.count_params()), int(macs(candidate.model))
    else:
        row["params"] = int(setup.member_params[candidate.used].sum())
        row["macs"] = int(setup.member_macs[candidate.used].sum())
    if latencies is not None:
        row["latency_ms"] = latencies[candidate.name]
    unit = _member_costs(setup, cost, latencies).mean()
    value = row["latency_ms"] if cost == "latency" else row[cost]
    row["cost_ratio"] = float(value / unit) if unit > 0 else float("nan")
    slack = 1 + LATENCY_NOISE if cost == "latency" else 1 + 1e-9
    row["within_budget"] = budget is None or row["cost_ratio"] <= budget * slack
    return row


# --- recommendation -----------------------------------------------------------------------------

def _loss(row, metric):
    return row["nll"] if metric == "nll" else -row["accuracy"]


def _gap(row, best, metric):
    """How much worse ``row`` is than ``best``, in the tolerance's unit."""
    if metric == "accuracy":
        return best["accuracy"] - row["accuracy"]
    return (row["nll"] - best["nll"]) / max(best["nll"], 1e-12)


def _describe_gap(row, best, metric):
    if metric == "accuracy":
        return f"{100 * _gap(row, best, metric):.1f} points"
    return f"{100 * _gap(row, best, metric):.1f}%"


def _value(row, metric):
    return f"accuracy {row['accuracy']:.4f}" if metric == "accuracy" else f"NLL {row['nll']:.4f}"


def _recommend(rows, metric, budget, cost, barriers):
    scored = [r for r in rows if r["nll"] is not None]
    eligible = [r for r in scored if r["within_budget"]]
    tolerance = "0.5 points" if metric == "accuracy" else "1%"
    if not eligible:
        cheapest = min(scored, key=lambda r: r["cost_ratio"])
        return None, (f"no candidate fits the budget of {budget:g}x one member's {cost}; the cheapest, "
                      f"{cheapest['name']}, costs {cheapest['cost_ratio']:.2f}x.")
    best = min(eligible, key=lambda r: (_loss(r, metric), r["cost_ratio"]))
    close = [r for r in eligible if _gap(r, best, metric) < TOLERANCE[metric]]
    chosen = min(close, key=lambda r: (r["cost_ratio"], _loss(r, metric)))
    scope = "with no budget" if budget is None else f"within the budget of {budget:g}x one member's {cost}"
    if chosen is best:
        reason = f"{best['name']} has the best {_value(best, metric)} {scope}, at {best['cost_ratio']:.2f}x"
        cheaper = [r for r in eligible if r["cost_ratio"] < best["cost_ratio"]]
        if cheaper:
            runner = min(cheaper, key=lambda r: _loss(r, metric))
            reason += (f"; the cheaper {runner['name']} ({runner['cost_ratio']:.2f}x) is "
                       f"{_describe_gap(runner, best, metric)} worse, beyond the {tolerance} tolerance")
    else:
        fraction = best["cost_ratio"] / max(chosen["cost_ratio"], 1e-12)
        reason = (f"{chosen['name']} is within {_describe_gap(chosen, best, metric)} of {best['name']} "
                  f"({_value(chosen, metric)} vs {best['nll' if metric == 'nll' else 'accuracy']:.4f}; "
                  f"tolerance {tolerance}) at 1/{fraction:.3g} the cost ({chosen['cost_ratio']:.2f}x vs "
                  f"{best['cost_ratio']:.2f}x one member's {cost}), so the cheaper one is preferred")
    over = [r for r in scored if not r["within_budget"] and _loss(r, metric) < _loss(chosen, metric)]
    if over:
        top = min(over, key=lambda r: _loss(r, metric))
        reason += f"; {top['name']} would reach {_value(top, metric)} but costs {top['cost_ratio']:.2f}x"
    return chosen["name"], reason + _barrier_summary(barriers) + "."


def _barrier_summary(barriers):
    if not barriers:
        return ""
    plain = max(entry["barrier"] for entry in barriers.values())
    text = f"; loss barrier between members up to {plain:.3f} nats"
    aligned = [entry["aligned_barrier"] for entry in barriers.values() if entry["aligned_barrier"] is not None]
    if aligned:
        text += f" ({max(aligned):.3f} after alignment)"
    return text


# --- table --------------------------------------------------------------------------------------

def _cell(value, spec):
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return format(value, spec)


def _format_table(advice):
    budget = "none" if advice.budget is None else f"{advice.budget:g}x one member"
    lines = [f"ek.advise: {len(advice.rows)} candidates; fit half {advice.fit_size} / score half "
             f"{advice.score_size} samples (seed {advice.seed}); metric {advice.metric}; cost "
             f"{advice.cost}; budget {budget}", ""]
    header = (f"{'candidate':<20} {'accuracy':>8} {'NLL':>7} {'Brier':>7} {'ECE':>7} {'params':>10} "
              f"{'MACs':>10} {'lat. ms':>8} {'cost':>6} {'budget':>6}  note")
    lines += [header, "-" * len(header)]
    for row in advice.rows:
        within = _cell(row["within_budget"], "") if row["nll"] is not None else "-"
        lines.append(
            f"{row['name']:<20} {_cell(row['accuracy'], '.4f'):>8} {_cell(row['nll'], '.4f'):>7} "
            f"{_cell(row['brier'], '.4f'):>7} {_cell(row['ece'], '.4f'):>7} {_cell(row['params'], ','):>10} "
            f"{_cell(row['macs'], ','):>10} {_cell(row['latency_ms'], '.3f'):>8} "
            f"{_cell(row['cost_ratio'], '.2f'):>6} {within:>6}  {row['note']}")
    if advice.barriers:
        lines += ["", "loss barriers (score-half NLL, nats) on the linear path from member 0, "
                  "t = 0, .25, .5, .75, 1:"]
        for pair, entry in advice.barriers.items():
            aligned = entry["aligned_barrier"]
            after = f"; after align {aligned:.4f}" if aligned is not None else "; no alignment (see below)"
            lines.append(f"  {pair}: {entry['barrier']:.4f}{after}")
    lines += ["", *advice.notes] if advice.notes else []
    lines += ["", f"recommendation: {advice.recommendation or 'none'}", f"  {advice.reason}"]
    return "\n".join(lines)


# --- command line -------------------------------------------------------------------------------

def register_cli(subparsers):
    """Add ``ensemblekit advise m1.keras m2.keras ... --data mnist1d|digits|file.npz``."""
    parser = subparsers.add_parser(
        "advise", help="merge or ensemble? score every option on held-out data and recommend one",
        description="Measure soups, aligned merges, TIES and output ensembles of the members on "
                    "held-out data (half to fit, half to score) and recommend one within a budget.")
    parser.add_argument("models", nargs="+", help="member .keras/.h5 files (at least 2)")
    parser.add_argument("--data", required=True,
                        help="mnist1d or digits (their test split), or an .npz with x_val/y_val (or x/y)")
    parser.add_argument("--budget", type=float, default=None, help="single-member costs allowed (1.0 = one)")
    parser.add_argument("--cost", choices=COSTS, default="params")
    parser.add_argument("--metric", choices=METRICS, default="nll")
    parser.add_argument("--base", default=None, help="the model the members were fine-tuned from (enables TIES)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the fit/score split")
    parser.add_argument("--json", default=None, help="also write the advice as JSON to this path")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(run=_run_cli)


def _cli_data(spec, input_shape):
    if spec in ("mnist1d", "digits"):
        from ensemblekit.datasets import load_digits, load_mnist1d

        _, (x, y) = load_mnist1d() if spec == "mnist1d" else load_digits()
    elif spec.endswith(".npz"):
        try:
            arrays = np.load(spec)
        except OSError as error:
            raise ValueError(f"--data: could not read {spec!r}: {error}") from None
        keys = ("x_val", "y_val") if "x_val" in arrays else ("x", "y")
        if not all(k in arrays for k in keys):
            raise ValueError(f"--data: {spec!r} needs arrays x_val and y_val (or x and y); has {sorted(arrays)}.")
        x, y = arrays[keys[0]], arrays[keys[1]]
    else:
        raise ValueError(f"--data must be mnist1d, digits or an .npz file, got {spec!r}.")
    if None not in input_shape and x.shape[1:] != tuple(input_shape) and \
            int(np.prod(x.shape[1:])) == int(np.prod(input_shape)):
        x = x.reshape((len(x), *input_shape))  # e.g. mnist1d (n, 40, 1) for a (40,) member
    return x, y


def _run_cli(args):
    from ensemblekit._graph import model_input_shape
    from ensemblekit._io import load_members

    models = load_members(args.models, min_count=2, what="advise")
    x, y = _cli_data(args.data, model_input_shape(models[0]))
    advice = advise(models, x, y, budget=args.budget, cost=args.cost, metric=args.metric,
                    base=args.base, verbose=0 if args.quiet else 1, seed=args.seed)
    if args.quiet:
        print(advice)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(advice.to_dict(), handle, indent=2)
        print(f"advice written to {args.json}")
    return 0


__all__ = ["Advice", "advise", "split_indices"]
