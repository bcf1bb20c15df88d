"""Structural channel pruning: remove filters/units and every channel coupled to them.

Which channels are coupled comes from the channel-coupling graph shared with
``merge.align`` (``ensemblekit._channels``, after DepGraph: Fang et al., 2023,
"DepGraph: Towards Any Structural Pruning"): a Dense/Conv/SeparableConv/
Embedding layer opens a group (its units/filters/features); BN, LN,
activations, Dropout, pooling, padding, depthwise convolutions, size-1
``Reshape``, ``LayerScale`` and ``Normalization`` carry it; ``Add``-like
merges (layers or ``keras.ops``) unite groups (a residual block's channels,
and a squeeze-and-excitation gate with the tensor it scales, are removed
together); ``Concatenate`` joins layouts; ``Flatten`` repeats the layout once
per spatial position, so the Dense after it loses the matching rows. Nested
functional/``Sequential`` models (a transfer-learning base, ConvNeXt's
blocks) are walked through and given back nested. Groups touching the
model's input or output, or a layer the graph cannot follow, are kept whole.
In keras-hub's ViT, whole attention heads and MLP units are removed (as
Torch-Pruning's head pruning), and the residual stream with them; the
backbone, whose layers' configs do not round-trip, is rebuilt from its own
constructor arguments (``hidden_dim``, ``num_heads``, ``mlp_dim``), which
tie the counts: one per encoder, ``hidden_dim = num_heads * key_dim``.

Within each prunable group, channels are ranked by an importance score summed
over the layers that produce it (each layer's scores divided by their mean):
``"l1"``/``"l2"`` norms of the filters (Li et al., 2017, "Pruning Filters for
Efficient ConvNets"), ``"bn_scale"`` the |gamma| of the BatchNormalization
layers on the group (Liu et al., 2017, "Network Slimming"), ``"taylor"`` the
first-order Taylor estimate (sum over the filter of weight x gradient)^2
accumulated over batches (Molchanov et al., 2019, "Importance Estimation for
Neural Network Pruning"). The model is rebuilt with
``keras.models.clone_model`` (nested models on inputs of their new width):
layers with fewer units/filters come from their edited config, and every
weight axis the graph records is sliced to the kept channels.
"""

from __future__ import annotations

import dataclasses
import warnings

import keras
import numpy as np

from ensemblekit._channels import OPENERS, channel_graph, recreate
from ensemblekit._data import batches, predict
from ensemblekit._graph import graph_nodes
from ensemblekit._io import check_no_savedmodel
from ensemblekit._packed import output_layers
from ensemblekit._validate import check_choice
from ensemblekit.prune.magnitude import check_sparsity

IMPORTANCES = ("l1", "l2", "bn_scale", "taylor")
ON_UNSUPPORTED = ("warn", "raise")
SIZE_KEYS = ("units", "filters", "output_dim")  # the config key of an opener's channel count


@dataclasses.dataclass
class ChannelGroup:
    """Coupled channels removed together (one entry of ``ChannelReport.groups``).

    Attributes:
        layers: names of the layers whose units/filters form the group.
        size: channels before pruning.
        kept: channels after pruning.
        reason: why the group was kept whole (``None`` if it was prunable).
        indices: the original indices of the kept channels, ascending.

    Example:
        >>> ChannelGroup(["conv_a", "conv_b"], size=8, kept=4, indices=[1, 3, 5, 7])
        ChannelGroup(layers=['conv_a', 'conv_b'], size=8, kept=4, reason=None)
    """

    layers: list
    size: int
    kept: int
    reason: str | None = None
    indices: list = dataclasses.field(default_factory=list, repr=False)


