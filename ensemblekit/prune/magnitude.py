"""Unstructured magnitude pruning for Keras 3: masks, schedules, a fit callback, strip, N:M.

No wrapper layers are inserted. ``magnitude`` returns a copy of the model whose
pruned weights are zero and attaches a :class:`PruningState` to it as the
attribute ``model.pruning_state_``: one mask per pruned kernel, keyed by the
weight path of ``ensemblekit._graph.weight_refs`` (``"dense_1/kernel"``), plus
the schedule. :class:`PruningCallback` reads that state during ``model.fit``,
re-computes the masks when the schedule says so and multiplies every pruned
kernel by its mask after each training batch, so pruned weights stay exactly
zero. The state is plain Python, never saved: a model saved mid-pruning stores
its zeros, and :func:`strip` gives the plain Keras model to ship.

Magnitude pruning follows Han et al., 2015 ("Learning both Weights and
Connections for Efficient Neural Networks"); the gradual schedule follows Zhu &
Gupta, 2017 ("To prune, or not to prune"), with the same parameters as
TensorFlow Model Optimization's ``PolynomialDecay``/``ConstantSparsity``. N:M
sparsity (Mishra et al., 2021, "Accelerating Sparse Deep Neural Networks")
keeps the N largest of every M consecutive weights along the input
(reduction) axis.
"""

from __future__ import annotations

import dataclasses
import numbers

import keras
import numpy as np

from ensemblekit._graph import iter_layers, weight_refs
from ensemblekit._io import check_no_savedmodel
from ensemblekit._validate import check_choice

SCOPES = ("global", "layer")
#: Weight names pruned by default: kernels of Dense/EinsumDense and convolutions.
KERNEL_NAMES = ("kernel", "depthwise_kernel", "pointwise_kernel")


def _default_layer_types():
    layers = keras.layers
    return (layers.Dense, layers.EinsumDense, layers.Conv1D, layers.Conv2D, layers.Conv3D,
            layers.Conv1DTranspose, layers.Conv2DTranspose, layers.Conv3DTranspose,
            layers.DepthwiseConv1D, layers.DepthwiseConv2D, layers.SeparableConv1D,
            layers.SeparableConv2D)


def check_sparsity(sparsity, param="sparsity"):
    """Raise ``ValueError`` unless ``0 <= sparsity < 1``."""
    if isinstance(sparsity, bool) or not isinstance(sparsity, numbers.Real):
        raise TypeError(f"{param} must be a number in [0, 1), got {type(sparsity).__name__}.")
    if not 0.0 <= float(sparsity) < 1.0:
        raise ValueError(f"{param} must be in [0, 1), got {sparsity!r}.")
    return float(sparsity)


def _check_step(value, param, allow_minus_one=False):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{param} must be an integer, got {type(value).__name__}.")
    if value < 0 and not (allow_minus_one and value == -1):
        raise ValueError(f"{param} must be >= 0{' or -1' if allow_minus_one else ''}, got {value}.")
    return int(value)


class PruningSchedule:
    """Base of the sparsity schedules: ``schedule(step) -> (prune_now, sparsity)``."""

    def __init__(self, begin_step=0, end_step=-1, frequency=100):
        self.begin_step = _check_step(begin_step, "begin_step")
        self.end_step = _check_step(end_step, "end_step", allow_minus_one=True)
        self.frequency = _check_step(frequency, "frequency")
        if self.frequency < 1:
            raise ValueError(f"frequency must be >= 1, got {frequency}.")
        if self.end_step != -1 and self.end_step < self.begin_step:
            raise ValueError(f"end_step ({end_step}) must be >= begin_step ({begin_step}) or -1.")

    def prune_now(self, step):
        """True at ``begin_step``, every ``frequency`` steps after it, up to ``end_step``."""
        in_range = step >= self.begin_step and (self.end_step == -1 or step <= self.end_step)
        return in_range and (step - self.begin_step) % self.frequency == 0

    def sparsity(self, step):
        raise NotImplementedError

    def __call__(self, step):
        return self.prune_now(step), self.sparsity(step)

    def get_config(self):
        return {"begin_step": self.begin_step, "end_step": self.end_step, "frequency": self.frequency}

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{type(self).__name__}({args})"


