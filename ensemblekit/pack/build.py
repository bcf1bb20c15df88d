"""``pack`` and ``unpack``: K members of one architecture as ONE wide model, and back.

``pack`` rebuilds the members' shared architecture call by call (through
``_graph.flat_nodes``: nested models expanded in place) with the grouped layers
of ``ensemblekit.pack.layers``, which hold all K members' weights stacked on a
member axis. The packed model computes every member exactly, so it equals
``ek.ensemble`` of the members. What each layer does to the channel axis comes
from the one table of layer kinds (``ensemblekit._channels.layer_kind``); each
kind has one packed form (``_PACKED_FORMS``).

keras-hub image classifiers pack the same way: their backbone is a nested
functional model, and ViT's composite layers (patch embedding, transformer
encoder) have grouped forms of their own. A depthwise/separable convolution
with ``depth_multiplier > 1`` is kept whole by the channel graph but packs.

The idea is the "wide model" view of ensembles in BatchEnsemble (Wen et al.,
2020, arXiv:2002.06715) without the rank-1 sharing: every member keeps its own
full weights.
"""

from __future__ import annotations

import itertools
import json

import keras
import numpy as np

from ensemblekit._channels import (
    ENCODERS,
    SPATIAL_DROPOUT,
    UNKNOWN_KIND,
    encoder_blocks,
    layer_kind,
    recreate,
    unsupported_reason,
)
from ensemblekit._graph import (
    check_same_architecture,
    flat_nodes,
    iter_layers,
)
from ensemblekit._io import load_members
from ensemblekit._outputs import (
    check_output_kinds,
    check_task,
    detect_output_kind,
    detect_task,
    output_names,
    structured_inputs,
)
from ensemblekit._packed import finalize, output_layers, rebuild_members, unpack_record
from ensemblekit._tasks import (
    MemberMixture,
    check_method,
    check_mixture_method,
    check_variance_kind,
    check_variance_member,
    paired_task,
    variance_pairs,
)
from ensemblekit._validate import check_choice, member_label
from ensemblekit.inference import LOWERINGS, POLICY
from ensemblekit.pack.layers import (
    REDUCTIONS,
    GroupedBatchNormalization,
    GroupedConv,
    GroupedDense,
    GroupedDepthwiseConv,
    GroupedLayerNormalization,
    GroupedPatchEmbedding,
    GroupedScale,
    GroupedSeparableConv,
    GroupedTransformerEncoder,
    MemberBroadcast,
    MemberChannels,
    MemberConstants,
    MemberFlatten,
    PackedOutput,
    _MemberLayer,
)

L = keras.layers
_SUPPORTED = ("Dense, Conv1D/Conv2D (groups too), DepthwiseConv1D/2D, SeparableConv1D/2D, "
              "BatchNormalization, LayerNormalization, Normalization, Rescaling, LayerScale, Reshape, "
              "Flatten, Concatenate, Add/Subtract/Multiply/Average/Maximum/Minimum, activations, "
              "dropout, pooling, padding, cropping, up-sampling, x[:, i] indexing, keras.ops.mean over token axes, nested "
              "functional/Sequential models, keras-hub ViTPatchingAndEmbedding/ViTEncoder/ViTEncoderBlock")
# Config keys that do not change what a layer computes at inference.
_IGNORED_CONFIG = ("name", "trainable", "dtype", "seed", "rate", "stddev", "noise_shape", "momentum")
# The channel graph keeps a depthwise/separable layer with depth_multiplier M > 1 whole (output c*M+m
# reads input c); its grouped form holds the M outputs of each input channel contiguously, so it packs.
_MULTIPLIED = "depth_multiplier != 1"
# Element-wise layers that are the identity at inference (per-member random masks would differ).
_INFERENCE_IDENTITY = ("StochasticDepth",)


