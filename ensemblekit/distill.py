"""``distill``: an ensemble's knowledge in one student model (Hinton et al., 2015).

The student is trained on ``alpha`` x the supervised cross-entropy plus
``(1 - alpha)`` x the temperature-scaled KL divergence to the teacher,
``T² · KL(softmax(t/T) || softmax(s/T))``, where ``t`` are the teacher's
log-probabilities (the ensemble's, whatever its members output) and ``s`` the
student's logits. Per task: binary classifiers are seen as two-class logits
``[0, z]`` (so the softmax is the sigmoid and the soft targets are the teacher's
Bernoulli probabilities, tempered); regressors match the teacher's prediction
(the ensemble mean) with a mean squared error, plus ``alpha`` x the MSE to ``y``. The training loop is Keras' own ``keras.distillation.Distiller``
with a ``LogitsDistillation`` loss; ensemblekit adds what one teacher model does
not need:

- a teacher given as a list of members becomes their ensemble (packed into one
  wide model when the members share an architecture, so the teacher pass is cheap);
- teacher outputs are computed once and reused every epoch when that is valid
  (no augmentation): ``cache_teacher="auto"`` decides and says why;
- with ``augment``, each batch is augmented once and the SAME view goes to
  teacher and student;
- ``y=None`` trains on the distillation loss alone (unlabelled data);
- ``width=0.5`` narrows the student first with ``ek.prune.channels`` (prune, then
  distil to recover).
"""

from __future__ import annotations

import dataclasses
import math
import time

import keras
import numpy as np

from ensemblekit._data import batches, check_reiterable, data_kind, is_dataset, predict
from ensemblekit._graph import architecture_differences, model_output_shape
from ensemblekit._io import load_member, load_members
from ensemblekit._outputs import (
    check_task,
    detect_output_kind,
    detect_task,
    output_layers,
    to_log_probs,
)
from ensemblekit._tasks import canonical
from ensemblekit._validate import check_targets
from ensemblekit.compose import ensemble
from ensemblekit.pack import pack
from ensemblekit.prune import channels

DISTILL_TASKS = ("multiclass", "binary", "regression")
_TEACHER_KEY = "teacher_log_probs"
_INPUT_KEY = "inputs"


@dataclasses.dataclass
class DistillReport:
    """What ``distill`` did.

    Attributes:
        history: the Keras training history (``loss``, ``student_loss``,
            ``distillation_loss`` per epoch, ``val_*`` with validation data).
        teacher_cached: whether teacher outputs were computed once and reused.
        cache_reason: why (or why not) they were cached.
        teacher: how the teacher ran (``"model"``, ``"packed ensemble"`` or ``"ensemble"``).
        temperature, alpha: the loss settings used (``alpha`` is 0 when ``y`` is None).
        student_params, teacher_params: parameter counts.
        seconds: wall-clock seconds of training (teacher caching included).

    Example:
        >>> import keras, numpy as np
        >>> x, y = np.random.default_rng(0).normal(size=(32, 4)).astype("float32"), np.arange(32) % 3
        >>> member = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
        >>> _, report = distill(member, member, x, y, epochs=2, verbose=0)
        >>> sorted(report.history)[:2], report.teacher_cached
        (['distillation_loss', 'loss'], True)
    """

    history: dict
    teacher_cached: bool
    cache_reason: str
    teacher: str
    temperature: float
    alpha: float
    student_params: int
    teacher_params: int
    seconds: float


