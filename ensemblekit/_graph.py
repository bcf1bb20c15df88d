"""The one walker over a model's layers and weights.

``merge``, ``align``, ``pack`` and ``prune`` all see a model through this
module: its leaf layers in order (nested models expanded, with ``/`` paths),
its weights by path, and a comparison of architectures that lists every
incompatible tensor at once instead of failing on the first.
"""

from __future__ import annotations

import dataclasses

import keras
import numpy as np


@dataclasses.dataclass(frozen=True)
class WeightRef:
    """One weight variable of a model, addressed by its path.

    Attributes:
        path: ``"<layer path>/<variable name>"``, e.g. ``"member_0/dense_1/kernel"``.
        layer_path: path of the owning leaf layer.
        layer: the owning leaf layer.
        variable: the ``keras.Variable``.
        slot: the variable's position among its layer's weights. Models are
            matched by layer order, layer type and slot, never by variable
            names, which Keras numbers per process (``variable`` vs ``variable_18``).
    """

    path: str
    layer_path: str
    layer: keras.layers.Layer
    variable: keras.Variable
    slot: int = 0

    @property
    def name(self):
        return self.variable.name

    @property
    def shape(self):
        return tuple(self.variable.shape)

    @property
    def dtype(self):
        return str(self.variable.dtype)

    @property
    def is_float(self):
        """True for float weights (averageable); False for counters, seeds, int tables."""
        return "float" in self.dtype

    def numpy(self):
        return keras.ops.convert_to_numpy(self.variable)

    def assign(self, value):
        self.variable.assign(np.asarray(value, dtype=self.dtype))


def is_container(layer):
    """True for layers that hold other layers (nested ``Model``/``Sequential``)."""
    return isinstance(layer, keras.Model)


def iter_layers(model, prefix=""):
    """Yield ``(path, layer)`` for every leaf layer of ``model``, in order.

    Nested models are walked recursively and their layers get paths
    ``"outer/inner/layer"``. Input layers are skipped.

    Example:
        >>> import keras
        >>> m = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, name="d")])
        >>> [path for path, _ in iter_layers(m)]
        ['d']
    """
    for layer in model.layers:
        if isinstance(layer, keras.layers.InputLayer):
            continue
        path = f"{prefix}{layer.name}"
        if is_container(layer):
            yield from iter_layers(layer, prefix=f"{path}/")
        else:
            yield path, layer


def weight_refs(model):
    """Return a ``WeightRef`` for every weight of ``model``, in layer order.

    Example:
        >>> import keras
        >>> m = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, name="d")])
        >>> [(w.path, w.shape) for w in weight_refs(m)]
        [('d/kernel', (3, 2)), ('d/bias', (2,))]
    """
    refs = []
    for layer_path, layer in iter_layers(model):
        for slot, variable in enumerate(layer.weights):
            refs.append(WeightRef(f"{layer_path}/{variable.name}", layer_path, layer, variable, slot))
    return refs


def get_arrays(model):
    """All weights of ``model`` as numpy arrays, in ``weight_refs`` order."""
    return [ref.numpy() for ref in weight_refs(model)]


def set_arrays(model, arrays):
    """Assign ``arrays`` (in ``weight_refs`` order) to the weights of ``model``."""
    refs = weight_refs(model)
    if len(refs) != len(arrays):
        raise ValueError(
            f"Model {model.name!r} has {len(refs)} weights but {len(arrays)} arrays were given."
        )
    for ref, array in zip(refs, arrays):
        if tuple(np.shape(array)) != ref.shape:
            raise ValueError(
                f"Model {model.name!r}, weight {ref.path!r}: expected shape {ref.shape}, "
                f"got {tuple(np.shape(array))}."
            )
        ref.assign(array)


