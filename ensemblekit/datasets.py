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
