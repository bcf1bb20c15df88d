"""What each variable of a merge is, and the float weights the merge works on.

A merge combines the *functions* its members compute, so the engine never
sees a layer's storage format:

- a LoRA-enabled layer is seen through its effective kernel
  ``W + (alpha / rank) · A · B`` (what Keras computes in ``call`` and writes
  when it saves: ``Dense.save_own_variables``);
- an int8/int4-quantized ``Dense``, ``EinsumDense`` or ``Embedding`` is seen
  through Keras' own dequantization rule for its mode (int8: ``q / scale``, the
  scale's axes adjusted for ``EinsumDense``; int4 per channel: unpacked
  ``q / scale``; int4 in sub-channel blocks: ``(q − zero) · scale`` per group);
  float8, GPTQ and AWQ layers are refused (their scales are calibrated per
  model, so no float kernel is defined to merge).

The merged model is a *float template* of member 0 (the same architecture
with plain float layers: no adapters, no quantized storage) and, by default,
is quantized again in the members' mode and block size afterwards.

Every variable of the template has one kind, with one rule:

===============  ===========================================================
``"weight"``     a layer's trainable float weight (frozen or not): the merge
                 method's rule.
``"statistic"``  a normalization statistic (``BatchNormalization``'s moving
                 mean and variance, ``Normalization``'s adapted mean and
                 variance): the members' mean weighted by their merge
                 weights (``MergeMethod.merge_statistic``); ``ek.reset_bn``
                 re-estimates BatchNorm statistics from data.
``"state"``      integer, boolean or seed state: copied from the base (or
                 member 0), never averaged.
===============  ===========================================================

Adapter factors and quantization variables (codes, scales, zero points, group
indices) never reach the engine: they are folded into the effective kernel.
Any other variable (a non-trainable float of unknown meaning) is refused
rather than averaged blindly.
"""

from __future__ import annotations

import keras
import numpy as np
from keras import ops

from ensemblekit._graph import iter_layers, iter_sublayers, weight_refs

WEIGHT, STATISTIC, STATE = "weight", "statistic", "state"
MERGEABLE_MODES = ("int8", "int4")
_QUANTIZED_CLASSES = {"Dense": "kernel", "EinsumDense": "kernel", "Embedding": "embeddings"}
_STATISTICS = {"BatchNormalization": ("moving_mean", "moving_variance"),
               "Normalization": ("mean", "variance")}


def sublayers(layer):
    """``layer`` and every layer inside it (a keras-hub block's Dense and EinsumDense), in order."""
    return list(layer._flatten_layers(include_self=True, recursive=True))


def own_variables(layer):
    """The variables ``layer`` created itself (not its sublayers'), in ``layer.weights`` order."""
    seen, result = set(), []
    for variable in list(layer._trainable_variables) + list(layer._non_trainable_variables):
        if id(variable) not in seen:
            seen.add(id(variable))
            result.append(variable)
    return result


def is_adapted(layer):
    """True when ``layer``'s variables are not its plain weights (LoRA enabled or quantized)."""
    return bool(getattr(layer, "lora_enabled", False) or getattr(layer, "quantization_mode", None))


def _main_variable(layer):
    return "embeddings" if isinstance(layer, keras.layers.Embedding) else "kernel"


def check_mergeable(model, label, function="merge"):
    """Refuse quantized layers whose float weights cannot be read (float8, GPTQ, AWQ, other classes)."""
    for where, layer in iter_sublayers(model):
        mode = getattr(layer, "quantization_mode", None)
        if mode and mode not in MERGEABLE_MODES:
            raise ValueError(
                f"{function}: {label}: layer {where!r} is {mode}-quantized; only int8 and int4 "
                f"layers can be dequantized exactly ({mode} scales are calibrated per model). "
                "Merge the float members and quantize the result with ek.quantize."
            )
        if mode and type(layer).__name__ not in _QUANTIZED_CLASSES:
            raise ValueError(
                f"{function}: {label}: layer {where!r} ({type(layer).__name__}) is {mode}-"
                "quantized and has no known dequantization rule (Dense, EinsumDense and "
                "Embedding have); merge the float members instead."
            )


