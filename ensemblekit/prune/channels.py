"""Structural channel pruning: remove filters/units and every channel coupled to them.

The channel axis (last axis, ``channels_last``) of every tensor of a
functional model is followed through the graph (``_graph.graph_nodes``). Each
tensor's channels are a *layout*: a list of channel *groups*, one segment per
group. A Dense/Conv layer starts a new group (its units/filters); BN, LN,
activations, Dropout, pooling, padding and depthwise convolutions pass the
layout through; ``Add``-like merges unite the groups they add (a residual
block's channels are removed together); ``Concatenate`` joins layouts;
``Flatten`` repeats the layout once per spatial position, so the Dense after it
loses the matching rows. Groups touching the model's input or output, a nested
model's boundary, or a layer the graph cannot prune through are kept whole.

Within each prunable group, channels are ranked by an importance score summed
over the layers that produce it (each layer's scores divided by their mean):
``"l1"``/``"l2"`` norms of the filters (Li et al., 2017, "Pruning Filters for
Efficient ConvNets"), ``"bn_scale"`` the |gamma| of the BatchNormalization
layers on the group (Liu et al., 2017, "Network Slimming"), ``"taylor"`` the
first-order Taylor estimate (sum over the filter of weight x gradient)^2
accumulated over batches (Molchanov et al., 2019, "Importance Estimation for
Neural Network Pruning"). The grouping follows DepGraph (Fang et al., 2023,
"DepGraph: Towards Any Structural Pruning"). The model is rebuilt with
``keras.models.clone_model``: layers with fewer units/filters come from their
edited config, and every weight is sliced to the kept channels.
"""

from __future__ import annotations

import dataclasses
import warnings

import keras
import numpy as np

from ensemblekit._graph import graph_nodes, is_container
from ensemblekit._io import predict
from ensemblekit._validate import check_choice

IMPORTANCES = ("l1", "l2", "bn_scale", "taylor")
ON_UNSUPPORTED = ("warn", "raise")


def _layer_types(*names):
    return tuple(getattr(keras.layers, name) for name in names if hasattr(keras.layers, name))


PRODUCERS = _layer_types("Dense", "Conv1D", "Conv2D", "Conv3D")
DEPTHWISE = _layer_types("DepthwiseConv1D", "DepthwiseConv2D")
SEPARABLE = _layer_types("SeparableConv1D", "SeparableConv2D")
NORMS = _layer_types("BatchNormalization", "LayerNormalization")
MERGES = _layer_types("Add", "Subtract", "Multiply", "Average", "Maximum", "Minimum")
PASSTHROUGH = _layer_types(
    "Activation", "ReLU", "LeakyReLU", "ELU", "Dropout", "SpatialDropout1D", "SpatialDropout2D",
    "SpatialDropout3D", "GaussianNoise", "GaussianDropout", "AlphaDropout", "Identity",
    "MaxPooling1D", "MaxPooling2D", "MaxPooling3D", "AveragePooling1D", "AveragePooling2D",
    "AveragePooling3D", "GlobalAveragePooling1D", "GlobalAveragePooling2D",
    "GlobalAveragePooling3D", "GlobalMaxPooling1D", "GlobalMaxPooling2D", "GlobalMaxPooling3D",
    "ZeroPadding1D", "ZeroPadding2D", "ZeroPadding3D", "Cropping1D", "Cropping2D", "Cropping3D",
    "UpSampling1D", "UpSampling2D", "UpSampling3D",
)


@dataclasses.dataclass
class ChannelGroup:
    """Coupled channels removed together (``model.pruned_groups_`` lists them).

    Attributes:
        layers: names of the layers whose units/filters form the group.
        size: channels before pruning.
        kept: channels after pruning.
        reason: why the group was kept whole (``None`` if it was prunable).
        indices: the original indices of the kept channels, ascending.
    """

    layers: list
    size: int
    kept: int
    reason: str | None = None
    indices: list = dataclasses.field(default_factory=list, repr=False)


