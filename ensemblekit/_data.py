"""The one data path: every kind of data ``model.predict`` accepts, as batches, in one pass.

Keras has one place that turns arrays, dicts and lists of arrays,
``tf.data.Dataset``, ``keras.utils.PyDataset``, Python generators (and, under
other backends, torch ``DataLoader`` and grain) into batches: its data
adapters. This module asks them (so every kind Keras reads, we read) and adds
what composing models needs on top:

- :func:`predict`: one model's outputs on ``x`` as numpy, batch by batch, each
  batch padded to one shape so a traced function is not traced again for the
  last partial batch;
- :func:`collect`: several models' outputs *and* the labels and sample weights
  in ONE pass, so they stay aligned even when a dataset reshuffles on every
  iteration; rows whose inputs are NaN/inf are kept aside (few) for checks that
  must run them again;
- one ``ValueError``/``TypeError`` per kind of bad data, naming the function and
  the argument: ``y`` given beside a dataset that yields its own, labels
  missing, an endless dataset without ``steps``, an empty one, x and y of
  different lengths, a one-shot generator where the data must be read twice.

Nothing else in the package converts or batches user data.
"""

from __future__ import annotations

import dataclasses
import functools
import threading
import types
import weakref

import keras
import numpy as np

DEFAULT_BATCH_SIZE = 256


def _adapters():
    # Keras' adapters are not exported; this is the one place that reaches for them.
    from keras.src.trainers import data_adapters

    return data_adapters


def data_kind(x):
    """The kind of ``x`` as errors name it (``"tf.data.Dataset"``, ``"keras.utils.PyDataset"``,
    ``"generator"``...), or ``None`` for arrays and other in-memory data."""
    data_adapters = _adapters()
    if data_adapters.is_tf_dataset(x):
        return "tf.data.Dataset"
    if isinstance(x, keras.utils.PyDataset):
        return "keras.utils.PyDataset"
    if isinstance(x, types.GeneratorType):
        return "generator"
    if data_adapters.is_torch_dataloader(x):
        return "torch DataLoader"
    if data_adapters.is_grain_dataset(x):
        return "grain dataset"
    return None


def _is_factory(x):
    """A callable that returns a fresh iterator over the data (re-iterable data from generators)."""
    return isinstance(x, (types.FunctionType, types.MethodType, functools.partial))


def _is_iterable(x):
    """An iterable of batches that Keras has no adapter for (a custom iterable class)."""
    return (hasattr(x, "__iter__") and not hasattr(x, "shape") and data_kind(x) is None
            and not isinstance(x, (list, tuple, dict, str, bytes)))


def is_dataset(x):
    """True for data that yields its own batches (and maybe labels): not arrays."""
    return data_kind(x) is not None or _is_factory(x) or _is_iterable(x)


def check_reiterable(x, function, argument="x"):
    """Refuse a one-shot generator where ``function`` must read the data more than once."""
    if isinstance(x, types.GeneratorType):
        raise ValueError(
            f"{function}: {argument} is a one-shot Python generator, but {function} reads the data "
            "more than once; pass arrays, a tf.data.Dataset, a keras.utils.PyDataset, or a callable "
            "that returns a fresh generator."
        )