class ConstantSparsity(PruningSchedule):
    """Prune to one ``target_sparsity`` at ``begin_step`` and re-prune every ``frequency`` steps.

    Args:
        target_sparsity: fraction of weights set to zero, in ``[0, 1)``.
        begin_step: first training step (batch) that prunes.
        end_step: last step that re-computes masks (``-1``: until the end); the
            masks are still held after it.
        frequency: re-compute masks every ``frequency`` steps.

    Example:
        >>> ConstantSparsity(0.5, begin_step=10)(10)
        (True, 0.5)
    """

    def __init__(self, target_sparsity, begin_step=0, end_step=-1, frequency=100):
        super().__init__(begin_step, end_step, frequency)
        self.target_sparsity = check_sparsity(target_sparsity, "target_sparsity")

    def sparsity(self, step):
        return self.target_sparsity if step >= self.begin_step else 0.0

    def get_config(self):
        return {"target_sparsity": self.target_sparsity, **super().get_config()}


class PolynomialDecay(PruningSchedule):
    """Gradual pruning (Zhu & Gupta, 2017): sparsity rises polynomially from ``initial`` to ``final``.

    ``s(t) = s_f + (s_i - s_f) * (1 - (t - t_0) / (t_1 - t_0)) ** power`` for
    ``t_0 <= t <= t_1``, ``s_f`` after; masks are re-computed every
    ``frequency`` steps in ``[begin_step, end_step]``.

    Args:
        initial_sparsity: sparsity at ``begin_step``, in ``[0, 1)``.
        final_sparsity: sparsity from ``end_step`` on, in ``[0, 1)``.
        begin_step: first pruning step (training batch, counted by the callback).
        end_step: step at which ``final_sparsity`` is reached (must be > begin_step).
        power: exponent of the decay (3 in the paper).
        frequency: re-compute masks every ``frequency`` steps.

    Example:
        >>> schedule = PolynomialDecay(0.0, 0.8, begin_step=0, end_step=100, frequency=10)
        >>> schedule(0), schedule(100)
        ((True, 0.0), (True, 0.8))
    """

    def __init__(self, initial_sparsity, final_sparsity, begin_step, end_step, power=3,
                 frequency=100):
        super().__init__(begin_step, end_step, frequency)
        if self.end_step == -1 or self.end_step <= self.begin_step:
            raise ValueError(
                f"PolynomialDecay needs end_step > begin_step, got begin_step={begin_step}, "
                f"end_step={end_step}."
            )
        self.initial_sparsity = check_sparsity(initial_sparsity, "initial_sparsity")
        self.final_sparsity = check_sparsity(final_sparsity, "final_sparsity")
        self.power = float(power)

    def prune_now(self, step):
        # Also prune exactly at end_step so final_sparsity is reached whatever the frequency.
        return super().prune_now(step) or step == self.end_step

    def sparsity(self, step):
        if step < self.begin_step:
            return 0.0
        progress = min(1.0, (step - self.begin_step) / (self.end_step - self.begin_step))
        final, initial = self.final_sparsity, self.initial_sparsity
        return final + (initial - final) * (1.0 - progress) ** self.power

    def get_config(self):
        return {"initial_sparsity": self.initial_sparsity, "final_sparsity": self.final_sparsity,
                "power": self.power, **super().get_config()}