def effective_kernel(layer):
    """The float kernel (or embeddings) ``layer`` computes with: dequantized, LoRA folded in.

    Example:
        >>> layer = keras.layers.Dense(2)
        >>> layer.build((3,))
        >>> layer.enable_lora(1)
        >>> _ = layer.lora_kernel_b.assign(np.ones((1, 2)))
        >>> expected = layer._kernel.numpy() + layer.lora_kernel_a.numpy() @ np.ones((1, 2))
        >>> bool(np.allclose(effective_kernel(layer), expected, atol=1e-6))
        True
    """
    mode = getattr(layer, "quantization_mode", None)
    if not mode:
        return keras.ops.convert_to_numpy(getattr(layer, _main_variable(layer))).astype("float64")
    kernel = _dequantized(layer, mode)
    if getattr(layer, "lora_enabled", False):
        a, b = ((layer.lora_embeddings_a, layer.lora_embeddings_b)
                if isinstance(layer, keras.layers.Embedding)
                else (layer.lora_kernel_a, layer.lora_kernel_b))
        delta = keras.ops.convert_to_numpy(a).astype("float64") @ keras.ops.convert_to_numpy(b)
        kernel = kernel + (layer.lora_alpha / layer.lora_rank) * delta.reshape(kernel.shape)
    return kernel


def _dequantized(layer, mode):
    """Keras' own dequantization of ``layer``'s stored codes (the rule of its
    ``_get_kernel_with_merged_lora``/``_get_embeddings_with_merged_lora``)."""
    # Keras exports no dequantizer for sub-channel int4; this is the one its layers call.
    from keras.src.quantizers.quantizers import dequantize_with_sz_map

    embedding = isinstance(layer, keras.layers.Embedding)
    codes = layer._embeddings if embedding else layer._kernel
    scale = layer.embeddings_scale if embedding else layer.kernel_scale
    if mode == "int8":
        if isinstance(layer, keras.layers.EinsumDense):
            scale = layer._adjust_scale_for_dequant(scale)
        elif embedding:
            scale = ops.expand_dims(scale, axis=-1)
        return _numpy(ops.divide(ops.cast(codes, "float32"), scale))
    columns = (layer._int4_unpacked_column_size if isinstance(layer, keras.layers.EinsumDense)
               else layer._orig_output_dim)
    unpacked = keras.quantizers.unpack_int4(codes, columns, axis=-1)
    block_size = getattr(layer, "_int4_block_size", None)
    if block_size is None or block_size == -1:
        scale = ops.expand_dims(scale, axis=-1) if embedding else scale
        kernel = ops.divide(ops.cast(unpacked, "float32"), scale)
    else:
        zero = layer.embeddings_zero if embedding else layer.kernel_zero
        kernel = dequantize_with_sz_map(ops.cast(unpacked, "float32"), scale, zero, layer.g_idx,
                                        group_axis=-1 if embedding else 0)
    if isinstance(layer, keras.layers.EinsumDense):
        kernel = ops.reshape(kernel, layer.original_kernel_shape)
    return _numpy(kernel)


def _numpy(tensor):
    return np.asarray(keras.ops.convert_to_numpy(tensor), dtype="float64")


def _float_clone(layer):
    """A fresh plain float copy of ``layer`` (no LoRA, no quantized storage)."""
    if isinstance(layer, keras.Model) or not is_adapted(layer):
        return layer.__class__.from_config(layer.get_config())
    config = layer.get_config()
    config.pop("lora_rank", None)
    config.pop("lora_alpha", None)
    if config.get("quantization_config") is not None:
        config["quantization_config"] = None
    policy = layer.dtype_policy
    if getattr(policy, "quantization_mode", None):
        config["dtype"] = policy.name.split("_from_")[-1]
    return layer.__class__.from_config(config)


def float_template(model, name=None):
    """``model``'s architecture with plain float layers, newly initialized.

    LoRA-enabled layers come back as plain layers and quantized ones in their
    source float policy, so the merged model holds ordinary float kernels.
    """
    clone = keras.models.clone_model(model, clone_function=_float_clone, recursive=True)
    if name:
        clone.name = name
    return clone