@dataclasses.dataclass
class Collected:
    """What one pass over the data gave.

    Attributes:
        outputs: one entry per model: its outputs (numpy, in its output structure), rows first.
        y: the labels (numpy, or a structure of numpy for several outputs), or ``None``.
        sample_weight: ``(n,)`` float weights, or ``None``.
        rows: how many rows the pass saw.
        suspect_rows: indices of rows whose inputs hold NaN or inf.
        kept_rows: indices of the rows whose inputs were kept: those with NaN/inf
            inputs and those on which a model's outputs are NaN/inf (few), so checks
            can run models on them again (:meth:`inputs_at`).
        kept_inputs: those rows' inputs (in ``x``'s structure), or ``None``.
    """

    outputs: list
    y: object
    sample_weight: object
    rows: int
    suspect_rows: np.ndarray
    kept_rows: np.ndarray
    kept_inputs: object

    def __len__(self):
        return self.rows

    def inputs_at(self, rows):
        """The inputs of ``rows`` (indices among the kept rows), in ``x``'s structure."""
        rows = np.asarray(rows, dtype=int)
        positions = np.searchsorted(self.kept_rows, rows)
        if self.kept_inputs is None or np.any(positions >= len(self.kept_rows)) or np.any(
                self.kept_rows[np.minimum(positions, len(self.kept_rows) - 1)] != rows):
            raise ValueError(f"rows {rows[:5].tolist()} of the data were not kept (only rows with "
                             "non-finite inputs or outputs are).")
        return keras.tree.map_structure(lambda a: np.asarray(a)[positions], self.kept_inputs)


def batches(x, y=None, sample_weight=None, *, batch_size=None, steps=None, function="predict",
            argument="x"):
    """Yield ``(x, y, sample_weight)`` batches of numpy arrays from any data Keras reads.

    ``x`` may be an array, a dict or list of arrays (several inputs, as in
    Keras), a ``tf.data.Dataset`` (yielding ``x``, ``(x, y)`` or ``(x, y,
    sample_weight)``), a ``keras.utils.PyDataset``, a generator or a callable
    returning a fresh iterator. ``y`` and ``sample_weight`` go with arrays only.
    ``steps`` caps the number of batches (required for endless data).

    Example:
        >>> [xb.shape for xb, _, _ in batches(np.zeros((5, 2)), batch_size=2)]
        [(2, 2), (2, 2), (1, 2)]
    """
    if _is_factory(x):
        x = x()
    if _is_iterable(x):
        x = (batch for batch in x)
    kind = data_kind(x)
    if kind is not None and y is not None:
        raise ValueError(
            f"{function}: y= was given, but {argument} is a {kind}, which yields its own batches; "
            f"make it yield (x, y) pairs and leave y=None."
        )
    if kind is not None and sample_weight is not None:
        raise ValueError(f"{function}: sample_weight= was given, but {argument} is a {kind}; make it "
                         "yield (x, y, sample_weight).")
    if kind is None:
        x, y, sample_weight = _as_arrays(x, y, sample_weight, function, argument)
        batch_size = batch_size or DEFAULT_BATCH_SIZE
    _check_steps(x, kind, steps, function, argument)
    try:
        adapter = _adapters().get_data_adapter(x, y, sample_weight=sample_weight,
                                               batch_size=batch_size if kind is None else None,
                                               steps_per_epoch=steps if kind is None else None)
    except ValueError as error:
        raise ValueError(f"{function}: {argument}: {_first_line(error)}") from None
    adapter.on_epoch_begin()
    try:
        numpy_batches = _tf_numpy_batches(x) if kind == "tf.data.Dataset" else adapter.get_numpy_iterator()
        for step, batch in enumerate(numpy_batches):
            if steps is not None and step >= steps:
                break
            yield keras.utils.unpack_x_y_sample_weight(batch)
    finally:
        adapter.on_epoch_end()


def _tf_numpy_batches(dataset):
    """A ``tf.data.Dataset``'s batches as numpy; its iterator is deleted on a helper thread.

    Deleting a tf.data iterator whose pipeline autotunes waits for the autotuning
    thread: up to ~0.5 s on every pass (measured on a 40-batch image stream that
    takes 0.7 s to predict). Keras' own ``predict`` keeps its iterator past the
    call; we hand ours to a thread that drops it.
    """
    iterator = iter(dataset)
    try:
        for batch in iterator:
            yield keras.tree.map_structure(lambda t: t.numpy() if hasattr(t, "numpy") else t, batch)
    finally:
        holder = [iterator]
        del iterator
        threading.Thread(target=holder.clear, name="ensemblekit-drop-iterator", daemon=True).start()


