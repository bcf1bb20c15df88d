"""``merge``: K models of one architecture become one model (weight-space merging).

The walk over weights happens here, once, for every method: check the
architectures, resolve per-layer parameters, then merge tensor by tensor.
Members may be models or files; ``.keras``/``.weights.h5`` files are streamed
tensor by tensor (``ensemblekit.merge.streaming``).
"""

from __future__ import annotations

import numbers
import os

import keras
import numpy as np

from ensemblekit._graph import check_same_architecture, weight_refs
from ensemblekit._io import load_members, load_model
from ensemblekit._validate import member_label
from ensemblekit.merge.methods import get_method, resolve_per_layer


class ModelSource:
    """Reads the weights of an in-memory model, in ``weight_refs`` order."""

    def __init__(self, model, label):
        self.model, self.label = model, label
        self.refs = weight_refs(model)

    def read(self, index):
        return self.refs[index].numpy()


def check_member_weights(weights, n_members, method_name):
    """Validate ``weights`` (one finite number per member, or a per-layer dict of such lists)."""

    def check(value, where):
        if isinstance(value, (str, bytes)) or not hasattr(value, "__len__"):
            raise TypeError(f"{where} must be a list of numbers, got {type(value).__name__}.")
        if len(value) != n_members:
            raise ValueError(f"{where} has {len(value)} entries but there are {n_members} members.")
        for i, w in enumerate(value):
            if isinstance(w, bool) or not isinstance(w, numbers.Real) or not np.isfinite(w):
                raise ValueError(f"{where}[{i}] is {w!r}; weights must be finite numbers.")
        return np.asarray(value, dtype="float64")

    if weights is None:
        return np.ones(n_members)
    if isinstance(weights, dict):
        if not weights:
            raise ValueError("weights is an empty dict; give at least a 'default' entry.")
        return {k: check(v, f"weights[{k!r}]") for k, v in weights.items()}
    return check(weights, "weights")


def _check_finite(array, label, path):
    if not np.all(np.isfinite(array)):
        bad = int(np.size(array) - np.count_nonzero(np.isfinite(array)))
        raise ValueError(f"{label}: weight {path!r} holds {bad} NaN/inf values; cannot merge it.")


def merge_weights(output, sources, base_source, method, weights, params, verbose=0):
    """Fill ``output``'s weights by merging ``sources`` tensor by tensor.

    Non-float weights (counters, seeds, integer tables) are copied from the
    base (or the first member), never averaged.

    Args:
        output: the model to write into (architecture of the members).
        sources: objects with ``label`` and ``read(index)`` (one per member).
        base_source: the same for the base model, or ``None``.
        method: a ``MergeMethod``.
        weights: per-member weights (array or per-layer dict of arrays).
        params: the method's checked parameters.
    """
    refs = weight_refs(output)
    paths = [ref.path for ref in refs]
    per_tensor = resolve_per_layer({**method.tensor_params(params), "weights": weights}, paths)
    progress = keras.utils.Progbar(len(refs), verbose=verbose, unit_name="weight")
    for index, ref in enumerate(refs):
        if not ref.is_float:
            ref.assign((base_source or sources[0]).read(index))
            progress.add(1)
            continue
        tensors = []
        for source in sources:
            tensor = np.asarray(source.read(index), dtype="float64")
            _check_finite(tensor, source.label, ref.path)
            tensors.append(tensor)
        base = None
        if base_source is not None:
            base = np.asarray(base_source.read(index), dtype="float64")
            _check_finite(base, base_source.label, ref.path)
        resolved = dict(per_tensor[index])
        member_weights = resolved.pop("weights")
        merged = method.merge_tensor(tensors, base, member_weights, ref.path, **resolved)
        _check_finite(merged, f"merged model ({method.name})", ref.path)
        ref.assign(merged)
        progress.add(1)
    return output


def _check_base_usage(method, base, n_members):
    if method.base == "required" and base is None:
        raise ValueError(f"merge method {method.name!r} needs base= (the model the members were tuned from).")
    if method.base == "unused" and base is not None:
        raise ValueError(f"merge method {method.name!r} does not use a base model; drop base=.")
    if method.n_models is not None and n_members != method.n_models:
        raise ValueError(
            f"merge method {method.name!r} merges exactly {method.n_models} models, got {n_members}."
        )