@dataclasses.dataclass
class ChannelReport:
    """What ``channels(..., return_report=True)`` removed, group by group.

    Attributes:
        groups: every :class:`ChannelGroup` (those of nested and packed
            members included), prunable and kept-whole alike.

    Example:
        >>> report = ChannelReport([ChannelGroup(["h"], 16, 8), ChannelGroup(["out"], 3, 3, "model output")])
        >>> print(report)
        2 channel groups: 1 pruned (16 -> 8 channels), 1 kept whole (model output: 1)
    """

    groups: list

    def summary(self):
        """One line: how many groups were pruned, channels before -> after, why the others stayed."""
        pruned = [g for g in self.groups if g.reason is None]
        whole = {}
        for g in self.groups:
            if g.reason is not None:
                cause = g.reason.split(":")[0]
                whole[cause] = whole.get(cause, 0) + 1
        causes = ", ".join(f"{cause}: {count}" for cause, count in whole.items())
        return (f"{len(self.groups)} channel groups: {len(pruned)} pruned "
                f"({sum(g.size for g in pruned)} -> {sum(g.kept for g in pruned)} channels), "
                f"{len(self.groups) - len(pruned)} kept whole" + (f" ({causes})" if causes else ""))

    def __str__(self):
        return self.summary()


def _filter_scores(kernel, axis, norm):
    """Per-output-channel norm of ``kernel`` whose channels lie along ``axis``."""
    flat = np.abs(np.moveaxis(kernel, axis, -1).reshape(-1, kernel.shape[axis]))
    return flat.sum(axis=0) if norm == "l1" else np.sqrt((flat ** 2).sum(axis=0))


def _bn_scores(graph, root):
    """Sum of |gamma| over the BatchNormalization layers that hold ``root`` once, else ``None``."""
    scores = None
    for record in graph.records("norm"):
        layer = record.layer
        if not isinstance(layer, keras.layers.BatchNormalization) or not layer.scale:
            continue
        units = graph.unit_positions(record.input, root)
        if len(units) != 1:
            continue
        part = np.abs(keras.ops.convert_to_numpy(layer.gamma))[units[0]]
        scores = part if scores is None else scores + part
    return scores


def _gradients(model, variables, x, y, loss_fn):
    """d loss / d ``variables`` on one batch, with the backend's autodiff (TF or JAX)."""
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=False))
        # an Embedding's gradient is sparse (IndexedSlices): densify it
        return [np.asarray(tf.convert_to_tensor(g)) if g is not None else None
                for g in tape.gradient(loss, variables)]
    if backend == "jax":
        import jax

        trainable, frozen = model.trainable_variables, [v.value for v in model.non_trainable_variables]

        def loss_of(values):
            outputs, _ = model.stateless_call(values, frozen, x, training=False)
            return loss_fn(y, outputs)

        grads = jax.grad(loss_of)([v.value for v in trainable])
        position = {id(v): i for i, v in enumerate(trainable)}
        return [np.asarray(grads[position[id(v)]]) if id(v) in position else None for v in variables]
    raise ValueError(
        f"importance='taylor' needs gradients from the TensorFlow or JAX backend; the Keras backend "
        f"is {backend!r}. Use 'l1', 'l2' or 'bn_scale'."
    )


def _taylor_scores(graph, kernels, x, y, batch_size=64, max_samples=512):
    """Per ``WeightAxis`` of ``kernels``: (Σ_filter w·∂L/∂w)² summed over batches (Molchanov et al., 2019).

    ``x`` is any data ``model.predict`` accepts (``ensemblekit._data``); at most
    ``max_samples`` rows are read. Without labels the model's own predictions are the targets.
    """
    from ensemblekit._outputs import detect_output_kind

    model = graph.model
    from_logits = detect_output_kind(model) == "logits"
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=from_logits)
    variables = [kernel.variable for kernel in kernels]
    scores = [np.zeros(k.variable.shape[k.axis]) for k in kernels]
    seen = 0
    for x_batch, y_batch, _ in batches(x, y, batch_size=batch_size, function="prune.channels"):
        rows = min(len(keras.tree.flatten(x_batch)[0]), max_samples - seen)
        if rows <= 0:
            break
        x_batch = keras.tree.map_structure(lambda a, n=rows: a[:n], x_batch)
        y_batch = (np.asarray(predict(model, x_batch)).argmax(axis=-1) if y_batch is None
                   else np.asarray(y_batch)[:rows])
        seen += rows
        grads = _gradients(model, variables, x_batch, y_batch, loss_fn)
        for i, (kernel, grad) in enumerate(zip(kernels, grads, strict=True)):
            if grad is not None:
                product = np.moveaxis(keras.ops.convert_to_numpy(kernel.variable) * grad, kernel.axis, -1)
                scores[i] += product.reshape(-1, product.shape[-1]).sum(axis=0) ** 2
    return scores


