"""``pack`` and ``unpack``: K members of one architecture as ONE wide model, and back.

``pack`` rebuilds the members' shared architecture layer by layer (through
``_graph.graph_operations``) with the grouped layers of ``ensemblekit.pack.layers``,
which hold all K members' weights stacked on a member axis. The packed model
computes every member exactly, so it equals ``ek.ensemble`` of the members.

The idea is the "wide model" view of ensembles in BatchEnsemble (Wen et al.,
2020, arXiv:2002.06715) without the rank-1 sharing: every member keeps its own
full weights.
"""

from __future__ import annotations

import json

import keras
import numpy as np

from ensemblekit._channels import SPATIAL_DROPOUT, UNKNOWN_KIND, layer_kind, unsupported_reason
from ensemblekit._graph import (
    check_same_architecture,
    graph_operations,
    model_input_shape,
    model_output_shape,
)
from ensemblekit._io import load_members
from ensemblekit._outputs import check_output_kinds, detect_output_kind
from ensemblekit._validate import check_choice, member_label
from ensemblekit.inference import LOWERINGS, POLICY
from ensemblekit.pack.layers import (
    REDUCTIONS,
    GroupedBatchNormalization,
    GroupedConv,
    GroupedDense,
    GroupedLayerNormalization,
    MemberBroadcast,
    MemberChannels,
    MemberFlatten,
    PackedOutput,
    _MemberLayer,
)

L = keras.layers
# Kinds of ``_channels.layer_kind`` a packed model carries without grouped weights.
_CARRIED_KINDS = ("elementwise", "spatial", "merge", "concat", "flatten")
_SUPPORTED = ("Dense, Conv1D, Conv2D, BatchNormalization, LayerNormalization, Flatten, "
              "Concatenate, Add/Subtract/Multiply/Average/Maximum/Minimum, activations, dropout, "
              "pooling, padding, cropping, up-sampling")
# Config keys that do not change what a layer computes at inference.
_IGNORED_CONFIG = ("name", "trainable", "dtype", "seed", "rate", "stddev", "noise_shape", "momentum")


def pack(models, reduce="mean", output_kind=None, lowering="auto", name=None, safe_mode=True):
    """Pack K members of one architecture into ONE model with grouped layers.

    The packed model computes every member exactly (up to float rounding) in
    one wide graph, so it replaces ``ek.ensemble`` where the members share an
    architecture and throughput matters. See the module docstring for the layout.

    Args:
        models: list of ``keras.Model`` (Sequential or functional, incl. residual
            ``Add``/``Concatenate``) or paths to ``.keras``/``.h5`` files, all of one
            architecture, one input, ``(batch, classes)`` output.
        reduce: ``"mean"`` (mean of probabilities, as ``ek.ensemble(models, "mean")``),
            ``"logit_mean"`` (as ``ek.ensemble(models, "logit_mean")``) or ``"none"``
            (the members' outputs, ``(batch, K, classes)``).
        output_kind: what the members output: ``None`` detects a final softmax, or
            ``"logits"``/``"probs"``.
        lowering: ``"auto"`` (``ensemblekit.inference.LoweringPolicy`` decides per
            layer kind and traced shape), ``"grouped"`` (one einsum / grouped
            convolution per layer) or ``"loop"`` (K ops per layer).
        name: name of the packed model (default ``"packed_<reduce>"``).
        safe_mode: used when loading members from files.

    Returns:
        A ``keras.Model`` from the shared input to the reduced output; save it as
        ``.keras`` and load it in ``safe_mode``; ``unpack`` gives the members back.

    Raises:
        ValueError: the members differ in architecture, or a layer is not supported
            (the message names the member and the layer).

    Limitations: the packed model is for inference (BatchNormalization uses the
    moving statistics); layers must be channels-last; nested models and layers
    called twice inside one member are not supported.

    Example:
        >>> import keras, numpy as np
        >>> import ensemblekit as ek
        >>> members = [keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, activation="relu"),
        ...                              keras.layers.Dense(3)]) for _ in range(3)]
        >>> packed = pack(members, reduce="mean")
        >>> x = np.random.default_rng(0).normal(size=(5, 4)).astype("float32")
        >>> bool(np.allclose(packed.predict(x, verbose=0), ek.ensemble(members).predict(x, verbose=0), atol=1e-5))
        True
    """
    check_choice(reduce, REDUCTIONS, "reduce")
    check_choice(lowering, LOWERINGS, "lowering")
    models = load_members(models, min_count=2, what="pack", safe_mode=safe_mode)
    labels = [member_label(i, m) for i, m in enumerate(models)]
    check_same_architecture(models, labels)
    graphs = [_member_graph(model, label) for model, label in zip(models, labels, strict=True)]
    _check_same_layers(graphs, labels)
    member_kind = check_output_kinds(output_kind, len(models))[0] or detect_output_kind(models[0])

    num_members = len(models)
    tensors, weighted = {}, []
    for position, (layer, parents) in enumerate(graphs[0]):
        if isinstance(layer, L.InputLayer):
            inputs = keras.Input(model_input_shape(models[0]), name=layer.name)
            tensors[layer.name] = (inputs, False)
            continue
        layer_inputs = [tensors[parent.name] for parent in parents]
        packed_layer = _packed_layer(layer, layer_inputs, num_members, lowering, labels[0])
        tensors[layer.name] = _apply(packed_layer, layer, layer_inputs, num_members)
        if layer.weights:
            packed_layer.set_weights(_stack_weights([g[position][0] for g in graphs], packed_layer))
            weighted.append(layer.name)

    output, has_members = tensors[graphs[0][-1][0].name]
    if not has_members:
        output = MemberBroadcast(num_members, name="member_broadcast_output")(output)
    member_configs = [json.dumps(keras.saving.serialize_keras_object(m)) for m in models]
    reducer = PackedOutput(reduce, member_kind, member_configs, weighted, name=f"packed_output_{reduce}")
    return keras.Model(inputs, reducer(output), name=name or f"packed_{reduce}")


