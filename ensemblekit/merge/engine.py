"""The merge engine: walk the members' weights once and merge them tensor by tensor.

``merge`` (in-memory members, ``ensemblekit.merge.core``) and the out-of-core
path (``ensemblekit.merge.streaming``) both run :func:`merge_weights` over
*sources*: objects that read one member's tensor by its position in
``weight_refs`` order. Each merge method (``ensemblekit.merge.methods``) only
sees the tensors of one weight at a time.
"""

from __future__ import annotations

import numbers

import keras
import numpy as np

from ensemblekit._graph import weight_refs
from ensemblekit.merge.methods import resolve_per_layer
from ensemblekit.merge.variables import STATE, STATISTIC, float_readers, variable_kinds


class ModelSource:
    """Reads an in-memory model's float weights in the ``weight_refs`` order of ``template``.

    ``template`` is the merged model's float architecture
    (``variables.float_template``): LoRA-enabled layers are read as their
    effective kernel, quantized ones dequantized (``ensemblekit.merge.variables``).
    Without a template the model's own weights are read as they are.
    """

    def __init__(self, model, label, template=None):
        self.model, self.label = model, label
        if template is None:
            self.readers = [ref.numpy for ref in weight_refs(model)]
        else:
            self.readers = float_readers(model, template, label)

    def read(self, index):
        return self.readers[index]()


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

    Each weight is merged by the rule of its kind
    (``ensemblekit.merge.variables.variable_kinds``): trainable weights by the
    method, normalization statistics by ``method.merge_statistic``, and
    integer, boolean and seed state copied from the base (or the first member),
    never averaged.

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
    kinds = variable_kinds(output, f"merged model {output.name!r}")
    progress = keras.utils.Progbar(len(refs), verbose=verbose, unit_name="weight")
    for index, ref in enumerate(refs):
        if kinds[index] == STATE:
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
        if kinds[index] == STATISTIC:
            merged = method.merge_statistic(tensors, member_weights, ref.path, **resolved)
        else:
            merged = method.merge_tensor(tensors, base, member_weights, ref.path, **resolved)
        _check_finite(merged, f"merged model ({method.name})", ref.path)
        ref.assign(merged)
        progress.add(1)
    return output


def check_base_usage(method, base, n_members):
    if method.base == "required" and base is None:
        raise ValueError(f"merge method {method.name!r} needs base= (the model the members were tuned from).")
    if method.base == "unused" and base is not None:
        raise ValueError(f"merge method {method.name!r} does not use a base model; drop base=.")
    if method.n_models is not None and n_members != method.n_models:
        raise ValueError(
            f"merge method {method.name!r} merges exactly {method.n_models} models, got {n_members}."
        )