def _importance(graph, openers, importance, x, y):
    """``{root: per-channel score}`` for every prunable group, and the roots that fell back to l1.

    Each layer opening a group scores it on the weight axes that write it
    (``ChannelGraph.scoring_axes``: a kernel's output axis; a transformer's
    query/key/value/output kernels for whole heads), each divided by its mean.
    """
    axes = {root: [graph.scoring_axes(layer, root) for layer in layers] for root, layers in openers.items()}
    taylor = None
    if importance == "taylor":
        taylor = iter(_taylor_scores(graph, [w for parts in axes.values() for ws in parts for w in ws], x, y))
    scores, fallback = {}, []
    for root in openers:
        if importance == "bn_scale":
            bn = _bn_scores(graph, root)
            if bn is not None:
                scores[root] = bn
                continue
            fallback.append(root)
        total = np.zeros(graph.size(root))
        for layer, kernel in ((layer, w) for layer, ws in zip(openers[root], axes[root]) for w in ws):
            if taylor is not None:
                part = next(taylor)
            else:
                norm = "l1" if importance == "bn_scale" else importance
                part = _filter_scores(keras.ops.convert_to_numpy(kernel.variable), kernel.axis, norm)
            part = graph.root_scores(layer, kernel, part, root)
            total += part / max(float(part.mean()), 1e-12)
        scores[root] = total
    return scores, fallback


def _keep_count(size, ratio, round_to):
    keep = size - int(round(ratio * size))
    if round_to:
        keep = int(round(keep / round_to)) * round_to
        keep = min(size, max(keep, round_to))
    return max(1, keep)


def _tied_counts(graph, counts):
    """``counts`` obeying the composite layers' config ties (``CountTie``): equal, and scaled.

    Tied groups keep the largest count among them; a residual stream tied to
    whole heads (``hidden_dim = num_heads * key_dim``) keeps ``key_dim`` times
    the heads kept, and if it cannot be pruned the heads are kept whole too.
    """
    counts = dict(counts)
    for tie in graph.ties:
        roots = [graph.find(g) for g in tie.groups]
        stream = [graph.find(g) for g in tie.scaled[0]] if tie.scaled else []
        if any(r not in counts for r in roots) or (tie.scaled and (len(stream) != 1 or stream[0] not in counts)):
            for root in roots + stream:
                counts.pop(root, None)  # kept whole
            continue
        count = max(counts[r] for r in roots)
        counts.update(dict.fromkeys(roots, count))
        if tie.scaled:
            counts[stream[0]] = count * tie.scaled[1]
    return counts


def _choose(scores, sizes, ratio, round_to, global_ranking, graph=None):
    """``{root: sorted indices of the channels kept}`` (obeying ``graph``'s count ties)."""
    if not global_ranking:
        counts = {root: _keep_count(sizes[root], ratio, round_to) for root in scores}
    else:
        normalised = {root: s / max(float(s.mean()), 1e-12) for root, s in scores.items()}
        pooled = np.sort(np.concatenate(list(normalised.values()))) if normalised else np.zeros(0)
        removed = int(round(ratio * pooled.size))
        threshold = pooled[removed - 1] if removed else -np.inf
        counts = {}
        for root, s in normalised.items():
            keep = int(np.sum(s > threshold))
            counts[root] = _keep_count(sizes[root], 1.0 - keep / sizes[root], round_to)
    if graph is not None:
        counts = _tied_counts(graph, counts)
    return {root: np.sort(np.argsort(-scores[root], kind="stable")[:counts[root]])
            for root in counts}