def pack(models, reduce="mean", output_kind=None, lowering="auto", name=None, safe_mode=True,
         task=None, uncertainty=False, trim=0.2, threshold=0.5, variance=None, variance_kind="variance"):
    """Pack K members of one architecture into ONE model with grouped layers.

    The packed model computes every member exactly (up to float rounding) in
    one wide graph, so it replaces ``ek.ensemble`` where the members share an
    architecture and throughput matters. See the module docstring for the layout.

    Args:
        models: list of ``keras.Model`` (Sequential or functional, incl. residual
            ``Add``/``Concatenate``, squeeze-and-excitation gates and nested
            functional/Sequential models such as a ``keras.applications`` base
            inside a new head) or paths to ``.keras``/``.h5`` files, all of one
            architecture: one or several inputs and outputs (a list or a dict), each
            output of any task and shape ``(batch, ..., units)``.
        reduce: any method ``ek.ensemble`` has for the members' task but
            ``"weighted"`` — ``"mean"`` (as ``ek.ensemble(models, "mean")``),
            ``"logit_mean"``, ``"geometric"``, ``"vote"``; for regression ``"mean"``,
            ``"median"``, ``"trimmed_mean"`` — or ``"none"`` (the members'
            outputs, ``(batch, K, ...)``); or ``{output name: reduce}``.
        output_kind: what the members output: ``None`` detects a final softmax or
            sigmoid, or ``"logits"``/``"probs"``.
        lowering: ``"auto"`` (``ensemblekit.inference.LoweringPolicy`` decides per
            layer kind and traced shape), ``"grouped"`` (one einsum / grouped
            convolution per layer) or ``"loop"`` (K ops per layer).
        name: name of the packed model (default ``"packed_<reduce>"``).
        safe_mode: used when loading members from files.
        task: the members' task, as in ``ek.ensemble`` (``None`` detects it).
        uncertainty: output ``{"prediction", ...}`` with the uncertainty outputs of
            ``ek.ensemble(..., uncertainty=True)``.
        trim, threshold: as in ``ek.ensemble``.
        variance, variance_kind: members that predict a variance, as in ``ek.ensemble``:
            each ``{mean output: variance output}`` pair becomes the members' Gaussian
            mixture (``{"prediction", "variance"}``, plus ``"std"``, ``"aleatoric"``,
            ``"epistemic"`` with ``uncertainty``); ``reduce`` names no variance output and
            is ``"mean"`` for a mean.

    Returns:
        A ``keras.Model`` with the members' inputs (same structure) and the reduced
        output, or ``{output name: ...}`` for several (``NAME_<key>`` for the
        uncertainty outputs, as ``ek.ensemble``); save it as
        ``.keras`` and load it in ``safe_mode``; ``unpack`` gives the members back
        (with their nesting).

    Raises:
        ValueError: the members differ in architecture, or a layer is not supported
            (the message names the member and the layer).

    Limitations: the packed model is for inference (BatchNormalization uses the
    moving statistics, dropout is off); layers must be channels-last; a layer
    (or nested model) called twice inside one member is not supported. Nested
    models are flattened: the packed model has no nested models.

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
    check_choice(lowering, LOWERINGS, "lowering")
    models = load_members(models, min_count=2, what="pack", safe_mode=safe_mode)
    labels = [member_label(i, m) for i, m in enumerate(models)]
    check_same_architecture(models, labels, function="pack")
    graphs = [_member_graph(model, label) for model, label in zip(models, labels, strict=True)]
    _check_same_layers(graphs, labels)
    outputs_named = output_names(models[0])
    pairs = variance_pairs(variance, outputs_named)
    check_variance_kind(variance_kind)
    for model, label in zip(models, labels, strict=True):
        check_variance_member(model, label, range(len(outputs_named)), pairs, outputs_named, variance_kind)
    paired = {*pairs, *pairs.values()}
    tasks = [paired_task(given, outputs_named[j]) if j in paired
             else given or detect_task(models[0], j, label=labels[0])
             for j, given in enumerate(check_task(task, outputs_named))]
    predicted = [j for j in range(len(outputs_named)) if j not in pairs.values()]
    reduces = dict(zip(predicted, _per_output(reduce, [outputs_named[j] for j in predicted], "reduce"),
                       strict=True))
    for j, value in reduces.items():
        check_choice(value, REDUCTIONS, "reduce")
        if value != "none":
            check_method(value, tasks[j], f"pack, output {outputs_named[j]!r}")
        if j in pairs:
            check_mixture_method(value, f"output {outputs_named[j]!r} (pack)")
    kinds = check_output_kinds(output_kind, len(models))[0]

    num_members = len(models)
    names = _Names()
    inputs, outputs, holders = _rebuild(graphs, num_members, lowering, labels[0], names)
    # By position: ``unpack`` walks each rebuilt member's weighted layers in this same order.
    weighted = [holders[id(layer)].name for _, layer in iter_layers(models[0]) if layer.weights]
    member_configs = [json.dumps(keras.saving.serialize_keras_object(m)) for m in models]
    reduced = {}
    for j, (output, has_members) in enumerate(outputs):
        if not has_members:
            output = MemberBroadcast(num_members, name=names("member_broadcast_output"))(output)
        suffix = "" if len(outputs) == 1 else f"_{outputs_named[j]}"
        record = (member_configs, weighted) if j == 0 else ((), ())  # the first holds unpack's record
        value = "none" if j in paired else reduces[j]  # a pair's members, stacked, for the mixture
        reducer = PackedOutput(value, kinds or detect_output_kind(models[0], j), *record,
                               task=tasks[j], uncertainty=uncertainty and j not in paired, trim=trim,
                               threshold=threshold, name=names(f"packed_output_{value}{suffix}"))
        reduced[j] = reducer(output)
    results = {}
    for j in predicted:
        if j in pairs:
            suffix = "" if len(predicted) == 1 else f"_{outputs_named[j]}"
            mixture = MemberMixture(variance_kind, uncertainty=uncertainty, mean_output=outputs_named[j],
                                    variance_output=outputs_named[pairs[j]], name=names(f"mixture{suffix}"))
            reduced[j] = mixture(reduced[j], reduced[pairs[j]])
        results[outputs_named[j]] = reduced[j]
    label = reduce if isinstance(reduce, str) else "mixed"
    return keras.Model(structured_inputs(models[0], inputs), _output_structure(results),
                       name=name or f"packed_{label}")


def _per_output(value, names, param):
    """``value`` for every output: one for all, or ``{output name: value}`` naming each."""
    if not isinstance(value, dict):
        return [value] * len(names)
    unknown = sorted(set(value) - set(names))
    missing = [n for n in names if n not in value]
    if unknown or missing:
        raise ValueError(f"{param} must name every output {names} once; "
                         f"unknown {unknown}, missing {missing}.")
    return [value[n] for n in names]


def _output_structure(results):
    """One output as it is (a dict with uncertainty); several as ``{name: ...}`` (``NAME_<key>``)."""
    if len(results) == 1:
        return next(iter(results.values()))
    flat = {}
    for name, out in results.items():
        if isinstance(out, dict):
            flat.update({name if key == "prediction" else f"{name}_{key}": v for key, v in out.items()})
        else:  # reduce="none"
            flat[name] = out
    return flat


def repack_settings(packed):
    """The ``pack`` keyword arguments that rebuild ``packed``'s reductions (for a re-pack after pruning)."""
    records = output_layers(packed)
    if not records:
        raise ValueError(f"Model {packed.name!r} was not made by ek.pack (it has no PackedOutput layer).")
    first = records[0]
    mixtures = [layer for layer in packed.layers if isinstance(layer, MemberMixture)]
    settings = dict(output_kind=first.member_output_kind, trim=first.trim, threshold=first.threshold,
                    name=packed.name,
                    uncertainty=any(r.uncertainty for r in records) or any(m.uncertainty for m in mixtures))
    if len(records) == 1:
        return dict(settings, reduce=first.reduce, task=first.task)
    names = output_names(keras.saving.deserialize_keras_object(json.loads(first.member_configs[0])))
    if mixtures:
        settings.update(variance={m.mean_output: m.variance_output for m in mixtures},
                        variance_kind=mixtures[0].variance_kind)
    means = {m.mean_output for m in mixtures}
    variances = {m.variance_output for m in mixtures}
    return dict(settings,
                reduce={n: "mean" if n in means else r.reduce
                        for n, r in zip(names, records, strict=True) if n not in variances},
                task={n: r.task for n, r in zip(names, records, strict=True)})