def architecture_differences(models, labels=None, skip_adapters=False):
    """List every incompatibility between the weights of ``models`` and model 0.

    Weights are matched by position, layer type and slot within the layer, not
    by name (independently built models have different auto-generated layer
    and variable names), and each difference names the weight path in both
    models and both shapes. ``skip_adapters`` leaves LoRA factors out (merging
    reads effective kernels, so a member with adapters matches one without).

    Returns:
        A list of one-line strings; empty when all models are compatible.
    """
    labels = labels or [f"model {i} ({m.name!r})" for i, m in enumerate(models)]

    def refs_of(model):
        refs = weight_refs(model)
        return [r for r in refs if r.name not in _ADAPTER_NAMES] if skip_adapters else refs

    reference = refs_of(models[0])
    problems = []
    for label, model in zip(labels[1:], models[1:]):
        refs = refs_of(model)
        for position in range(max(len(reference), len(refs))):
            ref0 = reference[position] if position < len(reference) else None
            ref = refs[position] if position < len(refs) else None
            if ref0 is None:
                problems.append(f"{label}: extra weight {ref.path!r} {ref.shape} not in {labels[0]}")
            elif ref is None:
                problems.append(f"{label}: missing weight for {labels[0]}'s {ref0.path!r} {ref0.shape}")
            elif ref.shape != ref0.shape or type(ref.layer) is not type(ref0.layer) or ref.slot != ref0.slot:
                problems.append(
                    f"{label}: {ref.path!r} {type(ref.layer).__name__} {ref.shape} vs "
                    f"{labels[0]}'s {ref0.path!r} {type(ref0.layer).__name__} {ref0.shape}"
                )
    return problems


# Configuration keys that do not change the function a layer computes at inference: names,
# how weights were initialized or regularized, seeds, and the LoRA rank (the effective kernel
# is what merging reads).
_INERT_KEYS = {"name", "trainable", "seed", "lora_rank", "lora_alpha", "activity_regularizer"}
_INERT_SUFFIXES = ("_initializer", "_regularizer", "_constraint")
_DROPOUT_KEYS = {"rate", "noise_shape", "stddev"}
_SAVEDMODEL_LAYER = getattr(keras.layers, "TFSMLayer", None)
_ADAPTER_NAMES = {"lora_kernel_a", "lora_kernel_b", "lora_embeddings_a", "lora_embeddings_b"}


def _function_config(layer):
    """``layer``'s configuration without the keys that do not change its inference function."""
    try:
        config = dict(layer.get_config())
    except Exception:  # a layer without get_config cannot be compared; its weights still are
        return {}
    dropout = isinstance(layer, (keras.layers.Dropout, keras.layers.GaussianNoise,
                                 keras.layers.GaussianDropout, keras.layers.AlphaDropout))
    return {key: value for key, value in config.items()
            if key not in _INERT_KEYS and not key.endswith(_INERT_SUFFIXES)
            and "dropout" not in key and not (dropout and key in _DROPOUT_KEYS)}


def _same_value(a, b):
    try:
        return bool(np.all(np.asarray(a == b))) if not isinstance(a, (dict, list, tuple)) else a == b
    except Exception:
        return repr(a) == repr(b)


def config_differences(models, labels=None):
    """List every layer configuration key that differs from model 0 and changes the function.

    Weight-space merging is defined for one architecture: two layers with equal
    weight shapes but another activation, epsilon, padding, strides, axis or
    dtype policy compute different functions. Initializers, regularizers,
    constraints, names, seeds, dropout rates and LoRA ranks are ignored.

    Returns:
        A list of one-line strings naming the member, the layer and the key.
    """
    labels = labels or [f"model {i} ({m.name!r})" for i, m in enumerate(models)]
    reference = list(iter_layers(models[0]))
    problems = []
    for label, model in zip(labels[1:], models[1:]):
        for (path0, layer0), (path, layer) in zip(reference, iter_layers(model)):
            if type(layer0) is not type(layer):
                continue  # reported by architecture_differences when it holds weights
            config0, config = _function_config(layer0), _function_config(layer)
            for key in sorted(set(config0) | set(config)):
                if not _same_value(config0.get(key), config.get(key)):
                    problems.append(
                        f"{label}: layer {path!r} ({type(layer).__name__}) has "
                        f"{key}={config.get(key)!r} but "
                        f"{labels[0]}'s {path0!r} has {key}={config0.get(key)!r}"
                    )
    return problems