class _Groups:
    """Union-find over channel groups, with the reasons a group must stay whole."""

    def __init__(self):
        self.parent, self.sizes, self.reasons, self.unsupported = [], [], {}, {}

    def new(self, size, reason=None):
        self.parent.append(len(self.parent))
        self.sizes.append(int(size))
        if reason:
            self.reasons[len(self.parent) - 1] = reason
        return len(self.parent) - 1

    def find(self, group):
        while self.parent[group] != group:
            self.parent[group] = self.parent[self.parent[group]]
            group = self.parent[group]
        return group

    def union(self, a, b):
        a, b = self.find(a), self.find(b)
        if a != b:
            self.parent[b] = a
            if b in self.reasons:
                self.reasons.setdefault(a, self.reasons[b])
            if b in self.unsupported:
                self.unsupported.setdefault(a, self.unsupported[b])

    def block(self, groups, reason, unsupported=False):
        for group in groups:
            root = self.find(group)
            self.reasons.setdefault(root, reason)
            if unsupported:
                self.unsupported.setdefault(root, reason)

    def reason(self, group):
        return self.reasons.get(self.find(group))


def _channels_last(layer):
    return getattr(layer, "data_format", "channels_last") == "channels_last"


def _last_axis(axis, rank):
    axes = axis if isinstance(axis, (list, tuple)) else [axis]
    return len(axes) == 1 and axes[0] in (-1, rank - 1)


def _kind(layer, input_tensors):
    """How ``layer`` treats the channel axis, or ``None`` if it cannot be pruned through."""
    if is_container(layer):
        return "nested"
    if not _channels_last(layer) or not input_tensors:
        return None
    rank = len(input_tensors[0].shape)
    if isinstance(layer, PRODUCERS):
        plain = getattr(layer, "groups", 1) == 1 and not getattr(layer, "lora_enabled", False)
        return "producer" if plain and getattr(layer, "quantization_mode", None) is None else None
    if isinstance(layer, DEPTHWISE):
        return "depthwise" if layer.depth_multiplier == 1 else None
    if isinstance(layer, SEPARABLE):
        return "separable" if layer.depth_multiplier == 1 else None
    if isinstance(layer, NORMS):
        return "norm" if _last_axis(layer.axis, rank) else None
    if isinstance(layer, MERGES):
        return "merge"
    if isinstance(layer, keras.layers.Concatenate):
        return "concat"
    if isinstance(layer, keras.layers.Flatten):
        return "flatten"
    if isinstance(layer, PASSTHROUGH):
        return "pass"
    return None


class _Analysis:
    """The channel layouts of every tensor of one functional model."""

    def __init__(self, model):
        self.model = model
        self.groups = _Groups()
        self.layouts = {}  # id(tensor) -> list of group ids
        self.layer_io = {}  # id(layer) -> (layer, kind, input layout, output layout)
        inputs, outputs, nodes = graph_nodes(model)
        for tensor in inputs:
            self.layouts[id(tensor)] = [self.groups.new(tensor.shape[-1], "model input")]
        seen = set()
        for layer, input_tensors, output_tensors in nodes:
            if id(layer) in seen:
                raise ValueError(
                    f"Model {model.name!r}: layer {layer.name!r} ({type(layer).__name__}) is called "
                    "more than once; channels() cannot prune shared layers."
                )
            seen.add(id(layer))
            self._visit(layer, input_tensors, output_tensors)
        for tensor in outputs:
            self.groups.block(self.layouts[id(tensor)], "model output")

    def _new_output(self, tensor, reason=None):
        size = tensor.shape[-1] if len(tensor.shape) else 1
        return [self.groups.new(size, reason)]

    def _visit(self, layer, input_tensors, output_tensors):
        kind = _kind(layer, input_tensors)
        in_layouts = [self.layouts.get(id(t)) for t in input_tensors]
        if any(layout is None for layout in in_layouts):
            kind = None
        out = self._propagate(layer, kind, in_layouts, input_tensors, output_tensors)
        if out is None:
            kind = None
            reason = f"layer {layer.name!r} ({type(layer).__name__}) cannot be pruned through"
            self.groups.block([g for layout in in_layouts if layout for g in layout], reason,
                              unsupported=True)
            outs = [self._new_output(t, reason) for t in output_tensors]
        else:
            outs = [out]
        for tensor, layout in zip(output_tensors, outs, strict=False):
            self.layouts[id(tensor)] = layout
        self.layer_io[id(layer)] = (layer, kind, in_layouts[0] if in_layouts else None, outs[0])

    def _propagate(self, layer, kind, in_layouts, input_tensors, output_tensors):
        if kind is None or len(output_tensors) != 1:
            return None
        first = in_layouts[0]
        if kind in ("producer", "separable"):
            return [self.groups.new(output_tensors[0].shape[-1])]
        if kind == "nested":
            self.groups.block([g for layout in in_layouts for g in layout], "nested model boundary")
            return self._new_output(output_tensors[0], "nested model boundary")
        if kind in ("depthwise", "norm", "pass"):
            return list(first)
        if kind == "flatten":
            return list(first) * int(np.prod(input_tensors[0].shape[1:-1], dtype="int64"))
        if kind == "concat" and _last_axis(layer.axis, len(input_tensors[0].shape)):
            return [g for layout in in_layouts for g in layout]
        # merges (and concatenation along another axis) align channels position by position
        sizes = [[self.groups.sizes[g] for g in layout] for layout in in_layouts]
        if any(s != sizes[0] for s in sizes) or len(in_layouts) < 2:
            return None
        for layout in in_layouts[1:]:
            for a, b in zip(first, layout, strict=False):
                self.groups.union(a, b)
        return list(first)

    def members(self):
        """``{root group: [(layer, kind)]}`` of the layers that produce each group."""
        producers = {}
        for layer, kind, _, out in self.layer_io.values():
            if kind in ("producer", "separable"):
                producers.setdefault(self.groups.find(out[0]), []).append(layer)
        return producers

    def positions(self, layout, kept):
        """Indices of the kept channels along a tensor's channel axis."""
        parts, offset = [], 0
        for group in layout:
            root = self.groups.find(group)
            size = self.groups.sizes[group]
            parts.append(offset + (kept[root] if root in kept else np.arange(size)))
            offset += size
        return np.concatenate(parts).astype("int64") if parts else np.zeros(0, "int64")


