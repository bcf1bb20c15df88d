"""``quantize``: a verified int8 / int4 / float8 copy of a composed model, on Keras' own quantizer.

``keras.Model.quantize(mode)`` rewrites, in place, every leaf layer that
implements ``quantize`` and leaves the others float. In Keras 3.15 those are
``Dense``, ``EinsumDense``, ``Embedding`` and ``ReversibleEmbedding`` (exact
types: subclasses are skipped), and ensemblekit's ``GroupedDense`` in int8 and int4 (below).
What each mode does there:

- ``"int8"``: kernels stored int8 with one float scale per output unit (abs-max),
  inputs quantized per row at run time (abs-max); the matmul runs int8 x int8
  (W8A8 dynamic). Kernel bytes /4. Refused by Keras for ``float16`` compute.
- ``"int4"``: kernels stored int4 (two per byte) in sub-channel blocks of 128
  input rows with a scale and a zero point (Keras' default ``int4/128``),
  dequantized to the compute dtype at run time (weight-only). Kernel bytes /8.
- ``"float8"``: Keras' fp8 *training* recipe (delayed scaling: input, kernel and
  gradient scales with amax histories that only training steps update). Without
  fine-tuning it rounds inputs and kernels to ``float8_e4m3fn`` with scale 1
  (values above 448 saturate); kernels stay float32 in the file, which grows by
  the scales and histories. Use it before fp8 fine-tuning, not to shrink a model.

Packed models (``ek.pack``): ``GroupedDense`` (the K members' Dense layers as
one layer) implements ``quantize`` for ``"int8"`` and ``"int4"`` with Keras'
``Dense`` schemes above (scales per member and unit, or per member, block and
unit; int8 inputs quantized per row and member), so ``packed.quantize(mode)``
and ``quantize(packed, mode, ...)`` give exactly (up to float rounding) the
outputs of ``ek.ensemble(ek.unpack(packed))`` quantized to that mode; the
``.keras`` file loads in ``safe_mode``, and ``ek.export`` keeps int8 and int4
packed models as a SavedModel and as ONNX. ``GroupedDense`` does not implement float8:
it stays float, and a packed model with nothing else to quantize is refused
with a pointer to its members.
The grouped convolutions (pointwise and separable ones too) and normalizations
stay float in every mode, as their members' convolutions and normalizations do
under Keras; ``GroupedTransformerEncoder`` stays float too, although Keras would
quantize its members' ``EinsumDense``/``Dense`` layers (not implemented).
``ek.unpack`` of a quantized packed model gives float members holding the
dequantized kernels (e.g. ``int8 / scale``), not the kernels it was made from.

Not quantized (left float, listed in the report): convolutions, normalizations,
ensemblekit's combiners and the grouped layers named above. Composed models from
``ek.ensemble`` quantize their members' Dense layers where they are nested.

The quantized model saves as ``.keras`` and loads with
``keras.saving.load_model(path, safe_mode=True)`` with identical outputs.
``ek.export`` (which verifies the reloaded artifact against the Keras model)
keeps int8, int4 and float8 models as a TF SavedModel, and int8 and int4 models
as ONNX (measured with TensorFlow 2.21, tf2onnx, onnxruntime on CPU); float8 has
no ONNX export (tf2onnx has no ``float8_e4m3fn`` type).
"""

from __future__ import annotations

import dataclasses
import warnings

import keras
import numpy as np

from ensemblekit._data import collect, refuse_sample_weight
from ensemblekit._graph import iter_layers
from ensemblekit._outputs import as_probs
from ensemblekit._validate import check_choice, check_labels
from ensemblekit.inference import copy_model
from ensemblekit.metrics import score_probs
from ensemblekit.pack.layers import PackedOutput

MODES = ("int8", "float8", "int4")
TASKS = (None, "auto", "multiclass")