def _member_graph(model, label):
    try:
        graph = graph_operations(model)
        model_output_shape(model)
    except ValueError as error:
        raise ValueError(f"pack: {label}: {error}") from None
    if len(model_output_shape(model)) != 1:
        raise ValueError(
            f"pack: {label} outputs shape {(None, *model_output_shape(model))}; members must be "
            "classifiers with output (batch, classes)."
        )
    for layer, _ in graph:
        if isinstance(layer, keras.Model):
            raise ValueError(
                f"pack: {label}, layer {layer.name!r} is a nested model ({type(layer).__name__}); "
                "pack members whose layers are not nested models."
            )
    return graph


def _semantic_config(layer):
    config = layer.get_config()
    return {key: value for key, value in config.items() if key not in _IGNORED_CONFIG
            and not key.endswith(("_initializer", "_regularizer", "_constraint"))}


def _check_same_layers(graphs, labels):
    reference = graphs[0]
    for label, graph in zip(labels[1:], graphs[1:], strict=True):
        if len(graph) != len(reference):
            raise ValueError(
                f"pack: {label} has {len(graph)} layers but {labels[0]} has {len(reference)}."
            )
        for (layer0, parents0), (layer, parents) in zip(reference, graph, strict=True):
            where = f"{label}, layer {layer.name!r} ({type(layer).__name__})"
            if type(layer) is not type(layer0) or _semantic_config(layer) != _semantic_config(layer0):
                raise ValueError(
                    f"pack: {where} differs from {labels[0]}'s layer {layer0.name!r} "
                    f"({type(layer0).__name__}): {_config_diff(layer0, layer)}."
                )
            if [graph.index(next(op for op in graph if op[0] is p)) for p in parents] != [
                    reference.index(next(op for op in reference if op[0] is p)) for p in parents0]:
                raise ValueError(f"pack: {where} is wired to different inputs than in {labels[0]}.")


def _config_diff(layer0, layer):
    if type(layer) is not type(layer0):
        return "different layer types"
    config0, config = _semantic_config(layer0), _semantic_config(layer)
    keys = sorted(k for k in set(config0) | set(config) if config0.get(k) != config.get(k))
    return ", ".join(f"{k}={config.get(k)!r} vs {config0.get(k)!r}" for k in keys)


def _unsupported(layer, label, reason=None):
    return ValueError(
        f"pack: {label}, layer {layer.name!r} ({type(layer).__name__}) "
        + (reason or f"is not supported; pack supports {_SUPPORTED}") + "."
    )


def _member_shapes(layer_inputs):
    """The shapes the member layer saw: the packed tensors' shapes without the member axis."""
    return [tuple(t.shape[:-2]) + tuple(t.shape[-1:]) if has_members else tuple(t.shape)
            for t, has_members in layer_inputs]


def _packed_layer(layer, layer_inputs, num_members, lowering, label):
    """The packed counterpart of member layer ``layer`` (all members' configs are equal).

    What a layer does to the channel axis comes from the one table of layer kinds
    (``ensemblekit._channels.layer_kind``); each kind has one packed form.
    """
    shapes = _member_shapes(layer_inputs)
    kind = layer_kind(layer, shapes)
    if kind is None:
        reason = unsupported_reason(layer, shapes)
        known = not reason.startswith(UNKNOWN_KIND)
        raise _unsupported(layer, label, f"cannot be packed: {reason}" if known else None)
    shared = not any(has_members for _, has_members in layer_inputs)
    common = dict(num_members=num_members, shared_input=shared, name=layer.name)
    if kind == "producer":
        return _grouped_producer(layer, common, lowering, label)
    if kind == "norm":
        return _grouped_norm(layer, common, label)
    if layer.weights or kind not in _CARRIED_KINDS:
        raise _unsupported(layer, label)
    config = layer.get_config()
    if shared:
        return type(layer).from_config(config)
    if kind == "spatial" and isinstance(layer, SPATIAL_DROPOUT):
        return L.Identity(name=layer.name)  # identity at inference; per-member masks would differ
    if kind == "spatial":
        return MemberChannels(type(layer).from_config(config), num_members=num_members, name=layer.name)
    if kind == "concat":
        rank = len(shapes[0])
        axis = config["axis"] % rank
        return L.Concatenate(axis=-1 if axis == rank - 1 else axis, name=layer.name)
    if kind == "flatten":
        return MemberFlatten(name=layer.name)
    return type(layer).from_config(config)  # elementwise layers and merges act per member already


