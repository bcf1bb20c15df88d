"""Output ensembles: several classifiers become one ``keras.Model``."""

from __future__ import annotations

import warnings

import keras

from ensemblekit._io import savedmodel_layers
from ensemblekit._tasks import (
    METHODS,
    MemberMixture,
    MemberReduce,
    MemberUncertainty,
    check_method,
    check_mixture_method,
)
from ensemblekit._validate import check_choice, check_weights
from ensemblekit.compose._members import MemberSet
from ensemblekit.compose.layers import COMBINERS


def ensemble(models, method="mean", weights=None, name=None, output_kind=None, adapters=None,
             input_shape=None, safe_mode=True, task=None, uncertainty=False, trim=0.2, threshold=0.5,
             variance=None, variance_kind="variance"):
    """Combine members into one model whose output is the ensemble's prediction.

    All members run inside ONE functional graph: calling (or ``predict``-ing,
    or XLA-compiling) the result runs every member in a single call.

    Members may be multiclass, binary or multilabel classifiers or regressors,
    with ``(batch, classes)`` or dense outputs (``(batch, ..., C)``: segmentation
    maps, sequence tags; combined element-wise along the last axis), and one or
    several inputs and outputs (matched by name, else by position).

    Args:
        models: list of ``keras.Model`` or paths to ``.keras``/``.h5`` files or to
            TensorFlow SavedModel directories (TensorFlow backend; run through
            ``keras.layers.TFSMLayer``, whose output kind cannot be read: pass ``output_kind``).
        method: how to combine each output, or ``{output name: method}``.
            Multiclass, binary, multilabel: ``"mean"`` (average of probabilities),
            ``"logit_mean"`` (softmax/sigmoid of the mean logits), ``"geometric"``
            (normalised geometric mean of probabilities — the same function as
            ``"logit_mean"``), ``"vote"`` (hard majority — argmax, or probability
            above ``threshold`` — ties broken by the mean probability) or
            ``"weighted"`` (weighted mean of probabilities; needs ``weights``).
            Regression: ``"mean"``, ``"weighted"``, ``"median"`` or
            ``"trimmed_mean"`` (cuts ``trim`` of the members from each end).
        weights: optional non-negative per-member weights (normalised to sum to
            one); they weight every method but ``"median"`` and ``"trimmed_mean"``.
        name: name of the returned model (default ``"ensemble_<method>"``).
        output_kind: what the classifier members output: ``None`` detects a final
            softmax/sigmoid, ``"logits"``/``"probs"`` says it for all, or give one per member.
        adapters: optional list with one Keras layer (or ``None``) per member that
            maps the shared input to the member's input (e.g. ``Resizing``).
        input_shape: the shared input shape (default: member 0's).
        safe_mode: used when loading members from files.
        task: ``None``/``"auto"`` detects each output's task from its last layer
            (softmax: ``"multiclass"``; one sigmoid unit: ``"binary"``; several:
            ``"multilabel"``; a linear ``(batch, classes)`` output: multiclass
            logits; any other linear output must be told), or say
            ``"multiclass"``, ``"binary"``, ``"multilabel"`` or ``"regression"``
            (one for all outputs, or ``{output name: task}``).
        uncertainty: also output what the members' spread says: the output becomes
            ``{"prediction", "predictive_entropy", "expected_entropy",
            "mutual_information", "disagreement"}`` for classifiers and
            ``{"prediction", "std"}`` for regressors (see
            ``ensemblekit._tasks.member_uncertainty``); several outputs give keys
            ``NAME`` and ``NAME_<key>``.
        trim: fraction of members cut from each end by ``"trimmed_mean"``.
        threshold: probability above which a member votes "yes" (binary/multilabel ``"vote"``).
        variance: for regressors that also predict a variance (deep ensembles,
            members trained with a Gaussian NLL): the name of the variance output
            (members with two outputs: a mean and its variance), or
            ``{mean output name: variance output name}``. Each pair becomes the
            Gaussian mixture of the members (``ensemblekit._tasks.mixture_moments``):
            ``{"prediction", "variance"}`` — the (weighted) mean of the means and
            the mixture's total variance ``Σ w_k (σ_k² + μ_k²) - μ²``; with
            ``uncertainty`` also ``"std"`` (the members' spread), ``"aleatoric"``
            (``Σ w_k σ_k²``) and ``"epistemic"`` (``Σ w_k (μ_k - μ)²``). Methods
            ``"mean"`` or ``"weighted"`` only. Several outputs give ``NAME``,
            ``NAME_variance``, ...; the variance output is not an output of its own.
        variance_kind: what each variance output holds: ``"variance"`` (σ², e.g.
            after a softplus; the default, what Gaussian NLL losses take),
            ``"log_variance"`` (log σ², a linear head) or ``"std"`` (σ). A linear
            head cannot be a ``"variance"`` or ``"std"`` (it can be negative): the
            error says so.

    Returns:
        A ``keras.Model`` on the members' inputs. One output: the combined
        prediction (probabilities for classifiers, values for regressors);
        several outputs: ``{name: prediction}``; with ``uncertainty`` or
        ``variance`` a dict as above.

    Example:
        >>> import keras, numpy as np
        >>> import ensemblekit as ek
        >>> members = [keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)]) for _ in range(2)]
        >>> model = ek.ensemble(members, method="mean")
        >>> model.predict(np.zeros((2, 4)), verbose=0).shape
        (2, 3)
        >>> regressors = [keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)]) for _ in range(3)]
        >>> out = ek.ensemble(regressors, "median", task="regression", uncertainty=True)
        >>> sorted(out.predict(np.zeros((2, 4)), verbose=0))
        ['prediction', 'std']
        >>> def gaussian(seed):  # a mean and a variance head
        ...     keras.utils.set_random_seed(seed)
        ...     x = keras.Input((4,))
        ...     return keras.Model(x, {"mean": keras.layers.Dense(1)(x),
        ...                            "var": keras.layers.Dense(1, activation="softplus")(x)})
        >>> mixture = ek.ensemble([gaussian(0), gaussian(1)], variance="var", uncertainty=True)
        >>> sorted(mixture.predict(np.zeros((2, 4)), verbose=0))
        ['aleatoric', 'epistemic', 'prediction', 'std', 'variance']
    """
    members = MemberSet(models, output_kind=output_kind, adapters=adapters, input_shape=input_shape,
                        safe_mode=safe_mode, task=task, variance=variance, variance_kind=variance_kind)
    _warn_savedmodel_members(members)
    methods = _methods(method, members)
    if "weighted" in methods and weights is None:
        raise ValueError("method 'weighted' needs weights=[...], one per member.")
    member_weights = None if weights is None else check_weights(weights, len(members)).tolist()
    if member_weights is not None and {"median", "trimmed_mean"} & set(methods):
        raise ValueError("weights do not apply to methods 'median' and 'trimmed_mean'; use 'weighted'.")
    inputs = members.shared_input()
    per_member = members.call_outputs(inputs)
    outputs = {}
    single = len(members.predicted_outputs) == 1
    for j, method_j in zip(members.predicted_outputs, methods):
        output, task = members.output_names[j], members.tasks[j]
        member_outputs = [outs[j] for outs in per_member]
        kinds = members.kinds_by_output[j]
        suffix = "" if single else f"_{output}"
        key = "prediction" if single else output
        if j in members.variance_pairs:
            mixture = MemberMixture(members.variance_kind, member_weights, uncertainty, mean_output=output,
                                    variance_output=members.output_names[members.variance_pairs[j]],
                                    name=f"mixture{suffix}")
            moments = mixture(member_outputs, [outs[members.variance_pairs[j]] for outs in per_member])
            outputs.update({key if k == "prediction" else f"{'' if single else output + '_'}{k}": v
                            for k, v in moments.items()})
            continue
        outputs[key] = _combiner(task, method_j, kinds, member_weights, trim, threshold,
                                 f"combine_{method_j}{suffix}")(member_outputs)
        if uncertainty:
            spread = MemberUncertainty(task, kinds, member_weights, threshold=threshold,
                                       name=f"uncertainty{suffix}")(member_outputs)
            prefix = "" if single else f"{output}_"
            outputs.update({f"{prefix}{k}": v for k, v in spread.items()})
    if len(outputs) == 1:
        outputs = next(iter(outputs.values()))
    label = method if isinstance(method, str) else "mixed"
    return keras.Model(inputs, outputs, name=name or f"ensemble_{label}")


