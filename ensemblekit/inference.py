"""``compile_for_inference``: run any model as one compiled call per input shape.

On TensorFlow the model is traced once per input shape and dtype into a
concrete function that later calls run directly (with ``jit_compile=True``: one
XLA cluster); on JAX it is ``jax.jit`` of ``model.stateless_call``. On CPU,
XLA is not always the faster (it was slower than the plain TF graph for
``ek.ensemble`` at batch >= 32 and several times slower for depthwise
convolutions), so ``jit_compile="auto"`` times both per input shape and keeps
the faster (``f.jit_compile_``).

Packed models (``ek.pack``) hold grouped Dense layers that can run their K
members as one einsum over a stacked kernel (``"grouped"``) or as K matmuls
(``"loop"``). :class:`LoweringPolicy` is the one place that decides which: what
``pack`` assigns to each layer, what an ``"auto"`` layer does when traced, and
when ``compile_for_inference`` measures both and keeps the faster. The
autotuner also times, for a packed model, the members run side by side as
separate graphs (``"ensemble"``, :func:`unpacked_ensemble`: the same function
as ``ek.ensemble(ek.unpack(packed))``), which XLA on CPU often runs faster at
large batches than any grouped lowering.

``compile_for_inference(model, dtype="bfloat16"|"float16"|"float32")`` runs a
copy of the model whose layers all use the Keras mixed-precision policy of
that compute dtype (``mixed_bfloat16``, ``mixed_float16``, ``float32``; see
:func:`with_compute_dtype`): variables stay float32, each layer casts them and
its inputs to the compute dtype, normalizations and the ensemble reductions
(``ek.ensemble``'s combiners, ``ek.pack``'s ``PackedOutput``) run in float32,
and the output is cast to float32. In bfloat16 (8 significant bits) the
probabilities of small classifiers typically move by up to ~1e-2 and a few
borderline argmaxes in a thousand flip; float16 (11 bits) moves them ~10x less.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import tempfile
import time
import warnings

import keras
import numpy as np

from ensemblekit._packed import output_layers, rebuild_members, unpack_record
from ensemblekit._timing import time_paths

LOWERINGS = ("auto", "grouped", "loop")
# compile_for_inference(dtype=...) -> the Keras dtype policy the copy's layers get.
DTYPE_POLICIES = {"float32": "float32", "bfloat16": "mixed_bfloat16", "float16": "mixed_float16"}
_FLOAT_POLICIES = ("float32", "float16", "bfloat16", "mixed_float16", "mixed_bfloat16")


@dataclasses.dataclass(frozen=True)
class LoweringPolicy:
    """How grouped (packed) layers run their K members: one grouped op or a loop of K ops.

    - ``pack`` gives convolutions ``conv_lowering`` ("loop": K convolutions; TF's
      CPU kernel for a ``groups=K`` convolution is slower than K plain ones) and
      Dense layers ``"auto"``.
    - An ``"auto"`` Dense layer traced outside ``compile_for_inference`` uses K
      matmuls once a member sees at least ``loop_rows`` rows (TF's batched
      matmul is slower than K plain ones at large batches), one einsum below
      that or when the batch size is unknown.
    - ``compile_for_inference(autotune=True)`` compiles both lowerings (and, for
      a packed model, its members as separate graphs, ``"ensemble"``) for each
      new input shape, times them on that input and keeps the fastest (the
      winner changed between runs on the same machine, so no fixed rule is
      right); with ``autotune=False`` an XLA trace uses the einsum, which XLA fuses.

    Example:
        >>> policy = LoweringPolicy(loop_rows=128)
        >>> policy.choose(rows=256), policy.choose(rows=8), policy.choose(rows=None)
        ('loop', 'grouped', 'grouped')
        >>> policy.choose(rows=256, forced="grouped")
        'grouped'
    """

    loop_rows: int = 128
    conv_lowering: str = "loop"

    def for_layer(self, layer_kind, requested="auto"):
        """The lowering ``pack`` stores on a grouped layer of ``layer_kind`` (``"dense"``/``"conv"``)."""
        if requested != "auto":
            return requested
        return "auto" if layer_kind == "dense" else self.conv_lowering

    def choose(self, rows, forced=None):
        """The lowering an ``"auto"`` layer uses when traced with ``rows`` rows per member."""
        if forced is not None:
            return forced
        return "loop" if rows is not None and rows >= self.loop_rows else "grouped"


POLICY = LoweringPolicy()


def autotunable_layers(model):
    """The layers of ``model`` (nested ones too) whose lowering is decided at trace time (``"auto"``)."""
    return [layer for layer in model._flatten_layers(include_self=False, recursive=True)
            if getattr(layer, "lowering", None) == "auto"]


@contextlib.contextmanager
def forced_lowering(model, lowering):
    """While tracing ``model``: every ``"auto"`` layer uses ``lowering`` (``None``: the policy's rule)."""
    layers = autotunable_layers(model)
    for layer in layers:
        layer.forced_lowering = lowering
    try:
        yield
    finally:
        for layer in layers:
            layer.forced_lowering = None


class InferenceFunction:
    """``model`` as one compiled call: ``f(x)`` returns the model's output (numpy).

    Made by ``compile_for_inference``; ``fn`` is the backend-compiled function
    (``tf.function`` or ``jax.jit``) for callers that want backend tensors.
    ``lowerings_`` maps each input shape that was autotuned to the way of
    running the model that measured fastest for it: ``"grouped"`` or
    ``"loop"`` (the packed model with that grouped-dense lowering),
    ``"packed"`` (a packed model whose lowerings are fixed) or ``"ensemble"``
    (its members as separate graphs, :func:`unpacked_ensemble`).
    ``jit_compile_`` maps each compiled input shape to whether its call runs
    as one XLA cluster (``True``; always on JAX) or a plain TF graph
    (``False``); with ``jit_compile="auto"`` that is what measured fastest.
    ``compile_seconds_`` maps each input shape to the seconds its compilation
    took: the first call's (plain graphs and the timing of the ways), then, with
    ``"auto"``, the second call's (XLA tried against them).

    Example:
        >>> import keras
        >>> f = compile_for_inference(keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)]))
        >>> f.predict(np.zeros((5, 2), "float32"), batch_size=4).shape
        (5, 1)
    """

    def __init__(self, model, fn, jit_compile, to_numpy=keras.ops.convert_to_numpy, lowerings=None,
                 jit_choices=None, costs=None):
        self.model = model
        self.fn = fn
        self.jit_compile = jit_compile
        self._to_numpy = to_numpy
        self.lowerings_ = {} if lowerings is None else lowerings
        self.jit_compile_ = {} if jit_choices is None else jit_choices
        self.compile_seconds_ = {} if costs is None else costs

    def __call__(self, x):
        return self._to_numpy(self.fn(x))

    def predict(self, x, batch_size=256):
        """Run on ``x`` in batches of ``batch_size``; return numpy.

        The last batch is padded to ``batch_size`` rows (their outputs dropped),
        so one compiled shape serves any length of ``x``.
        """
        x, rows = pad_to_batches(x, batch_size)
        return np.concatenate([self(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])[:rows]


def compile_for_inference(model, jit_compile="auto", autotune=True, dtype=None):
    """Return a callable that runs ``model`` (e.g. ``ek.ensemble``, ``ek.pack``) as one compiled call.

    Args:
        model: any built ``keras.Model`` with one input.
        jit_compile: ``"auto"`` (default): never slower than the plain graph —
            the first call of each input shape runs a plain TF graph (for a
            packed model, the fastest of its ways, the unpacked members among
            them); the second call of that shape compiles XLA and keeps it only
            where it measured faster (``f.jit_compile_`` records the choice,
            ``f.compile_seconds_`` the cost). On CPU XLA is often slower than
            the plain graph at batch >= 32 and for depthwise convolutions (12x
            on MobileNetV2 / EfficientNetB0 ensembles at batch 32), faster at
            small batches. ``True``: always XLA; ``False``: always a plain TF
            graph. JAX always compiles with XLA.
        autotune: for a packed model (``ek.pack``), compile on the first input
            of each shape every way of running it -- both lowerings of its
            ``"auto"`` grouped layers (see :class:`LoweringPolicy`) and its
            members as separate graphs (``"ensemble"``, see
            :func:`unpacked_ensemble`; built once, on first use) -- time them
            on that input and keep the fastest; the choice is kept in
            ``f.lowerings_``. Other models have one way and are not timed.
        dtype: ``None`` runs ``model`` with its own dtype policies;
            ``"float32"``, ``"bfloat16"`` or ``"float16"`` run a copy whose layers
            compute in that dtype (:func:`with_compute_dtype`; ``f.model`` is the
            copy). Outputs are float32 either way. bfloat16 pays off where the
            hardware has bfloat16 matmuls (recent GPUs/TPUs, AMX CPUs); see the
            module docstring for the expected difference to float32.

    Returns:
        An ``InferenceFunction``: ``f(x)`` returns the output as numpy (float32
        for float outputs), ``f.fn(x)`` the backend tensor, ``f.predict(x,
        batch_size)`` runs in batches.

    Example:
        >>> import keras
        >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
        >>> f = compile_for_inference(model)
        >>> x = np.ones((2, 4), "float32")
        >>> bool(np.allclose(f(x), model.predict(x, verbose=0), atol=1e-6))
        True
        >>> auto = compile_for_inference(model, jit_compile="auto")
        >>> bool(np.allclose(auto(x), f(x), atol=1e-6)), list(auto.jit_compile_) == [(2, 4)]
        (True, True)
    """
    if isinstance(jit_compile, str) and jit_compile != "auto":
        raise ValueError(f"jit_compile must be True, False or 'auto'; got {jit_compile!r}.")
    if not isinstance(model, keras.Model):
        raise TypeError(f"compile_for_inference expects a keras.Model, got {type(model).__name__}.")
    if not model.built or not getattr(model, "inputs", None):
        raise ValueError(f"Model {model.name!r} is not built; give it a keras.Input or call it once first.")
    if dtype is not None:
        model = with_compute_dtype(model, dtype)
    backend = keras.backend.backend()
    lowerings, jit_choices, costs = {}, {}, {}
    tuner = _Autotuner(model, DTYPE_POLICIES.get(dtype), lowerings) if autotune else None
    if tuner is not None and not tuner.tunes:
        tuner = None
    if backend == "tensorflow":
        import tensorflow as tf

        jits = (True, False) if jit_compile == "auto" else (bool(jit_compile),)
        fn = _shape_dispatch(_tf_compiler(), tf.convert_to_tensor, model, tuner, jits, jit_choices, costs)
        return InferenceFunction(model, fn, jit_compile, to_numpy=_to_numpy, lowerings=lowerings,
                                 jit_choices=jit_choices, costs=costs)
    if backend == "jax":
        import jax.numpy as jnp

        fn = _shape_dispatch(_jax_compiler(), jnp.asarray, model, tuner, (True,), jit_choices, costs)
        return InferenceFunction(model, fn, jit_compile, to_numpy=_to_numpy, lowerings=lowerings,
                                 jit_choices=jit_choices, costs=costs)

    def fn(x):
        return _float32(model(x, training=False))

    return InferenceFunction(model, fn, jit_compile)


class _Autotuner:
    """The ways of running ``model`` timed per input shape, and the choice made for each.

    ``ways()`` gives ``{name: (model, lowering)}``: the packed model under each
    grouped lowering (``"grouped"``, ``"loop"``; ``"packed"`` if none is
    ``"auto"``) and, for a packed model, ``"ensemble"``: its members as separate
    graphs (:func:`unpacked_ensemble`), built on first use and dropped again
    while no shape has chosen it, so an unused copy of the weights is not kept.
    """

    def __init__(self, model, policy, lowerings):
        self.model = model
        self.policy = policy
        self.lowerings = lowerings
        self.packed = _unpack_record(model) is not None
        self.lowering_names = ("grouped", "loop") if autotunable_layers(model) else ("packed",)
        self.tunes = self.packed or self.lowering_names != ("packed",)
        self._ensemble = None

    def ways(self):
        ways = {name: (self.model, None if name == "packed" else name) for name in self.lowering_names}
        if self.packed:
            if self._ensemble is None:
                self._ensemble = unpacked_ensemble(self.model, self.policy)
            ways["ensemble"] = (self._ensemble, None)
        return ways

    def record(self, shape, choice):
        self.lowerings[shape] = choice
        if "ensemble" not in self.lowerings.values():
            self._ensemble = None  # no shape runs it: free its weights (rebuilt if a new shape needs it)


def _shape_dispatch(compile_for_shape, convert, model, tuner=None, jits=(True,), jit_choices=None, costs=None):
    """``fn(x)``: one compiled call per input shape and dtype, made on first use.

    A ``tf.function`` matches its signature (and, for numpy input, checks for
    retracing) on every call; at small batches that Python overhead is most of
    the time per call. Here each input shape and dtype is compiled once by
    ``compile_for_shape(model, lowering, x, jit_compile)`` and later calls go
    straight to it. With a ``tuner`` (:class:`_Autotuner`) the ways are compiled,
    timed on the first input and the fastest kept (:func:`_compile_fastest`).

    With ``jits=(True, False)`` (``jit_compile="auto"``) XLA is tried lazily: the
    first call of a shape compiles plain graphs only (as cheap as the naive
    graph's first call, plus the timing of the ways), and the second call of that
    shape compiles XLA and keeps it only if it measures faster
    (:func:`_try_xla`), so XLA never makes a shape slower and its compile time
    never lands on the first call. The choices are recorded in
    ``tuner.lowerings`` and ``jit_choices``; the seconds each phase took in ``costs``.
    """
    compiled, pending = {}, {}
    lazy_xla = len(jits) > 1

    def fn(x):
        x = convert(x)
        key = (tuple(x.shape), str(x.dtype))
        call = compiled.get(key)
        if call is None or key in pending:
            start = time.perf_counter()
            if call is None:
                call, jit, way = _compile_fastest(compile_for_shape, model, tuner, (False,) if lazy_xla else jits, x)
                if lazy_xla:
                    pending[key] = way
            else:
                call, jit, way = _try_xla(compile_for_shape, model, tuner, x, call, pending.pop(key))
            compiled[key] = call
            if tuner is not None:
                tuner.record(key[0], way)
            if jit_choices is not None:
                jit_choices[key[0]] = jit
            if costs is not None:
                costs.setdefault(key[0], []).append(time.perf_counter() - start)
        return call(x)

    return fn


def _compile_fastest(compile_for_shape, model, tuner, jits, x):
    """``(call, jit_compile, way)``: the fastest way of running ``model`` on ``x`` compiled with ``jits[0]``.

    The ways are ``model`` itself or, with a ``tuner``, ``tuner.ways()`` (timed
    round-robin when there are several).
    """
    ways = {None: (model, None)} if tuner is None else tuner.ways()
    jit = jits[0]
    calls = {name: compile_for_shape(way, lowering, x, jit) for name, (way, lowering) in ways.items()}
    choice = _fastest(calls, x) if len(calls) > 1 else next(iter(calls))
    return calls[choice], jit, choice


def _try_xla(compile_for_shape, model, tuner, x, current, way):
    """``(call, jit_compile, way)``: XLA against the plain graph ``current`` (way ``way``) on ``x``.

    XLA compilations are the expensive ones, so only the first way (``"grouped"``
    for a packed model) is compiled with XLA and timed against ``current``; only
    if it wins are the other ways compiled with XLA too and timed against it. A
    model that XLA runs slowly (depthwise convolutions, large batches on CPU)
    costs one XLA compilation per shape; one XLA cannot compile keeps ``current``.
    """
    ways = {None: (model, None)} if tuner is None else tuner.ways()
    default = next(iter(ways))
    try:
        xla = compile_for_shape(*ways[default], x, True)
    except Exception:  # noqa: BLE001 - an op XLA cannot compile: the plain graph stays
        return current, False, way
    calls = {(way, False): current, (default, True): xla}
    name, jit = _fastest(calls, x)
    if jit and len(ways) > 1:
        calls = {(default, True): xla, **{(other, True): compile_for_shape(w, lowering, x, True)
                                          for other, (w, lowering) in ways.items() if other != default}}
        name, jit = _fastest(calls, x)
    return calls[name, jit], jit, name


def _tf_compiler():
    """``compile_for_shape`` on TF: a concrete function per shape, called without re-binding."""
    import tensorflow as tf

    def compile_for_shape(model, lowering, x, jit_compile):
        traced = tf.function(lambda t: _float32(model(t, training=False)), jit_compile=bool(jit_compile))
        if lowering is None and jit_compile:
            lowering = "grouped"  # XLA fuses the one einsum
        with forced_lowering(model, lowering):
            return _direct_call(traced.get_concrete_function(tf.TensorSpec(x.shape, x.dtype)))

    return compile_for_shape


def _jax_compiler():
    """``compile_for_shape`` on JAX: ``jax.jit`` of ``stateless_call``, traced now for ``x``'s shape."""
    import jax

    def compile_for_shape(model, lowering, x, jit_compile=True):
        del jit_compile  # always jitted
        step = jax.jit(lambda tv, ntv, t: _float32(model.stateless_call(tv, ntv, t, training=False)[0]))

        def call(t):
            # The variables' current arrays, read at each call: Keras' own jitted
            # predict/fit donate (delete) the arrays they were given, so a snapshot
            # taken earlier would be stale after the model is used elsewhere.
            return step([v.value for v in model.trainable_variables],
                        [v.value for v in model.non_trainable_variables], t)

        with forced_lowering(model, lowering or "grouped"):
            call(x)  # trace and compile for this shape under the forced lowering
        return call

    return compile_for_shape


def _fastest(calls, x, rounds=5, target_s=0.02, slow_s=0.25):
    """The key of the fastest of ``calls`` on ``x`` (median of ``rounds`` round-robin runs).

    About ``rounds * len(calls) * target_s`` seconds (0.3 s for three ways), small
    next to compiling them; shorter runs are noisy on a shared CPU. When one call
    already takes longer than ``slow_s`` (a real network at a large batch), one
    timed call each decides: noise is small next to such a call, and five rounds
    of it would cost more than the compilation itself.
    """
    if len(calls) == 1:
        return next(iter(calls))
    first = {}
    for name, call in calls.items():  # the warm-up, timed
        start = time.perf_counter()
        _to_numpy(call(x))
        first[name] = time.perf_counter() - start
    if max(first.values()) > slow_s:
        rounds = 1
    seconds = time_paths({name: (lambda call=call: _to_numpy(call(x))) for name, call in calls.items()},
                         repeats=rounds, target_s=target_s, warmup=0)
    return min(seconds, key=seconds.get)


def unpacked_ensemble(packed, policy=None):
    """The members of a packed model (``ek.pack``) run side by side as separate graphs.

    The members are rebuilt from the record ``pack`` keeps in the packed
    model's ``PackedOutput`` layer (their architectures and which grouped layer
    holds which member's weights, as ``ek.unpack`` reads it), each called on the
    shared input, and their outputs reduced by a copy of that same
    ``PackedOutput`` (the reduction ``ek.ensemble`` uses): the same function as
    ``ek.ensemble(ek.unpack(packed), ...)`` with the packed model's method,
    task, output kind, uncertainty, trim and threshold. ``compile_for_inference``
    times it against the packed lowerings, since XLA may run K separate
    graphs faster than one grouped graph (it did on CPU at batch 256).

    Args:
        packed: a model made by ``ek.pack`` with one input and one output.
        policy: ``None`` keeps the members' dtype policies; a policy name
            (``"mixed_bfloat16"``) replaces every float policy, as
            :func:`with_compute_dtype` does for the packed model.

    Returns:
        A ``keras.Model`` with the packed model's input and output structure.

    Raises:
        ValueError: ``packed`` was not made by ``ek.pack``, or has several
            inputs or outputs.

    Example:
        >>> import keras
        >>> import ensemblekit as ek
        >>> members = [keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)]) for _ in range(2)]
        >>> packed = ek.pack(members)
        >>> x = np.ones((2, 4), "float32")
        >>> bool(np.allclose(unpacked_ensemble(packed).predict(x, verbose=0),
        ...                  packed.predict(x, verbose=0), atol=1e-6))
        True
    """
    record = _unpack_record(packed)
    if record is None:
        raise ValueError(f"unpacked_ensemble: model {packed.name!r} is not a packed model (ek.pack) "
                         "with one input and one output.")
    source = packed.inputs[0]
    inputs = keras.Input(tuple(source.shape[1:]), dtype=source.dtype, name=source.name)
    members = rebuild_members(packed, record, transform=lambda config: _inference_config(config, policy))
    outputs = [member(inputs, training=False) for member in members]
    reducer_config = {**record.get_config(), "member_configs": [], "weighted_layers": [],
                      "name": f"{record.name}_members"}
    reducer = type(record).from_config(reducer_config)
    stacked = keras.ops.stack(outputs, axis=-2)  # the packed layout: (batch, ..., K, units)
    return keras.Model(inputs, reducer(stacked), name=f"{packed.name}_unpacked")


def _unpack_record(model):
    """The ``PackedOutput`` layer holding ``model``'s members (``ek.pack``), if it has one input and
    one output; else ``None``. Read by attribute (``ensemblekit._packed``): this floor does not
    import ``ensemblekit.pack``."""
    if len(output_layers(model)) != 1 or len(model.inputs) != 1:
        return None
    return unpack_record(model)


def pad_to_batches(x, batch_size):
    """``(x padded with zero rows to a multiple of batch_size, original row count)``.

    ``x`` is an array, or a dict/list of arrays with the same number of rows.
    """
    if isinstance(x, dict) or (isinstance(x, (list, tuple)) and x and all(hasattr(a, "shape") for a in x)):
        padded = keras.tree.map_structure(lambda a: pad_to_batches(a, batch_size)[0], x)
        rows = {len(np.asarray(a)) for a in keras.tree.flatten(x)}
        if len(rows) != 1:
            raise ValueError(f"the inputs have different numbers of rows: {sorted(rows)}.")
        return padded, rows.pop()
    x = np.asarray(x)
    padding = -len(x) % batch_size
    if padding:
        x = np.concatenate([x, np.zeros((padding, *x.shape[1:]), x.dtype)])
    return x, len(x) - padding


def _direct_call(function):
    """``function(tensor)`` without re-binding the signature (``_call_flat``, where TF has it)."""
    call_flat = getattr(function, "_call_flat", None)
    if call_flat is None:
        return function
    captured = function.captured_inputs
    return lambda tensor: call_flat([tensor], captured)


def _to_numpy(output):
    return output.numpy() if hasattr(output, "numpy") else np.asarray(output)


def with_compute_dtype(model, dtype):
    """A copy of ``model`` (nested models too) whose layers compute in ``dtype``.

    Every layer with a float dtype policy gets ``DTYPE_POLICIES[dtype]``
    (``"bfloat16"`` -> ``mixed_bfloat16``): variables stay float32 and keep
    ``model``'s values exactly; quantized layers (``ek.quantize``) keep their
    policy. ``model`` is not changed.

    Args:
        model: a built ``keras.Model`` whose layers are serializable.
        dtype: ``"float32"``, ``"bfloat16"`` or ``"float16"``.

    Returns:
        The new ``keras.Model`` (see :func:`copy_model`).

    Example:
        >>> import keras
        >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
        >>> half = with_compute_dtype(model, "bfloat16")
        >>> half.layers[0].compute_dtype, half.layers[0].kernel.dtype, model.layers[0].compute_dtype
        ('bfloat16', 'float32', 'float32')
    """
    if dtype not in DTYPE_POLICIES:
        raise ValueError(f"dtype must be None or one of {', '.join(map(repr, DTYPE_POLICIES))}; "
                         f"got {dtype!r}.")
    return copy_model(model, DTYPE_POLICIES[dtype])


def copy_model(model, policy=None):
    """An inference copy of ``model``: same architecture and weights, no training state.

    Rebuilt from its config with every ``compile_config`` dropped (nested
    members come back uncompiled, without optimizer state), then given
    ``model``'s weights through a temporary weights file (``load_own_variables``
    also refreshes derived state, e.g. ``Normalization``'s mean and variance).

    Args:
        model: a built ``keras.Model`` whose layers are serializable.
        policy: ``None`` keeps every layer's dtype policy; a policy name
            (``"mixed_bfloat16"``) replaces every float policy.

    Example:
        >>> import keras
        >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
        >>> model.compile("adam", "mse")
        >>> copy = copy_model(model)
        >>> copy.compiled, bool(np.array_equal(copy.get_weights()[0], model.get_weights()[0]))
        (False, True)
    """
    config = _inference_config(keras.saving.serialize_keras_object(model), policy)
    copy = keras.saving.deserialize_keras_object(config)
    with tempfile.TemporaryDirectory(prefix="ek_copy_") as folder, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # optimizer variables in the file that the copy has no use for
        path = os.path.join(folder, "model.weights.h5")
        model.save_weights(path)
        copy.load_weights(path)
    return copy


def _inference_config(config, policy=None):
    """``config`` (a serialized model) without ``compile_config``s, float policies set to ``policy``."""
    if isinstance(config, list):
        return [_inference_config(item, policy) for item in config]
    if not isinstance(config, dict):
        return config
    if policy is not None and config.get("class_name") == "DTypePolicy" and \
            config.get("config", {}).get("name") in _FLOAT_POLICIES:
        return {**config, "config": {**config["config"], "name": policy}}
    return {key: _inference_config(value, policy) for key, value in config.items()
            if key != "compile_config"}


def _float32(outputs):
    """Float outputs (any structure) cast to float32; others as they are."""
    def cast(tensor):
        dtype = keras.backend.standardize_dtype(tensor.dtype)
        return keras.ops.cast(tensor, "float32") if "float" in dtype and dtype != "float32" else tensor

    return keras.tree.map_structure(cast, outputs)