def _sliced_weights(graph, record, kept):
    """``record.layer``'s weights with every channel axis the graph records cut to the kept channels."""
    axes = {}
    for weight in record.weights:
        axes.setdefault(id(weight.variable), []).append(weight)
    sliced = []
    for variable in record.layer.weights:
        array = keras.ops.convert_to_numpy(variable)
        for weight in axes.get(id(variable), []):
            array = np.take(array, graph.positions(record.layout(weight.side), kept), axis=weight.axis)
        sliced.append(array)
    return sliced


def _resized_config(layer, record, graph, kept):
    """``layer``'s config with the channel counts it stores set to the channels kept."""
    config = layer.get_config()
    if record is None or record.kind is None:
        return config
    if record.kind == "patch_embedding":  # keras-hub ViTPatchingAndEmbedding
        config["hidden_dim"] = len(graph.positions(record.output, kept))
    elif record.kind == "transformer":  # keras-hub ViTEncoder/ViTEncoderBlock: one size for all blocks
        config["hidden_dim"] = len(graph.positions(record.input, kept))
        config["num_heads"] = len(graph.positions(record.inner["0/heads"], kept))
        config["mlp_dim"] = len(graph.positions(record.inner["0/mlp"], kept))
    elif record.kind in OPENERS:
        key = next(k for k in SIZE_KEYS if k in config)
        config[key] = len(graph.positions(record.output, kept))
    elif record.kind == "depthwise" and config.get("groups", 1) != 1:  # Conv(groups=C, filters=C)
        config["filters"] = config["groups"] = len(graph.positions(record.input, kept))
    elif record.kind == "scale" and "projection_dim" in config:  # ConvNeXt's LayerScale
        config["projection_dim"] = len(graph.positions(record.input, kept))
    elif record.kind == "reshape" and config["target_shape"][-1] != -1:
        config["target_shape"] = (*config["target_shape"][:-1], len(graph.positions(record.output, kept)))
    return config


def _pruned_inputs(graph, model, kept):
    """New ``keras.Input``s for nested ``model``: its inputs' shapes with the channels kept."""
    inputs = []
    for tensor in graph_nodes(model)[0]:
        channels = len(graph.positions(graph.layouts[id(tensor)], kept))
        inputs.append(keras.Input(batch_shape=(*tensor.shape[:-1], channels), dtype=tensor.dtype,
                                  name=tensor._keras_history.operation.name))
    if isinstance(model, keras.Sequential):
        return inputs[0]
    return keras.tree.pack_sequence_as(model.input, inputs)


def _holds_composites(graph, model):
    """True for a model with its own constructor (a keras-hub backbone) whose layers include composite kinds."""
    custom = any("get_config" in vars(cls) for cls in type(model).__mro__
                 if cls.__module__.split(".")[0] not in ("keras", "builtins"))
    kinds = [getattr(graph.layers.get(id(layer)), "kind", None) for layer in model.layers]
    return custom and any(kind in ("patch_embedding", "transformer") for kind in kinds)


def _from_arguments(graph, model, kept, new_layers):
    """``model`` rebuilt from its own constructor arguments with the kept sizes (a keras-hub backbone).

    Its composite layers' configs cannot be re-created one by one (keras-hub's
    ViT layers' configs are lossy); the constructor's arguments
    (``hidden_dim``, ``num_heads``, ``mlp_dim``) carry the same names.
    """
    config, changes = model.get_config(), {}
    for layer in model.layers:
        record = graph.layers.get(id(layer))
        if record is None or record.kind is None:
            continue
        old, new = layer.get_config(), _resized_config(layer, record, graph, kept)
        for key in (k for k in new if new[k] != old.get(k)):
            if config.get(key) != old.get(key) or changes.setdefault(key, new[key]) != new[key]:
                raise ValueError(
                    f"channels(): model {graph.model.name!r}: {type(model).__name__} {model.name!r} is "
                    f"rebuilt from its constructor arguments, which cannot set {key}={new[key]!r} for layer "
                    f"{layer.name!r} ({type(layer).__name__}); use ratio=0 or prune another model."
                )
    rebuilt = type(model).from_config({**config, **changes})
    for layer, new_layer in zip(model.layers, rebuilt.layers, strict=True):
        new_layers[id(layer)] = new_layer
    return rebuilt