@dataclasses.dataclass
class QuantizeReport:
    """What ``quantize`` did and what it cost, measured on the validation data.

    Attributes:
        mode: ``"int8"``, ``"int4"`` or ``"float8"``.
        before, after: accuracy, NLL, Brier score and ECE of the original and of
            the quantized model (``ensemblekit.metrics.score_probs``).
        agreement: fraction of validation rows whose argmax is the same in both.
        max_abs_diff: the largest absolute difference of their probabilities.
        quantized: paths (``"member_0/dense_1"``) of the layers Keras quantized.
        left_float: ``{path: layer type}`` of the weighted layers left float.
        weight_bytes_before, weight_bytes_after: bytes of all weights.

    Example:
        >>> report = QuantizeReport("int8", {"accuracy": 0.91}, {"accuracy": 0.905}, 0.99, 0.01,
        ...                         ["member_0/dense"], {}, 4000, 1100)
        >>> round(report.accuracy_drop, 3)
        0.005
    """

    mode: str
    before: dict
    after: dict
    agreement: float
    max_abs_diff: float
    quantized: list
    left_float: dict
    weight_bytes_before: int
    weight_bytes_after: int

    @property
    def accuracy_drop(self):
        """``before["accuracy"] - after["accuracy"]`` (negative when quantizing helped)."""
        return self.before["accuracy"] - self.after["accuracy"]

    def summary(self):
        """The report as a few printable lines."""
        rows = [f"{name:>9}: {self.before[name]:.4f} -> {self.after[name]:.4f}"
                for name in ("accuracy", "nll", "ece")]
        return "\n".join([
            f"quantize {self.mode}: {len(self.quantized)} layers quantized, "
            f"{len(self.left_float)} left float",
            *rows,
            f"agreement: {self.agreement:.4f}   max |dp|: {self.max_abs_diff:.4f}",
            f"weights: {self.weight_bytes_before} -> {self.weight_bytes_after} bytes",
        ])


def quantize(model, mode="int8", x=None, y=None, max_accuracy_drop=0.005, task=None,
             verbose=1, batch_size=None, steps=None):
    """Quantize a copy of a classifier with ``keras.Model.quantize`` and verify it on ``(x, y)``.

    ``model`` itself is never changed: a copy without training state
    (``ensemblekit.inference.copy_model``: no optimizers) is quantized. Both
    are scored before the copy is returned; see the module docstring for what
    each mode does and which layers Keras quantizes.

    Args:
        model: a built single-output classifier (``ek.ensemble``, ``ek.stack``,
            ``ek.pack``, a plain model, ...). Packed models quantize their
            ``GroupedDense`` layers in int8 and int4; in float8 they are refused
            unless something else in them quantizes.
        mode: ``"int8"``, ``"int4"`` or ``"float8"``.
        x: held-out data: anything ``model.predict`` accepts (arrays, a dict of arrays,
            a ``tf.data.Dataset`` of ``(x, y)``, a ``keras.utils.PyDataset``, a
            generator); both models run on each batch in one pass.
        y: integer (or one-hot) labels, or ``None`` when ``x`` yields them.
        max_accuracy_drop: the largest accepted ``accuracy before - accuracy after``.
        task: ``None``/``"auto"`` or ``"multiclass"``; only classifiers are verified.
        verbose: 1 prints the report's summary.
        batch_size: rows per prediction batch for arrays (default 256).
        steps: batches to read from ``x`` (required when it is endless).

    Returns:
        ``(quantized_model, QuantizeReport)``.

    Raises:
        TypeError: ``model`` is not a ``keras.Model``.
        ValueError: a bad argument, nothing quantizable, a layer Keras refuses
            (e.g. int8 with float16 compute), or an accuracy drop above
            ``max_accuracy_drop`` (the message gives the numbers).

    Example:
        >>> import keras, numpy as np
        >>> import ensemblekit as ek
        >>> rng = np.random.default_rng(0)
        >>> x = rng.normal(size=(64, 8)).astype("float32"); y = (x[:, 0] > 0).astype(int)
        >>> members = [keras.Sequential([keras.Input((8,)), keras.layers.Dense(2)]) for _ in range(2)]
        >>> q, report = ek.quantize(ek.ensemble(members), "int8", x, y, max_accuracy_drop=1.0, verbose=0)
        >>> len(report.quantized), report.agreement > 0.9
        (2, True)
    """
    _check_arguments(model, mode, x, max_accuracy_drop, task)
    quantized = _quantized_copy(model, mode)
    paths, left_float = _quantization_state(quantized)
    if not paths:
        packed = any(isinstance(layer, PackedOutput) for _, layer in iter_layers(model))
        raise ValueError(
            f"quantize: model {model.name!r} has no layer that quantizes to {mode} (Keras "
            f"quantizes Dense, EinsumDense and Embedding; ek.pack's GroupedDense int8 and int4); its "
            f"weighted layers are {_describe(left_float)}."
            + (f" For {mode}, quantize the packed model's members: "
               "ek.quantize(ek.ensemble(ek.unpack(packed)), ...)." if packed else "")
        )
    data = collect([model, quantized], x, y, batch_size=batch_size, steps=steps, function="quantize",
                   needs_labels=True)
    refuse_sample_weight(data, "quantize")
    labels = check_labels(data.y, data.rows, model.outputs[0].shape[-1], param="y")
    probs_before, probs_after = (as_probs(outputs, model) for outputs in data.outputs)
    report = QuantizeReport(
        mode=mode, before=score_probs(probs_before, labels), after=score_probs(probs_after, labels),
        agreement=float(np.mean(probs_before.argmax(-1) == probs_after.argmax(-1))),
        max_abs_diff=float(np.max(np.abs(probs_before - probs_after))),
        quantized=paths, left_float=left_float,
        weight_bytes_before=_weight_bytes(model), weight_bytes_after=_weight_bytes(quantized),
    )
    if verbose:
        print(report.summary())
    if report.accuracy_drop > max_accuracy_drop:
        raise ValueError(
            f"quantize: {mode} drops model {model.name!r}'s accuracy from "
            f"{report.before['accuracy']:.4f} to {report.after['accuracy']:.4f} "
            f"({report.accuracy_drop:.4f} > max_accuracy_drop={max_accuracy_drop}) on "
            f"{len(probs_before)} rows; NLL {report.before['nll']:.4f} -> {report.after['nll']:.4f}, "
            f"agreement {report.agreement:.4f}."
        )
    return quantized, report