def iter_sublayers(model):
    """Yield ``(path, layer)`` for every leaf layer of ``model`` and every layer inside it.

    ``iter_layers`` stops at composite blocks (a keras-hub ``TransformerEncoder``
    is one leaf); their Dense, EinsumDense or BatchNormalization layers come
    right after the block, with paths ``"block/inner"``.

    Example:
        >>> import keras
        >>> m = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, name="d")])
        >>> [path for path, _ in iter_sublayers(m)]
        ['d']
    """
    for path, leaf in iter_layers(model):
        for layer in leaf._flatten_layers(include_self=True, recursive=True):
            yield (path if layer is leaf else f"{path}/{layer.name}"), layer


def special_layers(model):
    """``[(path, kind)]`` for every layer (nested ones too) whose variables are not plain
    weights: ``"lora"`` (LoRA enabled), a quantization mode (``"int8"``, ``"int4"``,
    ``"float8"``...) or ``"savedmodel"`` (a ``TFSMLayer``: no Keras layers inside)."""
    found = []
    for where, layer in iter_sublayers(model):
        if _SAVEDMODEL_LAYER is not None and isinstance(layer, _SAVEDMODEL_LAYER):
            found.append((where, "savedmodel"))
        if getattr(layer, "lora_enabled", False):
            found.append((where, "lora"))
        mode = getattr(layer, "quantization_mode", None)
        if mode:
            found.append((where, mode))
    return found


def check_plain_layers(models, labels=None, function="this function", adapted_ok=False):
    """Refuse members this function cannot read layer by layer, naming member, layer and why.

    A ``TFSMLayer`` (a SavedModel) is always refused: it has no Keras layers or
    weights to read. LoRA-enabled and quantized layers are refused unless
    ``adapted_ok`` (``merge`` reads their effective float weights).
    """
    labels = labels or [f"model {i} ({m.name!r})" for i, m in enumerate(models)]
    for label, model in zip(labels, models):
        for path, kind in special_layers(model):
            if kind == "savedmodel":
                raise ValueError(
                    f"{function}: {label}: layer {path!r} is a TFSMLayer (a SavedModel); it has no "
                    "Keras layers or weights to read. Use the Keras model it was exported from."
                )
            if adapted_ok:
                continue
            if kind == "lora":
                raise ValueError(
                    f"{function}: {label}: layer {path!r} has LoRA enabled; its kernel alone is not "
                    "the function it computes. Fold the adapters first: ek.merge([member]) returns "
                    "the member with plain layers holding W + (alpha/rank)·A·B."
                )
            raise ValueError(
                f"{function}: {label}: layer {path!r} is {kind}-quantized; {function} works on "
                "float layers. Pass the float members (and quantize the result with ek.quantize), "
                "or dequantize with ek.merge([member], quantize=False)."
            )


def check_same_architecture(models, labels=None, function=None, adapted_ok=False,
                            same_function=False):
    """Raise one ``ValueError`` listing every incompatible weight, if any; refuse layers
    ``function`` cannot read (``check_plain_layers``).

    With ``same_function`` (merging: one set of weights for all), every layer
    configuration key that changes the function must match too
    (:func:`config_differences`); ``pack`` carries per-member constants and
    checks its own. With ``adapted_ok`` (merging), LoRA adapter factors are not
    compared (a member with adapters merges with one without), nor are
    quantized layers refused.
    """
    labels = labels or [f"model {i} ({m.name!r})" for i, m in enumerate(models)]
    prefix = f"{function}: " if function else ""
    check_plain_layers(models, labels, function or "this function", adapted_ok)
    configs = config_differences(models, labels) if same_function else []
    # A dtype policy (float32, mixed_float16, int8_from_float32...) that differs also changes
    # the weights' shapes and dtypes: saying so first names the cause.
    precision = [problem for problem in configs if " has dtype=" in problem]
    if precision:
        raise ValueError(f"{prefix}Models do not share one dtype policy:\n  " + "\n  ".join(precision))
    problems = architecture_differences(models, labels, skip_adapters=adapted_ok)
    if problems:
        raise ValueError(
            f"{prefix}Models do not share one architecture ({len(problems)} incompatible "
            "weights):\n  " + "\n  ".join(problems)
        )
    if configs:
        raise ValueError(
            f"{prefix}Models are not one architecture: {len(configs)} layer configuration "
            "key(s) that change the function differ (the members must compute one function "
            "family):\n  " + "\n  ".join(configs)
        )