def _rebuild(graph, kept):
    """Clone the model (nested models too) with edited layer configs, then copy the sliced weights in."""
    new_layers = {}

    def clone_layer(layer):
        record = graph.layers.get(id(layer))
        if record is not None and record.kind == "nested" and _holds_composites(graph, layer):
            return _from_arguments(graph, layer, kept, new_layers)
        if record is not None and record.kind == "nested":  # rebuilt nested, on inputs of its new width
            return keras.models.clone_model(layer, input_tensors=_pruned_inputs(graph, layer, kept),
                                            clone_function=clone_layer)
        new_layers[id(layer)] = recreate(layer, _resized_config(layer, record, graph, kept))
        return new_layers[id(layer)]

    rebuilt = keras.models.clone_model(graph.model, clone_function=clone_layer)
    for record in graph.records():
        if record.kind != "nested" and getattr(record.layer, "weights", None):
            new_layer = new_layers[id(record.layer)]
            new_layer.set_weights(_sliced_weights(graph, record, kept))
            if hasattr(new_layer, "finalize_state"):  # Normalization caches mean/variance as tensors
                new_layer.finalize_state()
    return rebuilt


def _report_groups(graph, openers, kept, on_unsupported):
    """A ``ChannelGroup`` per opened group; warn/raise for groups a layer kept whole."""
    groups, blocked_by_layer = [], []
    for root, layers in openers.items():
        fixed = graph.fixed(root)
        size = graph.size(root)
        indices = [int(i) for i in kept.get(root, range(size))]
        groups.append(ChannelGroup([layer.name for layer in layers], size, len(indices),
                                   fixed.text if fixed else None, indices))
        if fixed is not None and fixed.layer is not None:
            blocked_by_layer.append(f"{'/'.join(layer.name for layer in layers)} ({size} channels): "
                                    f"{fixed.text}")
    if blocked_by_layer:
        message = (f"channels(): model {graph.model.name!r}: left unpruned "
                   + "; ".join(blocked_by_layer) + ".")
        if on_unsupported == "raise":
            raise ValueError(message)
        warnings.warn(message, stacklevel=4)
    return groups


def _prune(model, ratio, importance, x, y, round_to, global_ranking, on_unsupported):
    """``(pruned model, [ChannelGroup])``; nested models are walked through and rebuilt nested."""
    graph = channel_graph(model)
    openers = graph.openers()
    prunable = {root: layers for root, layers in openers.items() if graph.fixed(root) is None}
    scores, fallback = _importance(graph, prunable, importance, x, y)
    kept = _choose(scores, {root: graph.size(root) for root in scores}, ratio, round_to, global_ranking, graph)
    groups = _report_groups(graph, openers, kept, on_unsupported)
    if fallback:
        warnings.warn(
            f"channels(): model {model.name!r}: no BatchNormalization scale on the groups of "
            f"{sorted(layer.name for root in fallback for layer in prunable[root])}; ranked them by 'l1'.",
            stacklevel=3,
        )
    return _rebuild(graph, kept), groups