def _check_arguments(model, mode, x, max_accuracy_drop, task):
    if not isinstance(model, keras.Model):
        raise TypeError(f"quantize expects a keras.Model, got {type(model).__name__}.")
    if not model.built or not getattr(model, "inputs", None):
        raise ValueError(f"quantize: model {model.name!r} is not built; give it a keras.Input first.")
    check_choice(mode, MODES, "mode")
    if task not in TASKS:
        raise ValueError(f"quantize: task={task!r} is not supported; quantize verifies multiclass "
                         "classifiers (task=None or 'multiclass').")
    if x is None:
        raise ValueError("quantize needs x (and y, unless x yields labels) to verify the quantized model.")
    if not isinstance(max_accuracy_drop, (int, float)) or max_accuracy_drop < 0:
        raise ValueError(f"max_accuracy_drop must be a number >= 0, got {max_accuracy_drop!r}.")


def _quantized_copy(model, mode):
    """An inference copy of ``model`` (no optimizer state) quantized in place by Keras."""
    copy = copy_model(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # one "does not have a `quantize` method" per other layer
        try:
            copy.quantize(mode)
        except ValueError as error:  # e.g. int8 with float16 compute, an already quantized layer
            message = str(error).strip().splitlines()[0]
            raise ValueError(f"quantize: model {model.name!r} cannot be quantized to {mode}: "
                             f"{message}") from None
    return copy


def _quantization_state(model):
    """``(quantized layer paths, {path: type} of weighted layers left float)``."""
    quantized, left_float = [], {}
    for path, layer in iter_layers(model):
        if getattr(layer.dtype_policy, "quantization_mode", None) is not None:
            quantized.append(path)
        elif layer.weights:
            left_float[path] = type(layer).__name__
    return quantized, left_float


def _describe(left_float, limit=4):
    items = [f"{path!r} ({kind})" for path, kind in left_float.items()]
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more if items else "none"


def _weight_bytes(model):
    """Bytes of all of ``model``'s weights (int4 kernels are stored two per int8 byte)."""
    return int(sum(int(np.prod(v.shape, dtype=np.int64)) * _itemsize(v.dtype) for v in model.weights))


def _itemsize(dtype):
    name = keras.backend.standardize_dtype(dtype)
    try:
        return np.dtype(name).itemsize
    except TypeError:  # float8 names numpy does not know
        return 1 if "8" in name else 2
