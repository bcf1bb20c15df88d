"""Small real datasets generated or bundled locally (no downloads).

``mnist1d`` (Greydanus, 2020) generates its data from templates on the fly;
scikit-learn bundles ``load_digits``. Both are optional dependencies (the
``demo``/``test``/``bench`` extras).
"""

from __future__ import annotations

import functools
import os

import keras
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


def load_data_spec(spec, input_shape=None, split="test", option="--data", datasets=False, image_size=None):
    """``(x, y)`` named on a command line: ``"mnist1d"``, ``"digits"``, an ``.npz`` file or a folder.

    With ``datasets=True`` a folder is read too, never materialised: a folder
    written by ``tf.data.Dataset.save`` (it holds ``dataset_spec.pb``) is loaded
    with ``tf.data.Dataset.load``; any other folder is images in class subfolders,
    read as ``keras.utils.image_dataset_from_directory`` reads them (labels from
    the sorted subfolder names, files in order, ``image_size`` or the models'
    input height and width). Both come back as ``(dataset, None)``.

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
    if os.path.isdir(str(spec)):
        return _folder(str(spec), input_shape, option, datasets, image_size), None
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
        choices = "mnist1d, digits, an .npz file or a folder" if datasets else "mnist1d, digits or an .npz file"
        raise ValueError(f"{option} must be {choices}, got {spec!r}.")
    if input_shape is not None and None not in input_shape and x.shape[1:] != tuple(input_shape) and \
            int(np.prod(x.shape[1:])) == int(np.prod(input_shape)):
        x = x.reshape((len(x), *input_shape))
    return x, y


def _folder(path, input_shape, option, datasets, image_size):
    """A saved ``tf.data`` dataset or a folder of images in class subfolders, as a dataset."""
    if not datasets:
        raise ValueError(f"{option}: {path!r} is a folder; this command reads arrays (mnist1d, digits "
                         "or an .npz file).")
    if keras.backend.backend() != "tensorflow":
        raise ValueError(f"{option}: reading the folder {path!r} needs the TensorFlow backend "
                         f"(tf.data); the Keras backend is {keras.backend.backend()!r}.")
    import tensorflow as tf

    if os.path.exists(os.path.join(path, "dataset_spec.pb")):
        return tf.data.Dataset.load(path)
    if image_size is None:
        if input_shape is None or len(input_shape) != 3 or None in input_shape[:2]:
            raise ValueError(f"{option}: {path!r} is a folder of images; give --image-size HEIGHT WIDTH "
                             f"(the model's input shape {input_shape} does not say it).")
        image_size = tuple(input_shape[:2])
    channels = input_shape[-1] if input_shape is not None and len(input_shape) == 3 else 3
    color_mode = {1: "grayscale", 3: "rgb", 4: "rgba"}.get(channels, "rgb")
    try:
        return keras.utils.image_dataset_from_directory(
            path, image_size=tuple(image_size), shuffle=False, batch_size=32, color_mode=color_mode,
            verbose=False)
    except ValueError as error:
        raise ValueError(f"{option}: {path!r} is not a folder of images in class subfolders: "
                         f"{str(error).strip().splitlines()[0]}") from None