def _grouped_producer(layer, common, lowering, label):
    config = layer.get_config()
    if type(layer) is L.Dense:
        return GroupedDense(config["units"], activation=config["activation"], use_bias=config["use_bias"],
                            lowering=POLICY.for_layer("dense", lowering), **common)
    if type(layer) not in (L.Conv1D, L.Conv2D) or config["padding"] == "causal":
        raise _unsupported(layer, label)
    rank = 1 if type(layer) is L.Conv1D else 2
    return GroupedConv(rank, config["filters"], config["kernel_size"], strides=config["strides"],
                       padding=config["padding"], dilation_rate=config["dilation_rate"],
                       activation=config["activation"], use_bias=config["use_bias"],
                       lowering=POLICY.for_layer("conv", lowering), **common)


def _grouped_norm(layer, common, label):
    config = layer.get_config()
    if config.get("renorm") or config.get("synchronized"):
        raise _unsupported(layer, label, "uses renorm or synchronized statistics; pack supports neither")
    norm = dict(epsilon=config["epsilon"], center=config["center"], scale=config["scale"], **common)
    if type(layer) is L.BatchNormalization:
        return GroupedBatchNormalization(**norm)
    return GroupedLayerNormalization(rms_scaling=config.get("rms_scaling", False), **norm)


def _apply(packed_layer, layer, layer_inputs, num_members):
    """Call ``packed_layer``; broadcast shared inputs of merges that also see member tensors."""
    has_members = [flag for _, flag in layer_inputs]
    tensors = [tensor for tensor, _ in layer_inputs]
    if any(has_members) and not all(has_members):
        tensors = [t if flag else MemberBroadcast(num_members, name=f"{layer.name}_broadcast_{i}")(t)
                   for i, (t, flag) in enumerate(zip(tensors, has_members, strict=True))]
    output = packed_layer(tensors if len(tensors) > 1 else tensors[0])
    return output, isinstance(packed_layer, _MemberLayer) or any(has_members)


def _stack_weights(layers, packed_layer):
    """The K members' weights of one layer, stacked into ``packed_layer``'s variables."""
    per_member = [layer.get_weights() for layer in layers]
    stacked = []
    for position, variable in enumerate(packed_layer.weights):
        arrays = [weights[position] for weights in per_member]
        if isinstance(packed_layer, GroupedConv):
            stacked.append(np.concatenate(arrays, axis=-1))
        elif isinstance(packed_layer, GroupedDense) and packed_layer.shared_input and position == 0:
            stacked.append(np.stack(arrays, axis=1))
        else:
            stacked.append(np.stack(arrays, axis=0))
        if stacked[-1].shape != tuple(variable.shape):
            raise ValueError(
                f"pack: layer {packed_layer.name!r}: stacked weight {variable.name!r} has shape "
                f"{stacked[-1].shape}, expected {tuple(variable.shape)}."
            )
    return stacked


def unpack(packed):
    """Give back the K members of a packed model, with exactly their weights.

    Args:
        packed: a model returned by ``pack`` (or loaded from its ``.keras`` file).

    Returns:
        A list of K ``keras.Model``, each with its original architecture and name.

    Example:
        >>> import keras, numpy as np
        >>> members = [keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)]) for _ in range(2)]
        >>> back = unpack(pack(members))
        >>> all(np.array_equal(a, b) for a, b in zip(back[1].get_weights(), members[1].get_weights()))
        True
    """
    if not isinstance(packed, keras.Model):
        raise TypeError(f"unpack expects a keras.Model made by pack, got {type(packed).__name__}.")
    records = [layer for layer in packed.layers if isinstance(layer, PackedOutput)]
    if len(records) != 1:
        raise ValueError(f"Model {packed.name!r} was not made by ek.pack (it has no PackedOutput layer).")
    record = records[0]
    members = []
    for index, config in enumerate(record.member_configs):
        member = keras.saving.deserialize_keras_object(json.loads(config))
        weighted = [layer for layer, _ in graph_operations(member) if layer.weights]
        for layer, packed_name in zip(weighted, record.weighted_layers, strict=True):
            layer.set_weights(packed.get_layer(packed_name).member_weights(index))
        members.append(member)
    return members