def merge(models, method="linear", base=None, weights=None, *, template=None, stream="auto",
          name=None, safe_mode=True, verbose=0, **params):
    """Merge models of one architecture into one model with the cost of one member.

    Methods (parameters in brackets; any per-tensor parameter and ``weights``
    may also be a dict ``{layer-path pattern: value}`` with a ``"default"``):

    - ``"linear"``: weighted average, the model soup (Wortsman et al., 2022)
      [``normalize=True``].
    - ``"task_arithmetic"``: ``base + λ Σ w_i (θ_i - base)`` (Ilharco et al.,
      2023) [``lambda_=1``, ``normalize=False``]; needs ``base``.
    - ``"ties"``: trim to ``density``, elect sign, disjoint mean (Yadav et al.,
      2023) [``density=0.2``, ``lambda_=1``]; needs ``base``.
    - ``"dare"`` / ``"dare_ties"``: random drop with keep-rate ``density`` and
      rescale (Yu et al., 2024), then add or TIES-merge [``density=0.5``,
      ``lambda_``, ``seed``, ``sign_consensus``]; needs ``base``.
    - ``"slerp"``: spherical interpolation of two models [``t=0.5``].
    - ``"greedy_soup"``: uniform soup of members added greedily by validation
      accuracy (Wortsman et al., 2022) [``x_val``, ``y_val``].

    Architectures are checked before any arithmetic; NaN/inf in a member is
    an error; non-float weights are copied from the base (or first member).

    Args:
        models: list of ``keras.Model`` or paths (``.keras``, ``.h5``,
            ``.weights.h5``).
        method: the merge method's name.
        base: the model the members were fine-tuned from (model or path).
        weights: one weight per member (default: all ones).
        template: a model (or ``.keras`` path) giving the architecture when the
            members are ``.weights.h5`` files.
        stream: ``"auto"`` streams when every member is a ``.keras``/
            ``.weights.h5`` path; ``True`` requires it; ``False`` loads all.
        name: name of the merged model (default ``"merged_<method>"``).
        safe_mode: used when loading ``.keras`` files.
        verbose: 1 shows a progress bar.
        **params: the method's parameters.

    Returns:
        An ordinary ``keras.Model`` (a clone of the first member's
        architecture) holding the merged weights.

    Example:
        >>> import keras, numpy as np
        >>> from ensemblekit.merge import align, merge
        >>> a = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
        >>> b = keras.models.clone_model(a)
        >>> m = merge([a, b], method="linear", weights=[1, 0])
        >>> bool(np.allclose(m.get_weights()[0], a.get_weights()[0]))
        True
    """
    merge_method = get_method(method)
    checked = merge_method.check_params(params)
    if isinstance(models, (keras.Model, str, os.PathLike)) or not isinstance(models, (list, tuple)):
        raise TypeError(
            f"models must be a list of keras.Model objects or paths, got {type(models).__name__}."
        )
    _check_base_usage(merge_method, base, len(models))
    if weights is not None and not merge_method.uses_weights:
        raise ValueError(f"merge method {method!r} does not take weights=.")
    member_weights = check_member_weights(weights, len(models), method)
    name = name or f"merged_{method}"

    from ensemblekit.merge import streaming

    if streaming.should_stream(models, base, merge_method, stream):
        return streaming.merge_files(models, merge_method, base, member_weights, checked,
                                     template=template, name=name, safe_mode=safe_mode,
                                     verbose=verbose)
    members = load_members(models, min_count=1, what=f"merge method {method!r}", safe_mode=safe_mode)
    base_model = base if base is None or isinstance(base, keras.Model) else load_model(
        base, safe_mode=safe_mode, label="base")
    labels = [member_label(i, m) for i, m in enumerate(members)]
    if base_model is not None:
        members_and_base = members + [base_model]
        check_same_architecture(members_and_base, labels + [f"base ({base_model.name!r})"])
    else:
        check_same_architecture(members, labels)

    def linear_merge(subset):
        linear = get_method("linear")
        return merge_weights(keras.models.clone_model(members[0]),
                             [ModelSource(m, f"member {i}") for i, m in enumerate(subset)],
                             None, linear, np.ones(len(subset)), linear.check_params({}))

    members, member_weights = merge_method.prepare(members, base_model, member_weights, checked,
                                                   linear_merge, verbose=verbose)
    output = keras.models.clone_model(members[0])
    output.name = name
    sources = [ModelSource(m, member_label(i, m)) for i, m in enumerate(members)]
    base_source = None if base_model is None else ModelSource(base_model, f"base ({base_model.name!r})")
    merge_weights(output, sources, base_source, merge_method, member_weights, checked, verbose)
    if hasattr(merge_method, "ingredients_"):
        output.merge_ingredients_ = list(merge_method.ingredients_)
    return output