class _Names:
    """Unique layer names for the packed model (nested members' layer names may clash)."""

    def __init__(self):
        self.used = set()

    def __call__(self, name, path=()):
        candidates = itertools.chain([name, "_".join((*path, name))],
                                     (f"{name}_{n}" for n in itertools.count(2)))
        chosen = next(c for c in candidates if c not in self.used)
        self.used.add(chosen)
        return chosen


def _rebuild(graphs, num_members, lowering, label, names):
    """Member 0's flat graph, call by call, with each member layer's packed counterpart.

    Returns:
        ``(inputs, [(output, has_members), ...], holders)``: the packed inputs and
        outputs in the member's order; ``holders`` maps ``id`` of each member-0
        layer to the packed layer holding all members' weights.
    """
    member_inputs, member_outputs, nodes = graphs[0]
    inputs = [keras.Input(tuple(t.shape[1:]), dtype=t.dtype, name=names(t._keras_history.operation.name))
              for t in member_inputs]
    values = {id(t): (packed_input, False) for t, packed_input in zip(member_inputs, inputs, strict=True)}
    holders = {}
    for position, flat in enumerate(nodes):
        layers = [graph[2][position].operation for graph in graphs]
        layer_inputs = [values[id(t)] for t in flat.inputs]
        name = names(flat.operation.name, flat.path)
        packed_layer = _packed_layer(layers, layer_inputs, num_members, lowering, label, name, flat.node)
        values[id(flat.outputs[0])] = _apply(packed_layer, flat, values, num_members, names)
        if getattr(layers[0], "weights", None):
            _load_weights(packed_layer, layers)
        holders[id(layers[0])] = packed_layer
    return inputs, [values[id(t)] for t in member_outputs], holders