def _filter_scores(kernel, norm):
    flat = np.abs(kernel.reshape(-1, kernel.shape[-1]))
    return flat.sum(axis=0) if norm == "l1" else np.sqrt((flat ** 2).sum(axis=0))


def _producer_kernel(layer):
    return layer.pointwise_kernel if isinstance(layer, SEPARABLE) else layer.kernel


def _bn_scores(analysis, root):
    scores = None
    for layer, kind, layout, _ in analysis.layer_io.values():
        if kind != "norm" or not isinstance(layer, keras.layers.BatchNormalization) or not layer.scale:
            continue
        roots = [analysis.groups.find(g) for g in layout]
        if roots.count(root) != 1:
            continue
        start = sum(analysis.groups.sizes[g] for g in layout[: roots.index(root)])
        gamma = np.abs(keras.ops.convert_to_numpy(layer.gamma))
        part = gamma[start: start + analysis.groups.sizes[root]]
        scores = part if scores is None else scores + part
    return scores


def _gradients(model, variables, x, y, loss_fn):
    """d loss / d ``variables`` on one batch, with the backend's autodiff (TF or JAX)."""
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=False))
        return [np.asarray(g) if g is not None else None for g in tape.gradient(loss, variables)]
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


def _taylor_scores(model, layers, x, y, batch_size=64, max_samples=512):
    """``{id(layer): (Σ_filter w·∂L/∂w)² summed over batches}`` (Molchanov et al., 2019)."""
    from ensemblekit.compose._members import detect_output_kind

    x = np.asarray(x)[:max_samples]
    if y is None:
        y = predict(model, x).argmax(axis=-1)
    y = np.asarray(y)[: len(x)]
    from_logits = detect_output_kind(model) == "logits"
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=from_logits)
    variables = [_producer_kernel(layer) for layer in layers]
    scores = [np.zeros(v.shape[-1]) for v in variables]
    for start in range(0, len(x), batch_size):
        grads = _gradients(model, variables, x[start:start + batch_size], y[start:start + batch_size], loss_fn)
        for i, (variable, grad) in enumerate(zip(variables, grads, strict=True)):
            if grad is not None:
                product = keras.ops.convert_to_numpy(variable) * grad
                scores[i] += product.reshape(-1, product.shape[-1]).sum(axis=0) ** 2
    return {id(layer): s for layer, s in zip(layers, scores, strict=True)}


def _importance(analysis, producers, importance, x, y):
    """``{root: per-channel score}`` for every prunable group."""
    taylor = None
    if importance == "taylor":
        layers = [layer for root in producers for layer in producers[root]]
        taylor = _taylor_scores(analysis.model, layers, x, y)
    scores, fallback = {}, []
    for root, layers in producers.items():
        if importance == "bn_scale":
            bn = _bn_scores(analysis, root)
            if bn is not None:
                scores[root] = bn
                continue
            fallback.append(root)
        total = np.zeros(analysis.groups.sizes[root])
        for layer in layers:
            if taylor is not None:
                part = taylor[id(layer)]
            else:
                norm = "l1" if importance == "bn_scale" else importance
                part = _filter_scores(keras.ops.convert_to_numpy(_producer_kernel(layer)), norm)
            total += part / max(float(part.mean()), 1e-12)
        scores[root] = total
    return scores, fallback