def _as_arrays(x, y, sample_weight, function, argument):
    """Check in-memory data: numeric arrays (or structures of them) of one length."""
    if x is None:
        raise TypeError(f"{function}: {argument} is None; pass arrays or a dataset.")
    x = _arrays(x)
    lengths = {len(a) if np.ndim(a) else 0 for a in keras.tree.flatten(x)}
    if len(lengths) != 1 or 0 in lengths:
        shapes = [np.shape(a) for a in keras.tree.flatten(x)]
        raise ValueError(f"{function}: {argument} must be arrays with one number of rows (at least 1); "
                         f"got shapes {shapes}.")
    rows = lengths.pop()
    if y is not None:
        y = _arrays(y)
        for target in keras.tree.flatten(y):
            if len(target) != rows:
                raise ValueError(f"{function}: y has {len(target)} rows but {argument} has {rows}.")
    if sample_weight is not None:
        sample_weight = np.asarray(sample_weight, dtype="float32")
        if sample_weight.shape != (rows,):
            raise ValueError(f"{function}: sample_weight has shape {sample_weight.shape}; expected ({rows},) "
                             f"(one weight per row of {argument}).")
    return x, y, sample_weight


def _arrays(value):
    """``value`` as an array, or a dict/list of arrays (several inputs or outputs, as in Keras).

    A list of numbers (labels ``[0, 1, 2]``) or of lists is ONE array, never several.
    """
    if isinstance(value, dict):
        return {key: _array(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)) and value and all(hasattr(item, "shape") and np.ndim(item)
                                                          for item in value):
        return [_array(item) for item in value]
    return _array(value)


def _array(value):
    array = np.asarray(keras.ops.convert_to_numpy(value) if hasattr(value, "numpy") else value)
    if array.dtype == object:
        raise TypeError(f"an array of Python objects ({array.shape}) is not numeric data.")
    return array


def _check_steps(x, kind, steps, function, argument):
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise ValueError(f"{function}: steps must be a positive integer or None, got {steps!r}.")
    if steps is not None:
        return
    if kind == "tf.data.Dataset":
        cardinality = int(x.cardinality())
        if cardinality == -1:  # tf.data.INFINITE_CARDINALITY
            raise ValueError(f"{function}: {argument} is an endless tf.data.Dataset (repeat()); pass "
                             "steps= (the number of batches to read).")
        if cardinality == 0:
            raise ValueError(f"{function}: {argument} is an empty tf.data.Dataset.")
    elif kind == "keras.utils.PyDataset":
        try:
            count = x.num_batches
        except NotImplementedError:
            count = None
        if count is None:
            raise ValueError(f"{function}: {argument} is an endless keras.utils.PyDataset "
                             "(num_batches is None); pass steps= (the number of batches to read).")


def _first_line(error, limit=300):
    text = str(error).strip()
    line = text.splitlines()[0] if text else type(error).__name__
    return line if len(line) <= limit else line[:limit] + "..."


def _pad(batch, size):
    """``batch`` (a structure of arrays) padded with zero rows to ``size`` rows."""
    def pad(array):
        missing = size - len(array)
        if missing <= 0:
            return array
        return np.concatenate([array, np.zeros((missing, *array.shape[1:]), array.dtype)])

    return keras.tree.map_structure(pad, batch)


def _rows(batch):
    return len(keras.tree.flatten(batch)[0])


def _non_finite_input_rows(batch):
    bad = np.zeros(_rows(batch), dtype=bool)
    for array in keras.tree.flatten(batch):
        array = np.asarray(array)
        if np.issubdtype(array.dtype, np.number) and array.ndim:
            bad |= ~np.isfinite(array.reshape(len(array), -1)).all(axis=1)
    return bad


# model -> (its variables' identities, compile_for_inference(model)): one compiled call per model,
# made again when its variables are replaced (e.g. by model.quantize), never stale.
_COMPILED = weakref.WeakKeyDictionary()