def distill(teacher, student, x, y=None, *, temperature=3.0, alpha=0.5, epochs=10, batch_size=64,
            augment=None, validation_data=None, cache_teacher="auto", callbacks=None, optimizer=None,
            init="weights", width=None, seed=0, safe_mode=True, verbose=1, task=None):
    """Train ``student`` to match ``teacher`` (an ensemble or any classifier); return it and a report.

    Args:
        teacher: a classifier ``keras.Model`` (e.g. ``ek.ensemble(...)``), or a list
            of members (models or paths), whose mean-of-probabilities ensemble
            is the teacher (packed with ``ek.pack`` when they share an architecture).
        student: a ``keras.Model`` or a path; it is copied, never modified.
        x: training inputs (labelled or not): arrays, or a ``tf.data.Dataset`` /
            ``keras.utils.PyDataset`` yielding ``x`` or ``(x, y)`` (read once per
            epoch through Keras' ``fit``; the teacher then runs on every batch and the
            inputs are never held in memory; augment in the pipeline).
        y: integer labels (0/1 for binary, values for regression), or ``None`` to
            train on the teacher alone (or when ``x`` yields them).
        temperature: softmax temperature ``T`` of the distillation loss (> 0).
        alpha: weight of the supervised loss, in ``[0, 1]``; the distillation
            loss gets ``1 - alpha`` (ignored, i.e. 0, when ``y`` is None).
        epochs, batch_size: training length.
        augment: a Keras layer (or ``keras.Sequential`` of layers) applied with
            ``training=True`` to each batch; teacher and student see the same view.
        validation_data: ``(x_val, y_val)`` or a dataset of ``(x, y)``, evaluated after each epoch.
        cache_teacher: ``"auto"`` caches teacher outputs unless ``augment`` is
            given; ``True`` requires caching (an error with ``augment``);
            ``False`` runs the teacher on every batch.
        callbacks: Keras callbacks for ``fit``.
        optimizer: a Keras optimizer (default ``Adam(1e-3)``).
        init: ``"weights"`` starts from the student's weights (e.g. a member or a
            soup), ``"fresh"`` re-initialises it (same architecture).
        width: optional fraction of channels to keep (``0 < width <= 1``),
            applied with ``ek.prune.channels(student, ratio=1 - width)`` first.
        seed: seeds initialisation, shuffling and augmentation.
        safe_mode: used when loading models from files.
        verbose: Keras' progress bar (0 = quiet).
        task: ``"multiclass"``, ``"binary"`` or ``"regression"`` (``None`` detects the
            teacher's; the student must not be detected as another task).

    Returns:
        ``(student, DistillReport)``: the trained student, a plain ``keras.Model``
        with the student's own outputs, and what was done.

    Example:
        >>> import keras, numpy as np
        >>> rng = np.random.default_rng(0)
        >>> x, y = rng.normal(size=(64, 4)).astype("float32"), rng.integers(0, 3, 64)
        >>> members = [keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)]) for _ in range(2)]
        >>> student, report = distill(members, members[0], x, y, epochs=1, verbose=0)
        >>> report.teacher_cached, report.teacher, student.output_shape
        (True, 'packed ensemble', (None, 3))
    """
    _check_settings(temperature, alpha, epochs, batch_size, cache_teacher, init, width)
    streamed = is_dataset(x) or is_dataset(validation_data)
    labelled = y is not None
    if is_dataset(x):
        labelled = _check_dataset(x, y, augment, cache_teacher)
    else:
        x = np.asarray(x)
        if len(x) == 0:
            raise ValueError("distill: x is empty; give at least one training sample.")
    if is_dataset(validation_data) and cache_teacher is True:
        raise ValueError("distill: cache_teacher=True needs validation_data as arrays (x_val, y_val); "
                         "with a validation dataset the teacher runs on its batches.")
    keras.utils.set_random_seed(seed)
    teacher_model, teacher_label = _teacher_model(teacher, safe_mode, task)
    student_model = _student_copy(load_member(student, 0, safe_mode=safe_mode), init, width)
    _check_outputs(teacher_model, student_model)
    task = _task(teacher_model, student_model, task)
    num_classes = model_output_shape(teacher_model)[-1]
    if y is not None:
        y = check_targets(y, len(x), (num_classes,), task)
    cached, reason = _cache_decision(cache_teacher, augment)
    if streamed:
        cached, reason = False, ("a dataset is given: the teacher runs on every batch (the inputs "
                                 "are never held in memory)")

    start = time.perf_counter()
    teacher_view = _view(teacher_model, task, "teacher_view")
    student_view = _view(student_model, task, "student_view")
    validation = _validation(validation_data, num_classes, task)
    if cached:
        data = {_INPUT_KEY: x, _TEACHER_KEY: _log_probs(teacher_view, x, batch_size)}
        if validation is not None:
            validation = ({_INPUT_KEY: validation[0],
                           _TEACHER_KEY: _log_probs(teacher_view, validation[0], batch_size)},
                          validation[1])
        teacher_view, student_view = _cached_views(teacher_view, student_view)
    elif is_dataset(x):
        data = x
    else:
        data = _Batches(x, y, batch_size, augment, seed)
    if task == "regression":
        distillation_loss = keras.distillation.FeatureDistillation(loss="mse")
        student_loss = keras.losses.MeanSquaredError()
    else:
        # The loss object, not the string: LogitsDistillation applies the softmax
        # and T² scaling only for a KLDivergence instance.
        distillation_loss = keras.distillation.LogitsDistillation(temperature=float(temperature),
                                                                  loss=keras.losses.KLDivergence())
        student_loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    distiller = keras.distillation.Distiller(
        teacher_view, student_view, [distillation_loss],
        student_loss_weight=float(alpha) if labelled else 0.0,
    )
    distiller.compile(optimizer or keras.optimizers.Adam(1e-3), loss=student_loss)
    fit_kwargs = dict(epochs=epochs, callbacks=callbacks, verbose=verbose, validation_data=validation)
    if cached:
        history = distiller.fit(data, y, batch_size=batch_size, shuffle=True, **fit_kwargs)
    else:
        history = distiller.fit(data, **fit_kwargs)
    seconds = time.perf_counter() - start
    report = DistillReport(
        history={k: [float(v) for v in values] for k, values in history.history.items()},
        teacher_cached=cached, cache_reason=reason, teacher=teacher_label,
        temperature=float(temperature), alpha=float(alpha) if labelled else 0.0,
        student_params=student_model.count_params(), teacher_params=teacher_model.count_params(),
        seconds=seconds,
    )
    return student_model, report