def _member_graph(model, label):
    try:
        graph = flat_nodes(model)
    except ValueError as error:
        raise ValueError(f"pack: {label}: {error}") from None
    for tensor in graph[1]:
        if len(tensor.shape) < 2:
            raise ValueError(f"pack: {label} outputs shape {tuple(tensor.shape)}; members must output "
                             "(batch, ..., units).")
    seen = set()
    for flat in graph[2]:
        layer = flat.operation
        where = f"pack: {label}, layer {layer.name!r} ({type(layer).__name__})"
        if id(layer) in seen:
            raise ValueError(f"{where} is called more than once (a shared layer); pack needs one call "
                             "per layer.")
        if len(flat.outputs) != 1:
            raise ValueError(f"{where} has {len(flat.outputs)} outputs; pack supports one.")
        seen.add(id(layer))
    return graph


def _semantic_config(layer):
    config = layer.get_config()
    return {key: value for key, value in config.items() if key not in _IGNORED_CONFIG
            and not key.endswith(("_initializer", "_regularizer", "_constraint"))}


def _shapes(tensors):
    return [tuple(t.shape) for t in tensors]


def _wiring(flat, producers):
    """The call's arguments with each input tensor replaced by the position of the call producing it."""
    return repr(flat.arguments({id(t): ("tensor", producers.get(id(t), -1)) for t in flat.inputs}))


def _check_same_layers(graphs, labels):
    """Same calls in the same order, same configs (constants aside), same wiring and call arguments."""
    reference = graphs[0][2]
    producers0 = {id(t): i for i, flat in enumerate(reference) for t in flat.outputs}
    for label, (_, _, nodes) in zip(labels[1:], graphs[1:], strict=True):
        if len(nodes) != len(reference):
            raise ValueError(
                f"pack: {label} has {len(nodes)} layers but {labels[0]} has {len(reference)}."
            )
        producers = {id(t): i for i, flat in enumerate(nodes) for t in flat.outputs}
        for flat0, flat in zip(reference, nodes, strict=True):
            layer0, layer = flat0.operation, flat.operation
            where = f"{label}, layer {layer.name!r} ({type(layer).__name__})"
            constants = layer_kind(layer0, _shapes(flat0.inputs)) == "constant"
            if type(layer) is not type(layer0) or (
                    not constants and _semantic_config(layer) != _semantic_config(layer0)):
                raise ValueError(
                    f"pack: {where} differs from {labels[0]}'s layer {layer0.name!r} "
                    f"({type(layer0).__name__}): {_config_diff(layer0, layer)}."
                )
            if _wiring(flat, producers) != _wiring(flat0, producers0):
                raise ValueError(f"pack: {where} is called with different inputs or arguments than "
                                 f"in {labels[0]}.")


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


