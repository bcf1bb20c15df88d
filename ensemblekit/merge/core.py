"""``merge``: K models of one architecture become one model (weight-space merging).

Checks the arguments and the architectures, then hands the tensor-by-tensor
walk to ``ensemblekit.merge.engine``. Members may be models or files;
``.keras``/``.weights.h5`` files are streamed tensor by tensor
(``ensemblekit.merge.streaming``).
"""

from __future__ import annotations

import dataclasses
import os

import keras
import numpy as np

from ensemblekit._graph import check_same_architecture
from ensemblekit._io import load_members, load_model
from ensemblekit._validate import member_label
from ensemblekit.merge import streaming
from ensemblekit.merge.engine import (
    ModelSource,
    check_base_usage,
    check_member_weights,
    merge_weights,
)
from ensemblekit.merge.methods import get_method
from ensemblekit.merge.variables import (
    check_mergeable,
    float_template,
    quantization_plan,
    requantize,
)


@dataclasses.dataclass
class MergeReport:
    """What ``merge(..., return_report=True)`` did.

    Attributes:
        method: the merge method's name.
        params: the method's parameters after validation (defaults filled in).
        streamed: True when the members were read tensor by tensor from files.
        ingredients: for ``"greedy_soup"``, the indices of the members in the
            soup (ascending); ``None`` for other methods.
    """

    method: str
    params: dict
    streamed: bool
    ingredients: list | None = None


def merge(models, method="linear", base=None, weights=None, *, template=None, stream="auto",
          name=None, quantize=True, safe_mode=True, verbose=0, return_report=False, **params):
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
      accuracy (Wortsman et al., 2022) [``validation_data``: ``(x, y)`` or a dataset].

    Architectures are checked before any arithmetic: weight shapes, and every
    layer configuration key that changes the function (activation, epsilon,
    padding, strides, axis, dtype policy...), refused naming the layer and the
    key. NaN/inf in a member is an error. Each variable is merged by the rule of
    its kind (``ensemblekit.merge.variables``): trainable weights by the method,
    normalization statistics as the members' weighted mean, integer and seed
    state copied from the base (or first member).

    LoRA-enabled layers merge on their effective kernel ``W + (alpha/rank)·A·B``
    and come out as plain layers; int8/int4-quantized layers are dequantized by
    Keras' rule, merged in float and quantized again in the members' mode and
    block size (``quantize=False`` keeps the float result). float8, GPTQ and AWQ
    layers are refused. A one-member ``merge([model])`` folds LoRA adapters (or
    dequantizes, with ``quantize=False``) without changing the function.

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
        quantize: re-quantize layers that were quantized in the members (in
            their mode and block size); ``False`` returns float layers.
        safe_mode: used when loading ``.keras`` files.
        verbose: 1 shows a progress bar.
        return_report: also return a :class:`MergeReport` (e.g. which members
            the greedy soup kept).
        **params: the method's parameters.

    Returns:
        An ordinary ``keras.Model`` (a clone of the first member's
        architecture) holding the merged weights; with ``return_report=True``
        the tuple ``(model, MergeReport)``.

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
    check_base_usage(merge_method, base, len(models))
    if weights is not None and not merge_method.uses_weights:
        raise ValueError(f"merge method {method!r} does not take weights=.")
    member_weights = check_member_weights(weights, len(models), method)
    name = name or f"merged_{method}"

    if streaming.should_stream(models, base, merge_method, stream):
        output = streaming.merge_files(models, merge_method, base, member_weights, checked,
                                       template=template, name=name, safe_mode=safe_mode,
                                       verbose=verbose)
        return _with_report(output, merge_method, checked, True, return_report)
    members = load_members(models, min_count=1, what=f"merge method {method!r}", safe_mode=safe_mode)
    base_model = base if base is None or isinstance(base, keras.Model) else load_model(
        base, safe_mode=safe_mode, label="base")
    labels = [member_label(i, m) for i, m in enumerate(members)]
    everyone, everyone_labels = list(members), list(labels)
    if base_model is not None:
        everyone.append(base_model)
        everyone_labels.append(f"base ({base_model.name!r})")
    check_same_architecture(everyone, everyone_labels, function="merge", adapted_ok=True,
                            same_function=True)
    for model, label in zip(everyone, everyone_labels):
        check_mergeable(model, label)
    quantized = quantization_plan(members[0]) if quantize else []

    def linear_merge(subset):
        linear = get_method("linear")
        soup = float_template(members[0])
        merge_weights(soup, [ModelSource(m, f"member {i}", soup) for i, m in enumerate(subset)],
                      None, linear, np.ones(len(subset)), linear.check_params({}))
        return requantize(soup, quantized)

    members, member_weights = merge_method.prepare(members, base_model, member_weights, checked,
                                                   linear_merge, verbose=verbose)
    output = float_template(members[0], name=name)
    sources = [ModelSource(m, member_label(i, m), output) for i, m in enumerate(members)]
    base_source = None if base_model is None else ModelSource(
        base_model, f"base ({base_model.name!r})", output)
    merge_weights(output, sources, base_source, merge_method, member_weights, checked, verbose)
    return _with_report(requantize(output, quantized), merge_method, checked, False, return_report)


def _with_report(output, merge_method, params, streamed, return_report):
    if not return_report:
        return output
    ingredients = getattr(merge_method, "ingredients_", None)
    report = MergeReport(merge_method.name, dict(params), streamed,
                         None if ingredients is None else list(ingredients))
    return output, report