def _check_settings(temperature, alpha, epochs, batch_size, cache_teacher, init, width):
    def positive(value, name, integer=False):
        kind = int if integer else (int, float)
        if isinstance(value, bool) or not isinstance(value, kind) or not value > 0 or (
                not integer and not math.isfinite(value)):
            raise ValueError(f"distill: {name} must be a positive {'integer' if integer else 'number'}, "
                             f"got {value!r}.")

    positive(temperature, "temperature")
    positive(epochs, "epochs", integer=True)
    positive(batch_size, "batch_size", integer=True)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
        raise ValueError(f"distill: alpha must be a number in [0, 1], got {alpha!r}.")
    if cache_teacher != "auto" and not isinstance(cache_teacher, bool):
        raise ValueError(f"distill: cache_teacher must be 'auto', True or False, got {cache_teacher!r}.")
    if init not in ("weights", "fresh"):
        raise ValueError(f"distill: init must be 'weights' or 'fresh', got {init!r}.")
    if width is not None and (isinstance(width, bool) or not isinstance(width, (int, float))
                              or not 0.0 < width <= 1.0):
        raise ValueError(f"distill: width must be in (0, 1] or None, got {width!r}.")


def _teacher_model(teacher, safe_mode, task):
    """``(model, label)``: a model as given, or the members' mean ensemble (packed when possible)."""
    if isinstance(teacher, (list, tuple)):
        members = load_members(teacher, min_count=1, what="distill's teacher", safe_mode=safe_mode)
        if len(members) == 1:
            return members[0], "model"
        if not architecture_differences(members):
            try:
                return pack(members, reduce="mean", task=task, name="teacher_packed"), "packed ensemble"
            except ValueError:
                pass  # a layer pack does not support: the plain ensemble computes the same
        return ensemble(members, "mean", task=task, name="teacher_ensemble"), "ensemble"
    return load_member(teacher, 0, safe_mode=safe_mode), "model"


def _student_copy(student, init, width):
    """A copy of ``student`` (the caller's model is never trained), narrowed by ``width``."""
    copy = keras.models.clone_model(student)
    if init == "weights":
        copy.set_weights(student.get_weights())
    if width is not None and width < 1.0:
        copy = channels(copy, ratio=1.0 - float(width))
    return copy