def _packed_layer(layers, layer_inputs, num_members, lowering, label, name, node=None):
    """The packed counterpart of the K member layers ``layers`` (one call position, equal configs).

    What a layer does to the channel axis comes from the one table of layer kinds
    (``ensemblekit._channels.layer_kind``); each kind has one packed form.
    """
    layer = layers[0]
    shapes = _member_shapes(layer_inputs)
    kind = layer_kind(layer, shapes, node)
    if kind is None and _MULTIPLIED in (unsupported_reason(layer, shapes, node) or ""):
        kind = "depthwise"  # kept whole by the channel graph, but computed exactly by GroupedDepthwiseConv
    if kind is None:
        reason = unsupported_reason(layer, shapes, node)
        known = not reason.startswith(UNKNOWN_KIND)
        raise _unsupported(layer, label, f"cannot be packed: {reason}" if known else None)
    form = _PACKED_FORMS.get(kind)
    if form is None:
        raise _unsupported(layer, label)
    shared = not any(has_members for _, has_members in layer_inputs)
    common = dict(num_members=num_members, shared_input=shared, name=name,
                  dtype=getattr(layer, "dtype_policy", None))  # the members' mixed precision policy
    return form(layers, shapes, common, lowering, label)


def _copy(operation, name):
    """A new instance of a layer or ``keras.ops`` operation with the same config, named ``name``."""
    config = operation.get_config()
    if "name" in config or isinstance(operation, L.Layer):
        config["name"] = name
    return recreate(operation, config)


def _carried(layers, shapes, common, lowering, label):
    """Element-wise layers/ops and merges act per member already (broadcasting in the packed layout)."""
    layer = layers[0]
    if getattr(layer, "weights", None):
        raise _unsupported(layer, label)
    if type(layer).__name__ in _INFERENCE_IDENTITY and not common["shared_input"]:
        return L.Identity(name=common["name"])
    return _copy(layer, common["name"])


def _spatial(layers, shapes, common, lowering, label):
    layer = layers[0]
    if common["shared_input"]:
        return _copy(layer, common["name"])
    if isinstance(layer, SPATIAL_DROPOUT):
        return L.Identity(name=common["name"])  # identity at inference; per-member masks would differ
    return MemberChannels(_copy(layer, layer.name), num_members=common["num_members"],
                          name=common["name"])


def _concat(layers, shapes, common, lowering, label):
    if common["shared_input"]:
        return _copy(layers[0], common["name"])
    rank = len(shapes[0])
    axis = layers[0].get_config()["axis"] % rank
    return L.Concatenate(axis=-1 if axis == rank - 1 else axis, name=common["name"])


def _flatten(layers, shapes, common, lowering, label):
    if common["shared_input"]:
        return _copy(layers[0], common["name"])
    return MemberFlatten(name=common["name"])


def _reshape(layers, shapes, common, lowering, label):
    """A reshape of the axes before the channels: the member axis stays just before them."""
    layer = layers[0]
    if common["shared_input"]:
        return _copy(layer, common["name"])
    member_output = tuple(layer.compute_output_shape(shapes[0]))
    if member_output[-1] != shapes[0][-1]:
        raise _unsupported(layer, label, f"cannot be packed: it reshapes the channel axis "
                                         f"({shapes[0]} -> {member_output})")
    leading = tuple(-1 if d is None else d for d in member_output[1:-1])
    return L.Reshape((*leading, common["num_members"], member_output[-1]), name=common["name"])


def _grouped_producer(layers, shapes, common, lowering, label):
    layer = layers[0]
    config = layer.get_config()
    if type(layer) is L.Dense:
        return GroupedDense(config["units"], activation=config["activation"], use_bias=config["use_bias"],
                            lowering=POLICY.for_layer("dense", lowering), **common)
    if type(layer) not in (L.Conv1D, L.Conv2D) or config["padding"] == "causal":
        raise _unsupported(layer, label)
    rank = 1 if type(layer) is L.Conv1D else 2
    conv = GroupedConv(rank, config["filters"], config["kernel_size"], strides=config["strides"],
                       padding=config["padding"], dilation_rate=config["dilation_rate"],
                       groups=config.get("groups", 1), activation=config["activation"],
                       use_bias=config["use_bias"], lowering=POLICY.for_layer("conv", lowering),
                       **common)
    if conv.pointwise:  # a Dense per position: the Dense lowering (einsum or K matmuls, autotuned)
        conv.lowering = POLICY.for_layer("dense", lowering)
    return conv