@dataclasses.dataclass
class PruningState:
    """The masks and schedule of a model prepared by :func:`magnitude` (``model.pruning_state_``).

    Attributes:
        masks: ``{weight path: float32 0/1 array}`` for every pruned kernel.
        sparsity: the fixed target when no schedule is given.
        scope: ``"global"`` (one threshold over all pruned kernels) or ``"layer"``.
        schedule: a :class:`PruningSchedule` or ``None``.
        n_m: ``(N, M)`` or ``None``.
        step: training batches seen by :class:`PruningCallback` so far.
    """

    masks: dict
    sparsity: float
    scope: str
    schedule: PruningSchedule | None = None
    n_m: tuple | None = None
    step: int = 0
    _tensors: dict = dataclasses.field(default_factory=dict, repr=False)

    def targets(self, model):
        """The ``WeightRef`` of every masked weight of ``model``."""
        refs = {ref.path: ref for ref in weight_refs(model)}
        missing = [path for path in self.masks if path not in refs]
        if missing:
            raise ValueError(
                f"Model {model.name!r} has no weights {missing[:3]} that its pruning state masks; "
                "was it rebuilt after ek.prune.magnitude? Call magnitude on it again."
            )
        return [refs[path] for path in self.masks]

    def recompute(self, model, sparsity):
        """Re-compute all masks from the current weights at ``sparsity``."""
        refs = self.targets(model)
        arrays = [ref.numpy() for ref in refs]
        if self.n_m is not None:
            masks = [nm_mask(a, self.n_m, ref.layer_path) for a, ref in zip(arrays, refs, strict=False)]
        else:
            masks = magnitude_masks(arrays, sparsity, self.scope)
        self.masks = {ref.path: mask for ref, mask in zip(refs, masks, strict=False)}
        self._tensors = {}

    def apply(self, model):
        """Multiply every masked weight by its mask (pruned weights become exactly 0)."""
        for ref in self.targets(model):
            mask = self._tensors.get(ref.path)
            if mask is None:
                mask = keras.ops.convert_to_tensor(self.masks[ref.path], dtype=ref.dtype)
                self._tensors[ref.path] = mask
            ref.variable.assign(keras.ops.multiply(ref.variable, mask))


def magnitude_masks(arrays, sparsity, scope="global"):
    """0/1 masks that zero the ``sparsity`` fraction of smallest-magnitude weights.

    Args:
        arrays: list of weight arrays.
        sparsity: fraction to zero, in ``[0, 1)``.
        scope: ``"global"``: one ranking over all arrays together; ``"layer"``:
            each array is pruned to ``sparsity`` on its own.

    Returns:
        list of float32 arrays shaped like ``arrays`` (exactly
        ``floor(sparsity * size)`` zeros per ranking; ties broken by position).

    Example:
        >>> magnitude_masks([np.array([3.0, -1.0, 0.5, 2.0])], 0.5)[0].tolist()
        [1.0, 0.0, 0.0, 1.0]
    """
    def ranked_mask(values):
        mask = np.ones(values.size, dtype="float32")
        count = int(np.floor(sparsity * values.size))
        mask[np.argsort(values, kind="stable")[:count]] = 0.0
        return mask

    arrays = [np.asarray(a) for a in arrays]
    if scope == "layer":
        return [ranked_mask(np.abs(a).ravel()).reshape(a.shape) for a in arrays]
    flat = ranked_mask(np.concatenate([np.abs(a).ravel() for a in arrays])) if arrays else []
    masks, start = [], 0
    for a in arrays:
        masks.append(flat[start:start + a.size].reshape(a.shape))
        start += a.size
    return masks


def nm_mask(array, n_m, label="weight"):
    """N:M mask: keep the ``N`` largest of every ``M`` consecutive weights along the input axis.

    The kernel is viewed as ``(-1, outputs)``: for Dense that is ``(inputs,
    units)``; for convolutions the reduction axis is kernel positions x input
    channels (as in im2col), with input channels innermost. ``M`` must divide it.

    Example:
        >>> nm_mask(np.array([[1.0], [-4.0], [3.0], [0.5]]), (2, 4)).ravel().tolist()
        [0.0, 1.0, 1.0, 0.0]
    """
    n, m = n_m
    array = np.asarray(array)
    if array.ndim < 2:
        raise ValueError(f"N:M needs a kernel with an input and an output axis; {label!r} has shape {array.shape}.")
    reduction = int(np.prod(array.shape[:-1]))
    if reduction % m:
        raise ValueError(
            f"N:M {n}:{m}: M={m} does not divide the input axis ({reduction}) of layer {label!r} "
            f"with kernel shape {array.shape}; exclude it with layers=[...] or pick another M."
        )
    grouped = np.abs(array).reshape(reduction // m, m, -1)
    order = np.argsort(-grouped, axis=1, kind="stable")
    mask = np.zeros_like(grouped, dtype="float32")
    np.put_along_axis(mask, order[:, :n, :], 1.0, axis=1)
    return mask.reshape(array.shape)


def _check_n_m(n_m):
    if n_m is None:
        return None
    if (not isinstance(n_m, (tuple, list)) or len(n_m) != 2
            or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in n_m)):
        raise TypeError(f"n_m must be a pair of integers (N, M) such as (2, 4), got {n_m!r}.")
    n, m = int(n_m[0]), int(n_m[1])
    if not 0 < n < m:
        raise ValueError(f"n_m=({n}, {m}) needs 0 < N < M.")
    return n, m