def inbound_layers(layer, nodes=None):
    """The layers whose outputs feed ``layer`` (its first call among ``nodes``, default: any graph)."""
    nodes = getattr(layer, "_inbound_nodes", []) if nodes is None else nodes
    if not nodes:
        return []
    return [t._keras_history.operation for t in nodes[0].input_tensors]


def own_nodes(model):
    """``{id(layer): [call nodes]}`` of ``model``'s own graph, in execution order.

    A layer's ``_inbound_nodes`` also hold its calls in other graphs (a member
    used in an ensemble, a ``Sequential`` model rebuilt when loaded from
    ``.keras``); only the nodes of this model say what feeds what here and
    whether a layer is shared within it.
    """
    calls = {}
    for node in _nodes_in_order(model):
        calls.setdefault(id(node.operation), []).append(node)
    return calls


def _graph_model(model):
    """The functional model behind ``model`` (Sequential's functional form); ValueError without one."""
    graph_model = getattr(model, "_functional", None) or model
    if not isinstance(graph_model, keras.Model) or not hasattr(graph_model, "operations"):
        raise ValueError(
            f"Model {model.name!r} ({type(model).__name__}) has no functional graph; build it "
            "with the functional API or keras.Sequential."
        )
    return graph_model


def _nodes_in_order(model):
    """The call nodes of ``model``'s own graph (input layers included), in execution order."""
    graph_model = _graph_model(model)
    for depth in sorted(graph_model._nodes_by_depth, reverse=True):
        for node in graph_model._nodes_by_depth[depth]:
            if node.operation is not None:
                yield node


def functional_graph(model):
    """Return ``{layer_name: [inbound layer names]}`` for a functional model.

    Sequential models are viewed through their functional form. Subclassed
    models have no graph and get a ``ValueError``.
    """
    return {op.name: [parent.name for parent in parents] for op, parents in graph_operations(model)}


def model_input_shape(model):
    """The single input shape of ``model`` without the batch axis, e.g. ``(40, 1)``."""
    inputs = getattr(model, "inputs", None)
    if not inputs:
        raise ValueError(
            f"Model {model.name!r} is not built (no inputs); call it on data or give it an "
            "keras.Input first."
        )
    if len(inputs) != 1:
        raise ValueError(f"Model {model.name!r} has {len(inputs)} inputs; only one is supported.")
    return tuple(inputs[0].shape[1:])


def model_output_shape(model):
    """The single output shape of ``model`` without the batch axis, e.g. ``(10,)``."""
    outputs = getattr(model, "outputs", None)
    if not outputs:
        raise ValueError(f"Model {model.name!r} is not built (no outputs).")
    if len(outputs) != 1:
        raise ValueError(f"Model {model.name!r} has {len(outputs)} outputs; only one is supported.")
    return tuple(outputs[0].shape[1:])


def graph_operations(model):
    """Return ``[(layer, [inbound layers])]`` for a functional model, in topological order.

    The objects behind ``functional_graph``: ``pack`` rebuilds a model layer by
    layer from it. Input layers are included (with no inbound layers).

    Example:
        >>> import keras
        >>> x = keras.Input((3,), name="x")
        >>> m = keras.Model(x, keras.layers.Dense(2, name="d")(x))
        >>> [(op.name, [p.name for p in parents]) for op, parents in graph_operations(m)]
        [('x', []), ('d', ['x'])]
    """
    calls = own_nodes(model)
    return [(op, inbound_layers(op, calls.get(id(op)))) for op in _graph_model(model).operations]