def _grouped_depthwise(layers, shapes, common, lowering, label):
    """Depthwise and separable convolutions (a ``Conv*D`` with ``groups`` is a producer)."""
    layer = layers[0]
    if type(layer) in (L.Conv1D, L.Conv2D):
        return _grouped_producer(layers, shapes, common, lowering, label)
    config = layer.get_config()
    rank = {L.DepthwiseConv1D: 1, L.DepthwiseConv2D: 2, L.SeparableConv1D: 1,
            L.SeparableConv2D: 2}.get(type(layer))
    if rank is None or config["padding"] == "causal":
        raise _unsupported(layer, label)
    conv = dict(strides=config["strides"], padding=config["padding"],
                dilation_rate=config["dilation_rate"], depth_multiplier=config["depth_multiplier"],
                activation=config["activation"], use_bias=config["use_bias"], **common)
    if isinstance(layer, (L.DepthwiseConv1D, L.DepthwiseConv2D)):
        return GroupedDepthwiseConv(rank, config["kernel_size"], **conv)
    return GroupedSeparableConv(rank, config["filters"], config["kernel_size"],
                                lowering=POLICY.for_layer("dense", lowering), **conv)


def _grouped_norm(layers, shapes, common, lowering, label):
    layer = layers[0]
    config = layer.get_config()
    if config.get("renorm") or config.get("synchronized"):
        raise _unsupported(layer, label, "uses renorm or synchronized statistics; pack supports neither")
    if type(layer) not in (L.BatchNormalization, L.LayerNormalization):
        raise _unsupported(layer, label)
    norm = dict(epsilon=config["epsilon"], center=config["center"], scale=config["scale"], **common)
    if type(layer) is L.BatchNormalization:
        return GroupedBatchNormalization(**norm)
    return GroupedLayerNormalization(rms_scaling=config.get("rms_scaling", False), **norm)


def _grouped_scale(layers, shapes, common, lowering, label):
    layer = layers[0]
    if [tuple(w.shape) for w in layer.weights] != [(shapes[0][-1],)]:
        raise _unsupported(layer, label, f"cannot be packed: a per-channel scale must hold one "
                                         f"({shapes[0][-1]},) weight, it holds "
                                         f"{[tuple(w.shape) for w in layer.weights]}")
    return GroupedScale(**common)


def _constants(layers, shapes, common, lowering, label):
    """One carried copy where the members' constants are equal, else each member's own."""
    if _same_constants(layers):
        return _copy(layers[0], common["name"])
    return MemberConstants([_copy(layer, f"{common['name']}_member_{k}") for k, layer in enumerate(layers)],
                           **common)


def _same_constants(layers):
    config0, weights0 = repr(_semantic_config(layers[0])), layers[0].get_weights()
    return all(repr(_semantic_config(layer)) == config0 and all(
        np.array_equal(a, b) for a, b in zip(layer.get_weights(), weights0, strict=True))
        for layer in layers[1:])


def _grouped_patch_embedding(layers, shapes, common, lowering, label):
    """keras-hub ViT patch embedding: K patch convolutions, class tokens and position embeddings."""
    layer = layers[0]
    if not common["shared_input"] or len(shapes[0]) != 4:
        raise _unsupported(layer, label, "cannot be packed: it must read the shared image (batch, H, W, C)")
    conv = layer.patch_embedding
    return GroupedPatchEmbedding(tuple(conv.kernel_size), conv.filters,
                                 use_class_token=getattr(layer, "class_token", None) is not None,
                                 use_bias=conv.bias is not None, **common)