def _keep_count(size, ratio, round_to):
    keep = size - int(round(ratio * size))
    if round_to:
        keep = int(round(keep / round_to)) * round_to
        keep = min(size, max(keep, round_to))
    return max(1, keep)


def _choose(scores, sizes, ratio, round_to, global_ranking):
    """``{root: sorted indices of the channels kept}``."""
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
    return {root: np.sort(np.argsort(-scores[root], kind="stable")[:counts[root]])
            for root in scores}


def _sliced_weights(layer, kind, in_pos, out_pos):
    arrays = [keras.ops.convert_to_numpy(v) for v in layer.weights]
    names = [v.name for v in layer.weights]
    sliced = []
    for name, array in zip(names, arrays, strict=False):
        if kind in ("producer", "separable") and name in ("kernel", "pointwise_kernel"):
            array = np.take(np.take(array, in_pos, axis=-2), out_pos, axis=-1)
        elif kind in ("producer", "separable") and name == "bias":
            array = np.take(array, out_pos, axis=-1)
        elif kind in ("depthwise", "separable") and name in ("kernel", "depthwise_kernel"):
            array = np.take(array, in_pos, axis=-2)
        elif kind in ("depthwise", "norm") and array.ndim == 1:
            array = np.take(array, in_pos, axis=-1)
        sliced.append(array)
    return sliced


def _rebuild(analysis, kept, nested):
    """Clone the model with edited layer configs, then copy the sliced weights in."""
    io = analysis.layer_io
    new_layers = {}

    def clone_layer(layer):
        if id(layer) in nested:
            new_layers[id(layer)] = nested[id(layer)]
            return nested[id(layer)]
        config = layer.get_config()
        _, kind, _, out = io.get(id(layer), (layer, None, None, None))
        if kind in ("producer", "separable"):
            count = len(analysis.positions(out, kept))
            config["units" if "units" in config else "filters"] = count
        new_layers[id(layer)] = layer.__class__.from_config(config)
        return new_layers[id(layer)]

    model = analysis.model
    rebuilt = keras.models.clone_model(model, clone_function=clone_layer)
    for layer, kind, in_layout, out in io.values():
        if kind == "nested" or not layer.weights:
            continue
        in_pos = analysis.positions(in_layout, kept) if in_layout is not None else None
        out_pos = analysis.positions(out, kept)
        new_layers[id(layer)].set_weights(_sliced_weights(layer, kind, in_pos, out_pos))
    return rebuilt


def _report_groups(analysis, producers, kept, on_unsupported):
    groups, blocked_by_layer = [], []
    for root, layers in producers.items():
        reason = analysis.groups.reason(root)
        size = analysis.groups.sizes[root]
        indices = [int(i) for i in kept.get(root, range(size))]
        groups.append(ChannelGroup([layer.name for layer in layers], size, len(indices), reason, indices))
        if reason and root in analysis.groups.unsupported and reason == analysis.groups.unsupported[root]:
            blocked_by_layer.append(f"{'/'.join(layer.name for layer in layers)} ({size} channels): {reason}")
    if blocked_by_layer:
        message = (f"channels(): model {analysis.model.name!r}: left unpruned "
                   + "; ".join(blocked_by_layer) + ".")
        if on_unsupported == "raise":
            raise ValueError(message)
        warnings.warn(message, stacklevel=3)
    return groups


def _prune(model, ratio, importance, x, y, round_to, global_ranking, on_unsupported):
    nested = {}
    for layer in model.layers:
        if is_container(layer):
            nested[id(layer)] = _prune(layer, ratio, importance, x, y, round_to, global_ranking,
                                       on_unsupported)
    analysis = _Analysis(model)
    producers = analysis.members()
    prunable = {root: layers for root, layers in producers.items() if analysis.groups.reason(root) is None}
    scores, fallback = _importance(analysis, prunable, importance, x, y)
    kept = _choose(scores, analysis.groups.sizes, ratio, round_to, global_ranking)
    groups = _report_groups(analysis, producers, kept, on_unsupported)
    rebuilt = _rebuild(analysis, kept, nested)
    rebuilt.pruned_groups_ = groups + [g for m in nested.values() for g in getattr(m, "pruned_groups_", [])]
    if fallback:
        warnings.warn(
            f"channels(): model {model.name!r}: no BatchNormalization scale on the groups of "
            f"{sorted(layer.name for root in fallback for layer in prunable[root])}; ranked them by 'l1'.",
            stacklevel=3,
        )
    return rebuilt