def graph_nodes(model):
    """The call nodes of a functional model, tensor by tensor, in execution order.

    ``functional_graph`` at tensor level, read from the model's own nodes (so a
    member also used in another model is seen only as called here).
    ``prune.channels`` follows the channel axis of every tensor through it.

    Returns:
        ``(inputs, outputs, nodes)``: the model's input and output KerasTensors
        and a list of ``(layer, input_tensors, output_tensors)``; input layers
        are not listed.

    Example:
        >>> import keras
        >>> x = keras.Input((3,), name="x")
        >>> m = keras.Model(x, keras.layers.Dense(2, name="d")(x))
        >>> [layer.name for layer, _, _ in graph_nodes(m)[2]]
        ['d']
    """
    nodes = [(node.operation, list(node.input_tensors), list(node.outputs))
             for node in _nodes_in_order(model) if not node.is_input]
    graph_model = _graph_model(model)
    return list(graph_model.inputs), list(graph_model.outputs), nodes


@dataclasses.dataclass(frozen=True)
class FlatNode:
    """One call of a leaf operation in a model whose nested models are expanded in place.

    Attributes:
        operation: the layer (or ``keras.ops`` operation) called, the model's own object.
        node: the Keras call node (its ``arguments`` hold constants and keyword arguments).
        inputs: the input tensors, in ``node.input_tensors`` order, as seen from the
            outermost graph: a nested model's input is the tensor its call received.
        outputs: the output tensors.
        path: the names of the nested models the call lies in, outermost first
            (``()`` for the model's own layers).
    """

    operation: object
    node: object
    inputs: list
    outputs: list
    path: tuple = ()

    def arguments(self, values):
        """The call's ``(args, kwargs)`` with input tensor ``t`` replaced by ``values[id(t)]``."""
        return self.node.arguments.fill_in(
            {id(own): values[id(seen)] for own, seen in zip(self.node.input_tensors, self.inputs)}
        )


def flat_nodes(model):
    """The call nodes of ``model`` with every nested functional/Sequential model expanded in place.

    The ``graph_nodes`` of a model seen as one flat graph: a nested model's call
    is replaced by the calls of its own layers (the same layer objects), its
    inputs are the tensors the call received and its outputs stand for the
    call's outputs. ``pack`` rebuilds a member from it; ``iter_layers`` lists the
    same leaf layers in ``model.layers`` order.

    Returns:
        ``(inputs, outputs, nodes)``: the model's input and output KerasTensors
        (outputs as the inner tensors that compute them) and a list of
        :class:`FlatNode` in execution order; input layers are not listed.

    Raises:
        ValueError: a model (or nested model) without a functional graph.

    Example:
        >>> import keras
        >>> inner = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, name="d")], name="inner")
        >>> x = keras.Input((3,))
        >>> outer = keras.Model(x, keras.layers.Dense(1, name="top")(inner(x)))
        >>> [(node.operation.name, node.path) for node in flat_nodes(outer)[2]]
        [('d', ('inner',)), ('top', ())]
    """
    seen_as = {}  # id(tensor) -> the tensor that stands for it in the flat graph
    nodes = []
    _expand(model, (), seen_as, nodes)
    graph_model = _graph_model(model)
    outputs = [seen_as.get(id(t), t) for t in graph_model.outputs]
    return list(graph_model.inputs), outputs, nodes


def _expand(model, path, seen_as, nodes):
    for node in _nodes_in_order(model):
        if node.is_input:
            continue
        operation = node.operation
        inputs = [seen_as.get(id(t), t) for t in node.input_tensors]
        if not is_container(operation):
            nodes.append(FlatNode(operation, node, inputs, list(node.outputs), path))
            continue
        inner = _graph_model(operation)
        if len(inner.inputs) != len(inputs):
            raise ValueError(
                f"Model {model.name!r}: nested model {operation.name!r} is called with "
                f"{len(inputs)} tensors but has {len(inner.inputs)} inputs."
            )
        for inner_input, outer_input in zip(inner.inputs, inputs, strict=True):
            seen_as[id(inner_input)] = outer_input
        _expand(operation, (*path, operation.name), seen_as, nodes)
        for outer_output, inner_output in zip(node.outputs, inner.outputs, strict=True):
            seen_as[id(outer_output)] = seen_as.get(id(inner_output), inner_output)