def _grouped_transformer(layers, shapes, common, lowering, label):
    """keras-hub ViT encoder (or one block): LN, multi-head attention, MLP, per member."""
    layer = layers[0]
    blocks = encoder_blocks(layer)
    first = blocks[0]
    query, value = first.mha._query_dense.kernel.shape, first.mha._value_dense.kernel.shape
    norms = [n for b in blocks for n in (b.layer_norm_1, b.layer_norm_2)]
    if type(layer).__name__ in ENCODERS:
        norms.append(layer.layer_norm)
    plain = all(n.center and n.scale and not n.rms_scaling and n.epsilon == norms[0].epsilon for n in norms)
    same = all((tuple(b.mha._query_dense.kernel.shape), tuple(b.mha._value_dense.kernel.shape),
                b.mlp.dense_1.units, b.mlp.dense_1.activation) == (tuple(query), tuple(value),
                first.mlp.dense_1.units, first.mlp.dense_1.activation) for b in blocks)
    if common["shared_input"] or len(shapes[0]) != 3 or not plain or not same:
        raise _unsupported(layer, label, "cannot be packed: it must read tokens (batch, tokens, hidden), "
                                         "with equal blocks and plain LayerNormalizations")
    return GroupedTransformerEncoder(
        len(blocks), query[1], query[2], value[2], first.mlp.dense_1.units, epsilon=norms[0].epsilon,
        use_attention_bias=first.mha._query_dense.bias is not None,
        use_mlp_bias=first.mlp.dense_1.bias is not None,
        activation=keras.activations.serialize(first.mlp.dense_1.activation),
        final_norm=type(layer).__name__ in ENCODERS, **common)


_PACKED_FORMS = {
    "producer": _grouped_producer,
    "depthwise": _grouped_depthwise,
    "separable": _grouped_depthwise,
    "norm": _grouped_norm,
    "scale": _grouped_scale,
    "constant": _constants,
    "reshape": _reshape,
    "elementwise": _carried,
    "merge": _carried,
    "spatial": _spatial,
    "concat": _concat,
    "flatten": _flatten,
    "index": _carried,
    "patch_embedding": _grouped_patch_embedding,
    "transformer": _grouped_transformer,
}


def _apply(packed_layer, flat, values, num_members, names):
    """Call ``packed_layer`` with the member call's arguments; returns ``(output, has_members)``.

    Shared inputs of calls that also see member tensors get the member axis
    (``MemberBroadcast``) so they broadcast per member.
    """
    layer_inputs = [values[id(t)] for t in flat.inputs]
    has_members = [flag for _, flag in layer_inputs]
    tensors = {id(t): tensor for t, (tensor, _) in zip(flat.inputs, layer_inputs, strict=True)}
    if any(has_members) and not all(has_members):
        for i, (t, flag) in enumerate(zip(flat.inputs, has_members, strict=True)):
            if not flag:
                broadcast = MemberBroadcast(num_members, name=names(f"{packed_layer.name}_broadcast_{i}"))
                tensors[id(t)] = broadcast(tensors[id(t)])
    args, kwargs = flat.arguments(tensors)
    for key in ("training", "mask"):  # packed models are for inference and carry no masks
        kwargs.pop(key, None)
    output = packed_layer(*args, **kwargs)
    return output, isinstance(packed_layer, _MemberLayer) or any(has_members)


def _load_weights(packed_layer, layers):
    """Give ``packed_layer`` the K member layers' weights (a carried layer: member 0's, all equal)."""
    if isinstance(packed_layer, _MemberLayer):
        packed_layer.set_member_weights([layer.get_weights() for layer in layers])
    else:
        packed_layer.set_weights(layers[0].get_weights())
        finalize(packed_layer)


def unpack(packed):
    """Give back the K members of a packed model, with exactly their weights.

    Args:
        packed: a model returned by ``pack`` (or loaded from its ``.keras`` file).

    Returns:
        A list of K ``keras.Model``, each with its original architecture
        (nested models included) and name.

    Example:
        >>> import keras, numpy as np
        >>> members = [keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)]) for _ in range(2)]
        >>> back = unpack(pack(members))
        >>> all(np.array_equal(a, b) for a, b in zip(back[1].get_weights(), members[1].get_weights()))
        True
    """
    if not isinstance(packed, keras.Model):
        raise TypeError(f"unpack expects a keras.Model made by pack, got {type(packed).__name__}.")
    record = unpack_record(packed)
    if record is None:
        raise ValueError(f"Model {packed.name!r} was not made by ek.pack (it has no PackedOutput layer).")
    return rebuild_members(packed, record)