def _runner(model):
    """A callable running ``model`` on one numpy batch.

    Models with one input run through ``ensemblekit.inference.compile_for_inference``
    as a plain compiled graph (kept per model, one trace per input shape):
    ``model.predict_on_batch`` pays Keras' per-call overhead on every batch. Keras'
    own step runs models with several inputs and models placed on several devices
    (a ``tf.distribute`` strategy with several replicas, a ``keras.distribution``),
    so those batches are split over the devices as Keras splits them.
    """
    if not _compilable(model):
        return model.predict_on_batch
    signature = tuple(id(v) for v in model.variables)
    cached = _COMPILED.get(model)
    if cached is None or cached[0] != signature:
        from ensemblekit.inference import compile_for_inference

        cached = (signature, compile_for_inference(model, jit_compile=False, autotune=False))
        _COMPILED[model] = cached
    compiled = cached[1]

    def run(batch):
        if not hasattr(batch, "shape"):  # a structure of inputs: Keras' step adapts it
            return model.predict_on_batch(batch)
        return keras.tree.map_structure(keras.ops.convert_to_numpy, compiled.fn(batch))
    return run


def _compilable(model):
    backend = keras.backend.backend()
    if backend not in ("tensorflow", "jax") or len(getattr(model, "inputs", None) or ()) != 1:
        return False
    if backend == "jax":
        return keras.distribution.distribution() is None
    strategy = getattr(model, "distribute_strategy", None)
    return strategy is None or strategy.num_replicas_in_sync == 1


def collect(models, x, y=None, sample_weight=None, *, batch_size=None, steps=None, function="predict",
            argument="x", needs_labels=False, verbose=0, runners=None, sink=None):
    """Run every model of ``models`` on each batch of ``x`` as it arrives, in one pass.

    Args:
        models: ``keras.Model`` objects (each gets every batch).
        x, y, sample_weight, batch_size, steps: the data, as :func:`batches` reads it.
        function, argument: how errors name the caller and its data argument.
        needs_labels: refuse data without labels (no ``y`` and a dataset of ``x`` only).
        verbose: 1 shows Keras' progress bar.
        runners: optional callables (one per model) running a model on one batch.
        sink: optional callable given each batch's inputs (unpadded), e.g.
            :meth:`InputStore.append`, to keep them for a later pass in this order.

    Returns:
        A :class:`Collected`.

    Example:
        >>> m = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
        >>> got = collect([m], np.ones((5, 2)), np.arange(5), batch_size=2)
        >>> got.outputs[0].shape, got.y.tolist(), got.rows
        ((5, 1), [0, 1, 2, 3, 4], 5)
    """
    runners = runners or [_runner(model) for model in models]
    outputs = [[] for _ in models]
    labels, weights, suspects, kept, kept_inputs = [], [], [], [], []
    # Arrays: every batch padded to batch_size, so a traced predict function sees one shape for
    # every call on any data; datasets: padded to their first batch's size.
    width, seen = (None if is_dataset(x) else batch_size or DEFAULT_BATCH_SIZE), 0
    progress = keras.utils.Progbar(None, verbose=verbose, unit_name="batch") if verbose else None
    for x_batch, y_batch, w_batch in batches(x, y, sample_weight, batch_size=batch_size, steps=steps,
                                             function=function, argument=argument):
        count = _rows(x_batch)
        width = width or count
        if sink is not None:
            sink(x_batch)
        padded = _pad(x_batch, width) if count < width else x_batch
        bad_outputs = np.zeros(count, dtype=bool)
        for index, (model, run) in enumerate(zip(models, runners, strict=True)):
            try:
                result = run(padded)
            except Exception as error:  # shapes or dtypes that do not fit the model's inputs
                raise ValueError(_misfit(function, argument, model, x_batch, error)) from None
            result = keras.tree.map_structure(lambda a, n=count: np.asarray(a)[:n], result)
            bad_outputs |= _non_finite_input_rows(result)
            outputs[index].append(result)
        if needs_labels and y_batch is None:
            raise ValueError(f"{function}: {argument} yields no labels; pass y= with arrays, or a "
                             "dataset of (x, y) pairs.")
        labels.append(y_batch)
        weights.append(w_batch)
        bad = _non_finite_input_rows(x_batch)
        suspects.append(seen + np.flatnonzero(bad))
        keep = bad | bad_outputs
        if keep.any():
            kept.append(seen + np.flatnonzero(keep))
            kept_inputs.append(keras.tree.map_structure(lambda a, k=keep: np.asarray(a)[k], x_batch))
        seen += count
        if progress is not None:
            progress.add(1)
    if not seen:
        raise ValueError(f"{function}: {argument} holds no data (the dataset is empty).")
    return Collected(
        outputs=[_concatenate(parts) for parts in outputs],
        y=None if all(label is None for label in labels) else _concatenate(labels),
        sample_weight=None if all(w is None for w in weights) else np.concatenate(
            [np.asarray(w, dtype="float64").reshape(-1) for w in weights]),
        rows=seen,
        suspect_rows=np.concatenate(suspects).astype(int),
        kept_rows=np.concatenate(kept).astype(int) if kept else np.zeros(0, dtype=int),
        kept_inputs=_concatenate(kept_inputs) if kept_inputs else None,
    )