def _task(teacher, student, task):
    """The teacher's task (given or detected); a student detected as another task is refused."""
    task = check_task(task)[0] or detect_task(teacher, label=f"distill: teacher {teacher.name!r}")
    if task not in DISTILL_TASKS:
        raise ValueError(f"distill supports tasks {DISTILL_TASKS}; teacher {teacher.name!r} is {task}.")
    if detect_output_kind(student) == "logits" and getattr(output_layers(student)[0], "task", None) is None:
        return task  # a linear output: the teacher's task says what it is
    student_task = detect_task(student)
    if student_task != task:
        raise ValueError(f"distill: teacher {teacher.name!r} is a {task} model but student "
                         f"{student.name!r} is {student_task}; both must have one task.")
    return task


def _check_outputs(teacher, student):
    teacher_shape, student_shape = model_output_shape(teacher), model_output_shape(student)
    if teacher_shape != student_shape or len(student_shape) != 1:
        raise ValueError(
            f"distill: teacher {teacher.name!r} outputs {(None, *teacher_shape)} but student "
            f"{student.name!r} outputs {(None, *student_shape)}; both must have the same "
            "(batch, units) output."
        )


def _cache_decision(cache_teacher, augment):
    if augment is not None:
        if cache_teacher is True:
            raise ValueError(
                "distill: cache_teacher=True with augment: cached teacher outputs belong to the "
                "un-augmented inputs, so the teacher must run on each augmented batch "
                "(use cache_teacher='auto' or False)."
            )
        return False, "augment is given: the teacher runs on every augmented batch (the same view)"
    if cache_teacher is False:
        return False, "cache_teacher=False: the teacher runs on every batch"
    return True, "no augmentation: teacher outputs computed once and reused every epoch"


def _view(model, task, name):
    """A model over ``model``'s layers whose output the distillation losses compare.

    Multiclass: log-probabilities (valid logits for a softmax); binary: two-class
    logits ``[0, z]`` (their softmax is ``[1 - σ(z), σ(z)]``); regression: the values.
    """
    inputs = keras.Input(model.input_shape[1:], dtype=model.inputs[0].dtype)
    out = model(inputs)
    if task == "binary":
        z = canonical(out, "binary", detect_output_kind(model))
        out = keras.ops.concatenate([keras.ops.zeros_like(z), z], axis=-1)
    elif task == "multiclass":
        out = to_log_probs(out, detect_output_kind(model))
    return keras.Model(inputs, out, name=name)


def _cached_views(teacher_view, student_view):
    """Dict-input models: the teacher returns the cached log-probs fed with each batch."""
    shape = teacher_view.input_shape[1:]
    classes = teacher_view.output_shape[1:]

    def inputs():
        return {_INPUT_KEY: keras.Input(shape, name=_INPUT_KEY),
                _TEACHER_KEY: keras.Input(classes, name=_TEACHER_KEY)}

    teacher_inputs, student_inputs = inputs(), inputs()
    cached_teacher = keras.Model(teacher_inputs, keras.layers.Identity()(teacher_inputs[_TEACHER_KEY]),
                                 name="cached_teacher")
    student = keras.Model(student_inputs, student_view(student_inputs[_INPUT_KEY]), name="student_view")
    return cached_teacher, student


def _log_probs(teacher_view, x, batch_size):
    """The teacher's log-probabilities on ``x``, computed once (fixed-shape batches)."""
    return np.asarray(predict(teacher_view, x, batch_size=max(batch_size, 256)), dtype="float32")


def _check_dataset(x, y, augment, cache_teacher):
    """Check a dataset given as ``x``; return whether it yields labels (its first batch tells)."""
    check_reiterable(x, "distill")
    if data_kind(x) not in ("tf.data.Dataset", "keras.utils.PyDataset"):
        raise ValueError(f"distill: x is a {type(x).__name__}; distill trains for several epochs "
                         "through Keras' fit, so pass arrays, a tf.data.Dataset or a keras.utils.PyDataset.")
    if y is not None:
        raise ValueError("distill: y= was given, but x is a dataset, which yields its own labels; "
                         "make it yield (x, y) pairs and leave y=None.")
    if augment is not None:
        raise ValueError("distill: augment= applies to arrays; with a dataset, augment in its pipeline "
                         "(each batch is seen by teacher and student alike).")
    if cache_teacher is True:
        raise ValueError("distill: cache_teacher=True needs x as arrays (the cached teacher outputs "
                         "are keyed by row); with a dataset the teacher runs on every batch.")
    _, first_y, _ = next(iter(batches(x, steps=1, function="distill")))
    return first_y is not None