def layer_pairs(template, model):
    """``[(template sublayer, model sublayer, path)]`` matched by position (one architecture)."""
    pairs = []
    for (path, leaf), (_, other) in zip(iter_layers(template), iter_layers(model), strict=True):
        inner, inner_other = sublayers(leaf), sublayers(other)
        if len(inner) != len(inner_other):
            raise ValueError(
                f"Layer {path!r} holds {len(inner_other)} layers in {model.name!r} but "
                f"{len(inner)} in its float template; cannot read its float weights."
            )
        for layer, layer_other in zip(inner, inner_other, strict=True):
            pairs.append((layer, layer_other, path if layer is leaf else f"{path}/{layer.name}"))
    return pairs


def float_readers(model, template, label):
    """One zero-argument reader per weight of ``template`` (``weight_refs`` order) giving
    ``model``'s float value of that weight: plain layers by slot, adapted ones by name."""
    by_id = {}
    for layer, other, path in layer_pairs(template, model):
        variables, variables_other = own_variables(layer), own_variables(other)
        if not is_adapted(other):
            if len(variables) != len(variables_other):
                raise ValueError(
                    f"merge: {label}: layer {path!r} has {len(variables_other)} variables, "
                    f"its float template {len(variables)}."
                )
            for variable, variable_other in zip(variables, variables_other, strict=True):
                by_id[id(variable)] = _reader(variable_other)
            continue
        named = {v.name: v for v in variables_other}
        main = _main_variable(other)
        for variable in variables:
            if variable.name == main:
                by_id[id(variable)] = (lambda layer=other: effective_kernel(layer))
            elif variable.name in named:
                by_id[id(variable)] = _reader(named[variable.name])
            else:
                raise ValueError(
                    f"merge: {label}: layer {path!r} ({type(other).__name__}) has no variable "
                    f"{variable.name!r} to read its float weights from."
                )
    return [by_id[id(ref.variable)] for ref in weight_refs(template)]


def _reader(variable):
    return lambda: keras.ops.convert_to_numpy(variable)


def variable_kinds(template, label="merged model"):
    """The kind of every weight of ``template`` (``weight_refs`` order): see the module docstring.

    Raises:
        ValueError: a non-trainable float variable that is not a known statistic.
    """
    owner = {}
    for path, layer in iter_sublayers(template):
        trainable = {id(v) for v in layer._trainable_variables}
        for variable in own_variables(layer):
            owner[id(variable)] = (layer, path, id(variable) in trainable)
    kinds = []
    for ref in weight_refs(template):
        layer, path, trainable = owner.get(id(ref.variable), (ref.layer, ref.layer_path, False))
        if not ref.is_float:
            kinds.append(STATE)
        elif trainable:
            kinds.append(WEIGHT)
        elif ref.variable.name in _STATISTICS.get(type(layer).__name__, ()):
            kinds.append(STATISTIC)
        else:
            raise ValueError(
                f"merge: {label}: variable {ref.path!r} of layer {path!r} "
                f"({type(layer).__name__}) is a non-trainable float of unknown meaning (not a "
                "weight, not a normalization statistic); it is not averaged blindly. Merge "
                "models without it, or copy it yourself after a merge of the other layers."
            )
    return kinds


def quantization_plan(model):
    """``[(position, mode, block_size)]`` of ``model``'s quantized sublayers, by position in
    ``layer_pairs`` order."""
    return [(position, layer.quantization_mode, getattr(layer.dtype_policy, "block_size", None))
            for position, (_, layer) in enumerate(iter_sublayers(model))
            if getattr(layer, "quantization_mode", None)]


def requantize(template, plan):
    """Quantize ``template``'s sublayers as ``plan`` (from :func:`quantization_plan`) says."""
    if not plan:
        return template
    layers = [layer for _, layer in iter_sublayers(template)]
    for position, mode, block_size in plan:
        config = None
        if mode == "int4":
            config = keras.quantizers.Int4QuantizationConfig(block_size=block_size)
        layers[position].quantize(mode, config=config)
    return template