def _check_ratio(ratio):
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float, np.floating)):
        raise TypeError(f"ratio must be a number in [0, 1), got {type(ratio).__name__}.")
    if not 0.0 <= float(ratio) < 1.0:
        raise ValueError(f"ratio must be in [0, 1), got {ratio!r}.")
    return float(ratio)


def channels(model, ratio=0.5, importance="l1", x=None, y=None, round_to=None,
             global_ranking=False, on_unsupported="warn"):
    """Remove the least important ``ratio`` of channels from every prunable group; return a smaller model.

    Args:
        model: a functional or Sequential Keras model (``channels_last``). Nested
            models (e.g. members of ``ek.ensemble``) are each pruned on their own;
            a packed model (``ek.pack``) is unpacked, each member's channels are
            pruned on their own (same counts for all members) and it is packed
            again; subclassed models have no graph and get a ``ValueError``.
        ratio: fraction of channels removed per group, in ``[0, 1)``; ``0``
            returns a model with identical outputs.
        importance: ``"l1"``, ``"l2"``, ``"bn_scale"`` (groups without a
            BatchNormalization fall back to ``"l1"`` with a warning) or
            ``"taylor"`` (needs ``x``; TensorFlow or JAX backend).
        x, y: data for ``"taylor"`` (at most 512 samples are used; ``y``
            defaults to the model's own predicted labels).
        round_to: keep a multiple of this many channels per group (e.g. 8).
        global_ranking: rank channels of all groups together (scores divided
            by each group's mean) instead of removing ``ratio`` in every group.
        on_unsupported: a group that passes through a layer the graph cannot
            prune through is left whole with a warning (``"warn"``) or
            raises a ``ValueError`` naming the layer (``"raise"``).

    Returns:
        A new ``keras.Model`` with fewer units/filters and sliced weights; the
        output size never changes. ``model.pruned_groups_`` lists every
        :class:`ChannelGroup` with its size before/after and why it was kept whole.

    Example:
        >>> import keras, numpy as np
        >>> m = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, name="h"),
        ...                       keras.layers.Dense(3, name="out")])
        >>> small = channels(m, ratio=0.5)
        >>> small.get_layer("h").units, small.output_shape
        (8, (None, 3))
    """
    if not isinstance(model, keras.Model):
        raise TypeError(f"channels() needs a keras.Model, got {type(model).__name__}.")
    ratio = _check_ratio(ratio)
    check_choice(importance, IMPORTANCES, "importance")
    check_choice(on_unsupported, ON_UNSUPPORTED, "on_unsupported")
    if importance == "taylor" and x is None:
        raise ValueError("importance='taylor' needs x (and optionally y) to compute gradients.")
    if round_to is not None and (isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1):
        raise ValueError(f"round_to must be a positive integer or None, got {round_to!r}.")
    packed = _pack_record(model)
    if packed is not None:
        return _prune_packed(model, packed, ratio, importance, x, y, round_to, global_ranking,
                             on_unsupported)
    return _prune(model, ratio, importance, x, y, round_to, global_ranking, on_unsupported)


def _pack_record(model):
    """The ``PackedOutput`` layer of a model made by ``ek.pack``, else ``None``."""
    from ensemblekit.pack import PackedOutput

    records = [layer for layer in model.layers if isinstance(layer, PackedOutput)]
    return records[0] if records else None


def _prune_packed(model, record, ratio, importance, x, y, round_to, global_ranking, on_unsupported):
    """Unpack, prune every member's channels on its own, pack again (same counts per member)."""
    from ensemblekit.pack import pack, unpack

    if global_ranking:
        raise ValueError(
            f"Model {model.name!r} is packed (ek.pack): its members must keep equal channel counts, "
            "so global_ranking=True is not supported; use the default per-group ratio."
        )
    members = [_prune(member, ratio, importance, x, y, round_to, False, on_unsupported)
               for member in unpack(model)]
    repacked = pack(members, reduce=record.reduce, outputs=record.kind, name=model.name)
    repacked.pruned_groups_ = [g for member in members for g in member.pruned_groups_]
    return repacked


__all__ = ["ChannelGroup", "channels"]