def _warn_savedmodel_members(members):
    """Say, once per member holding a ``TFSMLayer``, that a saved ensemble loads only with ``safe_mode=False``."""
    for label, model in zip(members.labels, members.models):
        for _, layer in savedmodel_layers(model)[:1]:
            warnings.warn(
                f"ensemble(): {label} is a TensorFlow SavedModel (keras.layers.TFSMLayer from "
                f"{layer.filepath!r}); a .keras file of this ensemble loads only with "
                "keras.saving.load_model(path, safe_mode=False) (safe_mode=False in ensemblekit), "
                "with that SavedModel in place.",
                stacklevel=3,
            )


def _methods(method, members):
    """One method per predicted output (variance outputs have none), checked against its task."""
    names = [members.output_names[j] for j in members.predicted_outputs]
    tasks = [members.tasks[j] for j in members.predicted_outputs]
    if isinstance(method, dict):
        unknown = sorted(set(method) - set(names))
        if unknown:
            raise ValueError(f"method names output {unknown[0]!r}, but the outputs are {names}.")
        missing = [n for n in names if n not in method]
        if missing:
            raise ValueError(f"method gives no method for output {missing[0]!r}; outputs: {names}.")
        methods = [method[n] for n in names]
    else:
        methods = [method] * len(names)
    all_methods = sorted({m for task_methods in METHODS.values() for m in task_methods})
    for j, output, task, value in zip(members.predicted_outputs, names, tasks, methods):
        if value not in all_methods:
            check_choice(value, METHODS[task], "method")
        check_method(value, task, f"output {output!r}")
        if j in members.variance_pairs:
            check_mixture_method(value, f"output {output!r}")
    return methods


def _combiner(task, method, kinds, member_weights, trim, threshold, name):
    """ensemblekit's multiclass combiner layers (as in 0.1), ``MemberReduce`` for every other task."""
    if task == "multiclass":
        return COMBINERS[method](kinds, member_weights=member_weights, name=name)
    return MemberReduce(task, method, kinds, member_weights, trim=trim, threshold=threshold, name=name)