def channels(model, ratio=0.5, importance="l1", x=None, y=None, round_to=None,
             global_ranking=False, on_unsupported="warn", return_report=False):
    """Remove the least important ``ratio`` of channels from every prunable group; return a smaller model.

    Args:
        model: a functional or Sequential Keras model (``channels_last``). Nested
            functional/Sequential models (members of ``ek.ensemble``, the
            base of a transfer-learning model) are walked through as part of
            one graph and come back nested, with sliced layers; one called
            more than once gets a ``ValueError``. A packed model (``ek.pack``)
            is unpacked, each member's channels are pruned on their own (same
            counts for all members) and it is packed again; subclassed models
            have no graph and get a ``ValueError``, as do models holding a
            TensorFlow SavedModel (``keras.layers.TFSMLayer``: no layers to read).
        ratio: fraction of channels removed per group, in ``[0, 1)``; ``0``
            returns a model with identical outputs.
        importance: ``"l1"``, ``"l2"``, ``"bn_scale"`` (groups without a
            BatchNormalization fall back to ``"l1"`` with a warning) or
            ``"taylor"`` (needs ``x``; TensorFlow or JAX backend).
        x, y: data for ``"taylor"``: arrays, or any data ``model.predict`` accepts (a
            dataset of ``(x, y)`` with ``y=None``) (at most 512 samples are used; ``y``
            defaults to the model's own predicted labels).
        round_to: keep a multiple of this many channels per group (e.g. 8).
        global_ranking: rank channels of all groups together (scores divided
            by each group's mean) instead of removing ``ratio`` in every group.
        on_unsupported: a group that passes through a layer the graph cannot
            prune through is left whole with a warning (``"warn"``) or
            raises a ``ValueError`` naming the layer (``"raise"``).
        return_report: also return a :class:`ChannelReport`.

    Returns:
        A new ``keras.Model`` with fewer units/filters and sliced weights (the
        output size never changes); with ``return_report=True``,
        ``(model, report)`` where ``report.groups`` lists every
        :class:`ChannelGroup` with its size before/after and why it was kept whole.

    Example:
        >>> import keras, numpy as np
        >>> m = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, name="h"),
        ...                       keras.layers.Dense(3, name="out")])
        >>> small, report = channels(m, ratio=0.5, return_report=True)
        >>> small.get_layer("h").units, small.output_shape
        (8, (None, 3))
        >>> print(report)
        2 channel groups: 1 pruned (16 -> 8 channels), 1 kept whole (model output: 1)
    """
    if not isinstance(model, keras.Model):
        raise TypeError(f"channels() needs a keras.Model, got {type(model).__name__}.")
    check_no_savedmodel(model, "channels()")
    ratio = check_sparsity(ratio, "ratio")
    check_choice(importance, IMPORTANCES, "importance")
    check_choice(on_unsupported, ON_UNSUPPORTED, "on_unsupported")
    if importance == "taylor" and x is None:
        raise ValueError("importance='taylor' needs x (and optionally y) to compute gradients.")
    if round_to is not None and (isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1):
        raise ValueError(f"round_to must be a positive integer or None, got {round_to!r}.")
    if output_layers(model):  # made by ek.pack: its PackedOutput layers hold the members' record
        pruned, groups = _prune_packed(model, ratio, importance, x, y, round_to, global_ranking,
                                       on_unsupported)
    else:
        pruned, groups = _prune(model, ratio, importance, x, y, round_to, global_ranking,
                                on_unsupported)
    return (pruned, ChannelReport(groups)) if return_report else pruned


def _prune_packed(model, ratio, importance, x, y, round_to, global_ranking, on_unsupported):
    """Unpack, prune every member's channels on its own, pack again (same counts per member)."""
    from ensemblekit.pack import pack, unpack
    from ensemblekit.pack.build import repack_settings

    if global_ranking:
        raise ValueError(
            f"Model {model.name!r} is packed (ek.pack): its members must keep equal channel counts, "
            "so global_ranking=True is not supported; use the default per-group ratio."
        )
    pruned = [_prune(member, ratio, importance, x, y, round_to, False, on_unsupported)
              for member in unpack(model)]
    repacked = pack([member for member, _ in pruned], **repack_settings(model))
    return repacked, [g for _, groups in pruned for g in groups]


__all__ = ["ChannelGroup", "ChannelReport", "channels"]