def select_kernels(model, layers=None):
    """The ``WeightRef`` of every kernel that pruning targets in ``model``.

    Args:
        model: a Keras model.
        layers: ``None`` (Dense/EinsumDense/convolution kernels), or a list of
            layer names, layer paths (``"member_0/dense"``) and/or layer classes.

    Returns:
        list of ``WeightRef`` (kernels only: never biases or normalisation weights).
    """
    if layers is None:
        wanted = _default_layer_types()
        names = set()
    else:
        if isinstance(layers, (str, type)):
            layers = [layers]
        wanted = tuple(item for item in layers if isinstance(item, type))
        names = {item for item in layers if isinstance(item, str)}
        odd = [item for item in layers if not isinstance(item, (str, type))]
        if odd:
            raise TypeError(f"layers must hold layer names or layer classes, got {odd[0]!r}.")
        known = {name for path, layer in iter_layers(model) for name in (path, layer.name)}
        unknown = sorted(names - known)
        if unknown:
            raise ValueError(
                f"Model {model.name!r} has no layer {unknown[0]!r}; its layers are "
                f"{sorted(path for path, _ in iter_layers(model))}."
            )
    refs = [
        ref for ref in weight_refs(model)
        if ref.name in KERNEL_NAMES and ref.is_float
        and (isinstance(ref.layer, wanted) or ref.layer.name in names or ref.layer_path in names)
    ]
    if not refs:
        raise ValueError(f"Model {model.name!r} has no Dense/convolution kernels to prune (layers={layers!r}).")
    return refs


def copy_model(model):
    """A new model with the same architecture and weights (nested models copied too)."""
    if not isinstance(model, keras.Model):
        raise TypeError(f"Expected a keras.Model, got {type(model).__name__}.")
    try:
        copy = keras.models.clone_model(model)
    except Exception as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(
            f"Model {model.name!r} ({type(model).__name__}) cannot be copied for pruning: {reason}. "
            "Use a functional or Sequential model (or a subclass with get_config/from_config)."
        ) from None
    if not copy.built and model.built and getattr(model, "inputs", None):
        copy.build(tuple(model.inputs[0].shape))
    for source, target in zip(weight_refs(model), weight_refs(copy), strict=False):
        target.assign(source.numpy())  # a copy: JAX training donates (deletes) variable buffers
    return copy


def magnitude(model, sparsity=0.8, scope="global", schedule=None, n_m=None, layers=None):
    """Prepare ``model`` for magnitude pruning; return a pruned copy holding the masks.

    Without ``schedule``, the smallest-magnitude ``sparsity`` fraction of the
    targeted kernels is zeroed at once. With a schedule, masks start empty and
    :class:`PruningCallback` raises sparsity during ``fit``. Pass the returned
    model to ``fit`` with ``callbacks=[ek.prune.PruningCallback()]`` to
    fine-tune with the masks held, then :func:`strip` it.

    Args:
        model: a built Keras model (nested members inside a composed model are
            pruned too: their kernels are ordinary weights of the walk). A model
            holding a TensorFlow SavedModel (``keras.layers.TFSMLayer``) is refused
            with a ``ValueError``: it has no Keras layers to prune.
        sparsity: fraction of targeted weights to zero, in ``[0, 1)``
            (ignored with ``schedule`` or ``n_m``).
        scope: ``"global"`` (one magnitude threshold over all targeted kernels,
            so small layers may end up denser or sparser) or ``"layer"``
            (each kernel pruned to ``sparsity``).
        schedule: :class:`PolynomialDecay` or :class:`ConstantSparsity`, or ``None``.
        n_m: ``(N, M)`` such as ``(2, 4)``: keep the N largest of every M
            consecutive weights along each kernel's input axis (see :func:`nm_mask`).
        layers: which layers to prune: ``None`` for all Dense/convolution
            kernels, or a list of layer names/paths and/or classes. Biases and
            normalisation weights are never pruned.

    Returns:
        A copy of ``model`` with pruned weights set to zero and its masks in
        ``model.pruning_state_`` (a :class:`PruningState`).

    Example:
        >>> import keras, numpy as np
        >>> m = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4), keras.layers.Dense(2)])
        >>> pruned = magnitude(m, sparsity=0.5, scope="layer")
        >>> float(np.mean(pruned.layers[0].get_weights()[0] == 0))
        0.5
    """
    check_choice(scope, SCOPES, "scope")
    n_m = _check_n_m(n_m)
    if schedule is not None and not isinstance(schedule, PruningSchedule):
        raise TypeError(
            f"schedule must be ek.prune.PolynomialDecay or ek.prune.ConstantSparsity, got "
            f"{type(schedule).__name__}."
        )
    if n_m is not None and schedule is not None:
        raise ValueError("n_m fixes the sparsity pattern; it cannot be combined with a schedule.")
    sparsity = check_sparsity(sparsity) if n_m is None else 1.0 - n_m[0] / n_m[1]
    if isinstance(model, keras.Model):
        check_no_savedmodel(model, "magnitude()")
    copy = copy_model(model)
    refs = select_kernels(copy, layers)
    state = PruningState(masks={ref.path: np.ones(ref.shape, "float32") for ref in refs},
                         sparsity=sparsity, scope=scope, schedule=schedule, n_m=n_m)
    if schedule is None:
        state.recompute(copy, sparsity)
        state.apply(copy)
    copy.pruning_state_ = state
    return copy