def refuse_sample_weight(data, function):
    """Sample weights are not used by ``function`` yet: refuse them rather than ignore them."""
    if data.sample_weight is not None:
        raise ValueError(f"{function}: sample weights (sample_weight=, or a dataset yielding (x, y, "
                         "sample_weight)) are not supported yet; they are refused rather than ignored.")


def _concatenate(parts):
    return keras.tree.map_structure(lambda *arrays: np.concatenate([np.asarray(a) for a in arrays]), *parts)


def _misfit(function, argument, model, batch, error):
    shapes = keras.tree.map_structure(lambda a: tuple(np.shape(a)), batch)
    expected = [(tuple(t.shape), str(t.dtype)) for t in getattr(model, "inputs", None) or []]
    return (f"{function}: {argument} does not fit model {model.name!r}: a batch of shapes {shapes}, "
            f"the model takes {expected} ({_first_line(error)}).")


def predict(model, x, batch_size=None, steps=None, verbose=0):
    """``model``'s outputs on ``x`` as numpy, in one pass over any data Keras reads.

    Batches are padded to the first batch's size, so every call sees one
    input shape (``model.predict`` traces its function again for each new
    remainder size). Labels a dataset yields are ignored.

    Args:
        model: a ``keras.Model``.
        x: arrays, a dict/list of arrays, a ``tf.data.Dataset``, a
            ``keras.utils.PyDataset``, a generator or a callable returning one.
        batch_size: rows per batch for arrays (default 256); datasets keep theirs.
        steps: the number of batches to read (required for endless data).
        verbose: 1 shows Keras' progress bar.

    Returns:
        The outputs in the model's output structure (an array, or a dict/list of arrays).

    Example:
        >>> import keras, numpy as np
        >>> model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
        >>> predict(model, np.ones((3, 2), "float32"), batch_size=2).shape
        (3, 1)
    """
    return collect([model], x, batch_size=batch_size, steps=steps, verbose=verbose).outputs[0]


def row_count(x):
    """Rows of in-memory data (an array or a structure of arrays), or of a :class:`Rows` dataset."""
    if isinstance(x, Rows):
        return len(x.indices)
    return len(keras.tree.flatten(x)[0])


def take(x, indices):
    """Rows ``indices`` of in-memory data (an array, or a dict/list of arrays), in ``x``'s structure."""
    return keras.tree.map_structure(lambda a: np.asarray(a)[indices], _arrays(x))