def _validation(validation_data, num_classes, task):
    if validation_data is None:
        return None
    if is_dataset(validation_data):
        return validation_data
    x_val, y_val = validation_data
    x_val = np.asarray(x_val)
    return x_val, check_targets(y_val, len(x_val), (num_classes,), task, param="validation y")


class _Batches(keras.utils.PyDataset):
    """Shuffled batches of ``(x, y)``; ``augment`` applied once per batch, so teacher and student agree."""

    def __init__(self, x, y, batch_size, augment, seed):
        super().__init__()
        self.x, self.y, self.batch_size, self.augment = x, y, batch_size, augment
        self.rng = np.random.default_rng(seed)
        self.order = self.rng.permutation(len(x))

    def __len__(self):
        return math.ceil(len(self.x) / self.batch_size)

    def __getitem__(self, index):
        rows = self.order[index * self.batch_size:(index + 1) * self.batch_size]
        batch = self.x[rows]
        if self.augment is not None:
            batch = keras.ops.convert_to_numpy(self.augment(batch, training=True))
        if self.y is None:
            return (batch,)
        return batch, self.y[rows]

    def on_epoch_end(self):
        self.order = self.rng.permutation(len(self.x))


def register_cli(subparsers):
    """Add ``ensemblekit distill TEACHER.keras [MORE.keras ...] --student S.keras --data D -o OUT``.

    Example:
        >>> import argparse
        >>> parser = argparse.ArgumentParser()
        >>> register_cli(parser.add_subparsers())
        >>> args = parser.parse_args(["distill", "t.keras", "--student", "s.keras", "--data", "digits",
        ...                           "-o", "out.keras"])
        >>> args.teacher, args.temperature, args.epochs
        (['t.keras'], 3.0, 10)
    """
    parser = subparsers.add_parser(
        "distill", help="train one student model on an ensemble's soft targets",
        description="Distil a teacher (one .keras model, or the mean ensemble of several) into a "
                    "student model; writes the trained student as .keras.")
    parser.add_argument("teacher", nargs="+", help="teacher .keras/.h5 file(s); several = their ensemble")
    parser.add_argument("--student", required=True, help="the student's .keras/.h5 file (copied)")
    parser.add_argument("--data", required=True,
                        help="mnist1d or digits (their training split), or an .npz with x_train/y_train "
                             "(or x/y; y may be absent for unlabelled data)")
    parser.add_argument("-o", "--output", required=True, help="where to write the trained student (.keras)")
    parser.add_argument("--temperature", type=float, default=3.0)
    parser.add_argument("--alpha", type=float, default=0.5, help="weight of the supervised loss")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--width", type=float, default=None, help="keep this fraction of channels")
    parser.add_argument("--init", choices=("weights", "fresh"), default="weights")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(run=_run_cli)


def _run_cli(args):
    from ensemblekit._graph import model_input_shape
    from ensemblekit._io import atomic_save, load_model
    from ensemblekit.datasets import load_data_spec

    student = load_model(args.student, label="student")
    x, y = load_data_spec(args.data, model_input_shape(student), split="train")
    trained, report = distill(args.teacher, student, x, y, temperature=args.temperature,
                              alpha=args.alpha, epochs=args.epochs, batch_size=args.batch_size,
                              width=args.width, init=args.init, seed=args.seed,
                              verbose=0 if args.quiet else 1)
    atomic_save(trained, args.output)
    print(f"student written to {args.output} ({report.student_params:,} params; teacher "
          f"{report.teacher} {report.teacher_params:,}; {report.cache_reason}; "
          f"final loss {report.history['loss'][-1]:.4f})")
    return 0