def pruning_state(model):
    """The :class:`PruningState` of a model returned by :func:`magnitude`, with a clear error."""
    state = getattr(model, "pruning_state_", None)
    if not isinstance(state, PruningState):
        raise ValueError(
            f"Model {getattr(model, 'name', model)!r} holds no pruning masks; prepare it with "
            "ek.prune.magnitude(model, ...) and fit the model that returns."
        )
    return state


class PruningCallback(keras.callbacks.Callback):
    """Hold (and, with a schedule, update) the pruning masks during ``model.fit``.

    After every training batch it re-computes the masks when the schedule says
    so, then multiplies each pruned kernel by its mask, so pruned weights are
    exactly zero whenever a batch ends (and at the end of training). The step
    counter lives in ``model.pruning_state_.step`` and continues across ``fit``
    calls.

    Example:
        >>> import keras, numpy as np
        >>> m = magnitude(keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)]), 0.5)
        >>> m.compile("adam", "mse")
        >>> _ = m.fit(np.ones((8, 4)), np.ones((8, 2)), verbose=0, callbacks=[PruningCallback()])
        >>> int(np.sum(m.layers[0].get_weights()[0] == 0))
        4
    """

    def on_train_begin(self, logs=None):
        pruning_state(self.model).apply(self.model)

    def on_train_batch_end(self, batch, logs=None):
        state = pruning_state(self.model)
        if state.schedule is not None:
            prune_now, sparsity = state.schedule(state.step)
            if prune_now:
                state.recompute(self.model, sparsity)
        state.apply(self.model)
        state.step += 1

    def on_train_end(self, logs=None):
        pruning_state(self.model).apply(self.model)


def strip(model):
    """Return a plain Keras model (no pruning state, no custom layers) with the zeros in place.

    The masks are applied once more, so the result holds exactly the pruned
    weights; it saves to and loads from ``.keras`` like the original model.

    Example:
        >>> import keras
        >>> m = magnitude(keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)]), 0.5)
        >>> hasattr(strip(m), "pruning_state_")
        False
    """
    state = getattr(model, "pruning_state_", None)
    if isinstance(state, PruningState):
        state.apply(model)
    return copy_model(model)


def sparsity_of(model, layers=None):
    """Fraction of zeros among the kernels that pruning targets (``layers`` as in :func:`magnitude`)."""
    refs = select_kernels(model, layers)
    zeros = sum(int(np.sum(ref.numpy() == 0)) for ref in refs)
    return zeros / sum(int(np.prod(ref.shape)) for ref in refs)


__all__ = ["ConstantSparsity", "PolynomialDecay", "PruningCallback", "PruningState",
           "magnitude", "magnitude_masks", "nm_mask", "pruning_state", "sparsity_of", "strip"]