class InputStore:
    """A dataset's inputs written once, in the order one pass read them, to a temporary HDF5 file.

    Functions that must read data again in one fixed order (``ek.advise``
    splits it by sample index into a fit and a score half) keep a dataset's
    inputs here instead of in memory: 50,000 images at 224x224 are 30 GB as
    float32. Reading rows back goes through the file, not a memory map, so the
    process's resident memory does not grow with the data. The file is deleted
    when the store is.

    Example:
        >>> store = InputStore()
        >>> store.append(np.arange(6.0).reshape(3, 2)); store.append(np.ones((2, 2)))
        >>> len(store), store.read(np.array([1, 4])).tolist()
        (5, [[2.0, 3.0], [1.0, 1.0]])
    """

    def __init__(self):
        import os
        import tempfile
        import weakref

        import h5py

        folder = tempfile.mkdtemp(prefix="ensemblekit-inputs-")
        path = os.path.join(folder, "inputs.h5")
        self._file = h5py.File(path, "w")
        self._structure, self._rows = None, 0
        self._finalizer = weakref.finalize(self, _remove_store, self._file, folder)

    def __len__(self):
        return self._rows

    def append(self, batch):
        """Write one batch (an array or a structure of arrays) after the rows already kept."""
        leaves = [np.asarray(a) for a in keras.tree.flatten(batch)]
        if not len(leaves[0]):
            return
        if not self._rows:
            self._structure = keras.tree.map_structure(lambda _: 0, batch)
            for index, leaf in enumerate(leaves):
                self._file.create_dataset(str(index), shape=(0, *leaf.shape[1:]), dtype=leaf.dtype,
                                          maxshape=(None, *leaf.shape[1:]),
                                          chunks=(max(1, min(len(leaf), 256)), *leaf.shape[1:]))
        count = len(leaves[0])
        for index, leaf in enumerate(leaves):
            stored = self._file[str(index)]
            if leaf.shape[1:] != stored.shape[1:]:
                raise ValueError(f"a batch of shape {leaf.shape} follows batches of shape "
                                 f"{(None, *stored.shape[1:])}; every batch must have one row shape.")
            stored.resize(self._rows + count, axis=0)
            stored[self._rows:] = leaf
        self._rows += count

    def read(self, indices):
        """Rows ``indices`` (sorted) in the inputs' structure."""
        indices = np.asarray(indices, dtype=int)
        low, high = int(indices[0]), int(indices[-1]) + 1
        leaves = [self._file[str(i)][low:high][indices - low] for i in range(len(self._file))]
        return keras.tree.pack_sequence_as(self._structure, leaves)

    def close(self):
        self._finalizer()


def _remove_store(file, folder):
    import shutil

    try:
        file.close()
    finally:
        shutil.rmtree(folder, ignore_errors=True)


class Rows(keras.utils.PyDataset):
    """Rows ``indices`` of some inputs (in-memory arrays or an :class:`InputStore`) with their
    labels, as a re-iterable ``keras.utils.PyDataset`` of ``(x, y)`` batches in one fixed order.

    Every function that reads data reads it; ``ek.advise`` passes its fit and
    score halves of a dataset this way.

    Example:
        >>> rows = Rows(np.arange(10.0)[:, None], np.array([1, 3, 5]), np.arange(10) % 2, batch_size=2)
        >>> len(rows), [b[1].tolist() for b in rows]
        (2, [[1, 1], [1]])
    """

    def __init__(self, source, indices, y=None, batch_size=DEFAULT_BATCH_SIZE):
        super().__init__()
        self.source, self.indices = source, np.sort(np.asarray(indices, dtype=int))
        self.y, self.batch_size = y, int(batch_size)

    def __len__(self):
        return -(-len(self.indices) // self.batch_size)

    @property
    def num_batches(self):
        return len(self)

    def __getitem__(self, index):
        if index >= len(self):
            raise IndexError(index)
        rows = self.indices[index * self.batch_size:(index + 1) * self.batch_size]
        x = self.source.read(rows) if isinstance(self.source, InputStore) else take(self.source, rows)
        if self.y is None:
            return x
        return x, keras.tree.map_structure(lambda a: np.asarray(a)[rows], self.y)

    def labels(self):
        """The labels of these rows (``None`` when there are none)."""
        return None if self.y is None else keras.tree.map_structure(lambda a: np.asarray(a)[self.indices], self.y)
