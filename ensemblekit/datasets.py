"""Small real datasets generated or bundled locally (no downloads).

``mnist1d`` (Greydanus, 2020) generates its data from templates on the fly;
scikit-learn bundles ``load_digits``. Both are optional dependencies (the
``demo``/``test``/``bench`` extras).
"""

from __future__ import annotations

import functools

import numpy as np


@functools.lru_cache(maxsize=2)
def _mnist1d_arrays(seed):
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError:
        raise ImportError(
            'mnist1d is not installed; pip install "ensemblekit[demo]" (or [test]).'
        ) from None
    args = get_dataset_args()
    if seed is not None:
        args.seed = seed
    data = make_dataset(args)
    return (data["x"].astype("float32"), data["y"].astype("int64"),
            data["x_test"].astype("float32"), data["y_test"].astype("int64"))


def load_mnist1d(seed=None, channels_last=True):
    """mnist1d: 4000 train / 1000 test sequences of length 40, 10 classes.

    Args:
        seed: the generator seed (``None``: mnist1d's default, the standard split).
        channels_last: return ``(n, 40, 1)`` (for Conv1D) instead of ``(n, 40)``.

    Returns:
        ``((x_train, y_train), (x_test, y_test))`` as float32 / int64 arrays
        (fresh copies; callers may modify them).

    Example:
        >>> (x, y), (xt, yt) = load_mnist1d()
        >>> x.shape, xt.shape
        ((4000, 40, 1), (1000, 40, 1))
    """
    x, y, x_test, y_test = (np.array(a) for a in _mnist1d_arrays(seed))
    if channels_last:
        x, x_test = x[..., None], x_test[..., None]
    return (x, y), (x_test, y_test)


def load_digits(test_size=0.3, seed=0):
    """scikit-learn's 8x8 digits as ``(n, 8, 8, 1)`` images in [0, 1], split train/test."""
    try:
        from sklearn.datasets import load_digits as sk_load_digits
    except ImportError:
        raise ImportError('scikit-learn is not installed; pip install "ensemblekit[demo]".') from None
    data = sk_load_digits()
    x = (data.images / 16.0).astype("float32")[..., None]
    y = data.target.astype("int64")
    order = np.random.default_rng(seed).permutation(len(x))
    cut = int(len(x) * (1 - test_size))
    return (x[order[:cut]], y[order[:cut]]), (x[order[cut:]], y[order[cut:]])


def load_data_spec(spec, input_shape=None, split="test", option="--data"):
    """``(x, y)`` named on a command line: ``"mnist1d"``, ``"digits"`` or an ``.npz`` file.

    Args:
        spec: ``"mnist1d"``/``"digits"`` (that split of the dataset) or a path to
            an ``.npz`` holding ``x_val``/``y_val`` (``split="test"``) or
            ``x_train``/``y_train`` (``split="train"``), or plain ``x``/``y``.
        input_shape: the models' input shape without the batch axis; ``x`` is
            reshaped to it when only the layout differs (mnist1d's ``(n, 40, 1)``
            for a ``(40,)`` model).
        split: ``"train"`` or ``"test"``.
        option: how errors name the command-line option.

    Returns:
        ``(x, y)`` numpy arrays.

    Example:
        >>> x, y = load_data_spec("digits", (64,))
        >>> x.shape[1:], len(x) == len(y)
        ((64,), True)
    """
    if spec in ("mnist1d", "digits"):
        train, test = load_mnist1d() if spec == "mnist1d" else load_digits()
        x, y = train if split == "train" else test
    elif str(spec).endswith(".npz"):
        try:
            arrays = np.load(spec)
        except OSError as error:
            raise ValueError(f"{option}: could not read {spec!r}: {error}") from None
        named = ("x_train", "y_train") if split == "train" else ("x_val", "y_val")
        keys = named if named[0] in arrays else ("x", "y")
        if not all(k in arrays for k in keys):
            raise ValueError(f"{option}: {spec!r} needs arrays {named[0]} and {named[1]} (or x and y); "
                             f"has {sorted(arrays)}.")
        x, y = arrays[keys[0]], arrays[keys[1]]
    else:
        raise ValueError(f"{option} must be mnist1d, digits or an .npz file, got {spec!r}.")
    if input_shape is not None and None not in input_shape and x.shape[1:] != tuple(input_shape) and \
            int(np.prod(x.shape[1:])) == int(np.prod(input_shape)):
        x = x.reshape((len(x), *input_shape))
    return x, y

