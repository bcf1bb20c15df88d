"""``compile_for_inference``: run any model as one compiled call per input shape.

On TensorFlow the model is traced once per input shape and dtype into a
concrete function that later calls run directly (with ``jit_compile=True``: one
XLA cluster); on JAX it is ``jax.jit`` of ``model.stateless_call``.

Packed models (``ek.pack``) hold grouped Dense layers that can run their K
members as one einsum over a stacked kernel (``"grouped"``) or as K matmuls
(``"loop"``). :class:`LoweringPolicy` is the one place that decides which: what
``pack`` assigns to each layer, what an ``"auto"`` layer does when traced, and
when ``compile_for_inference`` measures both and keeps the faster.
"""

from __future__ import annotations

import contextlib
import dataclasses

import keras
import numpy as np

from ensemblekit._io import pad_to_batches
from ensemblekit._timing import time_paths

LOWERINGS = ("auto", "grouped", "loop")


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
    - ``compile_for_inference(autotune=True)`` compiles both lowerings for each
      new input shape, times them on that input and keeps the faster (the winner
      changed between runs on the same machine, so no fixed rule is right);
      with ``autotune=False`` an XLA trace uses the einsum, which XLA fuses.

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
    ``lowerings_`` maps each input shape that was autotuned to the grouped-dense
    lowering that measured faster for it (``"grouped"`` or ``"loop"``).

    Example:
        >>> import keras
        >>> f = compile_for_inference(keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)]))
        >>> f.predict(np.zeros((5, 2), "float32"), batch_size=4).shape
        (5, 1)
    """

    def __init__(self, model, fn, jit_compile, to_numpy=keras.ops.convert_to_numpy, lowerings=None):
        self.model = model
        self.fn = fn
        self.jit_compile = jit_compile
        self._to_numpy = to_numpy
        self.lowerings_ = {} if lowerings is None else lowerings

    def __call__(self, x):
        return self._to_numpy(self.fn(x))

    def predict(self, x, batch_size=256):
        """Run on ``x`` in batches of ``batch_size``; return numpy.

        The last batch is padded to ``batch_size`` rows (their outputs dropped),
        so one compiled shape serves any length of ``x``.
        """
        x, rows = pad_to_batches(x, batch_size)
        return np.concatenate([self(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])[:rows]


def compile_for_inference(model, jit_compile=True, autotune=True):
    """Return a callable that runs ``model`` (e.g. ``ek.ensemble``, ``ek.pack``) as one compiled call.

    Args:
        model: any built ``keras.Model`` with one input.
        jit_compile: compile with XLA (TensorFlow); JAX always compiles.
        autotune: for models with ``"auto"`` grouped layers (``ek.pack``), time
            both lowerings on the first input of each shape and keep the faster
            (see :class:`LoweringPolicy`); the choice is kept in ``f.lowerings_``.

    Returns:
        An ``InferenceFunction``: ``f(x)`` returns the output as numpy, ``f.fn(x)``
        the backend tensor, ``f.predict(x, batch_size)`` runs in batches.

    Example:
        >>> import keras
        >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
        >>> f = compile_for_inference(model)
        >>> x = np.ones((2, 4), "float32")
        >>> bool(np.allclose(f(x), model.predict(x, verbose=0), atol=1e-6))
        True
    """
    if not isinstance(model, keras.Model):
        raise TypeError(f"compile_for_inference expects a keras.Model, got {type(model).__name__}.")
    if not model.built or not getattr(model, "inputs", None):
        raise ValueError(f"Model {model.name!r} is not built; give it a keras.Input or call it once first.")
    backend = keras.backend.backend()
    lowerings = {}
    tune = autotune and bool(autotunable_layers(model))
    if backend == "tensorflow":
        import tensorflow as tf

        fn = _shape_dispatch(_tf_compiler(model, jit_compile), tf.convert_to_tensor,
                             lowerings if tune else None)
        return InferenceFunction(model, fn, jit_compile, to_numpy=_to_numpy, lowerings=lowerings)
    if backend == "jax":
        import jax.numpy as jnp

        fn = _shape_dispatch(_jax_compiler(model), jnp.asarray, lowerings if tune else None)
        return InferenceFunction(model, fn, jit_compile, to_numpy=_to_numpy, lowerings=lowerings)

    def fn(x):
        return model(x, training=False)

    return InferenceFunction(model, fn, jit_compile)


def _shape_dispatch(compile_for_shape, convert, lowerings=None):
    """``fn(x)``: one compiled call per input shape and dtype, made on first use.

    A ``tf.function`` matches its signature (and, for numpy input, checks for
    retracing) on every call; at small batches that Python overhead is most of
    the time per call. Here each input shape and dtype is compiled once by
    ``compile_for_shape(lowering, x)`` and later calls go straight to it. When
    ``lowerings`` is a dict, both grouped lowerings are compiled, timed on the
    first input, and the faster kept (recorded in ``lowerings``).
    """
    candidates = (None,) if lowerings is None else ("grouped", "loop")
    compiled = {}

    def fn(x):
        x = convert(x)
        key = (tuple(x.shape), str(x.dtype))
        call = compiled.get(key)
        if call is None:
            calls = {lowering: compile_for_shape(lowering, x) for lowering in candidates}
            choice = None if lowerings is None else _fastest(calls, x)
            if lowerings is not None:
                lowerings[key[0]] = choice
            call = compiled[key] = calls[choice]
        return call(x)

    return fn


def _tf_compiler(model, jit_compile):
    """``compile_for_shape`` on TF: a concrete function per shape, called without re-binding."""
    import tensorflow as tf

    def compile_for_shape(lowering, x):
        traced = tf.function(lambda t: model(t, training=False), jit_compile=bool(jit_compile))
        if lowering is None and jit_compile:
            lowering = "grouped"  # XLA fuses the one einsum
        with forced_lowering(model, lowering):
            return _direct_call(traced.get_concrete_function(tf.TensorSpec(x.shape, x.dtype)))

    return compile_for_shape


def _jax_compiler(model):
    """``compile_for_shape`` on JAX: ``jax.jit`` of ``stateless_call``, traced now for ``x``'s shape."""
    import jax

    def compile_for_shape(lowering, x):
        step = jax.jit(lambda tv, ntv, t: model.stateless_call(tv, ntv, t, training=False)[0])

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


def _fastest(calls, x, rounds=5):
    """The key of the fastest of ``calls`` on ``x`` (median of ``rounds`` round-robin runs)."""
    seconds = time_paths({name: (lambda call=call: _to_numpy(call(x))) for name, call in calls.items()},
                         repeats=rounds, target_s=0.005, warmup=1)
    return min(seconds, key=seconds.get)


def _direct_call(function):
    """``function(tensor)`` without re-binding the signature (``_call_flat``, where TF has it)."""
    call_flat = getattr(function, "_call_flat", None)
    if call_flat is None:
        return function
    captured = function.captured_inputs
    return lambda tensor: call_flat([tensor], captured)


def _to_numpy(output):
    return output.numpy() if hasattr(output, "numpy") else np.asarray(output)
