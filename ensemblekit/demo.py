"""``ensemblekit demo``: train small members on mnist1d, compose them every way, print a table.

Five small 1-D CNNs are trained with different seeds on 3500 of mnist1d's
4000 training sequences; the other 500 are the validation split that the
learned compositions (weights, selection, stacking, calibration) fit on.
Every model is scored on the 1000 test sequences. The compositions are
entries of :mod:`ensemblekit.compositions` (:data:`COMPOSITIONS` gives the
demo's labels).

Same seed, same numbers on one machine and backend: :func:`deterministic`
seeds Python, NumPy and the backend and turns on TensorFlow's op determinism;
every member is seeded before it is built and again before it is trained, and
every trained part of a composition is seeded. What still varies between
machines: TensorFlow's CPU kernels (oneDNN) round differently per instruction
set (AVX2 / AVX-512 / AMX) and thread count, and 15 epochs of training amplify
those differences into other members (about a point of accuracy each); other
TensorFlow, Keras or mnist1d versions can do the same.
"""

from __future__ import annotations

import contextlib
import json
import time

VALIDATION = 500
# The demo's label -> the registry's name (ensemblekit.compositions), in the table's order.
COMPOSITIONS = {
    "ensemble mean": "ensemble_mean",
    "ensemble logit_mean": "ensemble_logit_mean",
    "ensemble geometric": "ensemble_geometric",
    "ensemble vote": "ensemble_vote",
    "optimize_weights (weighted)": "weighted",
    "select (Caruana)": "greedy",
    "stack logistic": "stack_logistic",
    "fuse concat (new head)": "fuse_concat",
    "calibrate(ensemble mean)": "calibrated_mean",
}
SETTINGS = {"stack_cv": 5, "stack_epochs": 100, "fuse_epochs": 5}


@contextlib.contextmanager
def deterministic(seed=0):
    """Seed everything with ``seed`` and, on TensorFlow, turn op determinism on inside the block.

    ``keras.utils.set_random_seed`` seeds Python, NumPy and the backend;
    ``tf.config.experimental.enable_op_determinism`` makes TensorFlow pick
    deterministic kernels (same inputs, same bits on one machine). Op
    determinism is switched off again on exit unless it was on before.

    Example:
        >>> import numpy as np
        >>> with deterministic(3):
        ...     first = np.random.rand()
        >>> with deterministic(3):
        ...     first == np.random.rand()
        True
    """
    import keras

    keras.utils.set_random_seed(seed)
    if keras.backend.backend() != "tensorflow":
        yield
        return
    import tensorflow as tf

    try:  # TensorFlow has no public switch back; without this one, op determinism stays on
        from tensorflow.python.framework import config as tf_config

        was_on, switch_off = tf_config.is_op_determinism_enabled(), tf_config.disable_op_determinism
    except (ImportError, AttributeError):
        was_on, switch_off = True, None
    tf.config.experimental.enable_op_determinism()
    try:
        yield
    finally:
        if not was_on:
            switch_off()


def make_cnn(seed, name=None):
    """The demo member: a small Conv1D classifier on (40, 1) sequences, logits out.

    Example:
        >>> make_cnn(0).output_shape
        (None, 10)
    """
    import keras

    keras.utils.set_random_seed(seed)
    model = keras.Sequential(
        [
            keras.Input((40, 1)),
            keras.layers.Conv1D(32, 5, padding="same", activation="relu"),
            keras.layers.Conv1D(32, 3, strides=2, padding="same", activation="relu"),
            keras.layers.Conv1D(32, 3, strides=2, padding="same", activation="relu", name="features"),
            keras.layers.Flatten(),
            keras.layers.Dense(10, name="logits"),
        ],
        name=name or f"cnn_{seed}",
    )
    model.compile(
        optimizer=keras.optimizers.Adam(3e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    return model


def fit_seeded(model, x, y, epochs, seed, batch_size=64):
    """``model.fit`` with the backend seeded first: its shuffling depends on ``seed`` only.

    Example:
        >>> import numpy as np
        >>> model = make_cnn(0)
        >>> fit_seeded(model, np.zeros((8, 40, 1)), np.zeros(8), epochs=1, seed=0) is model
        True
    """
    import keras

    keras.utils.set_random_seed(seed)
    model.fit(x, y, epochs=epochs, batch_size=batch_size, verbose=0)
    return model


def train_members(x, y, count=5, epochs=15, seed=0, verbose=1):
    """Train ``count`` demo CNNs that differ only in their seed (member ``i`` gets ``seed + i``)."""
    import keras

    progress = keras.utils.Progbar(count, unit_name="member", verbose=verbose)
    members = []
    for index in range(count):
        members.append(fit_seeded(make_cnn(seed + index), x, y, epochs, seed + index))
        progress.add(1)
    return members


def compose_all(members, x, y, train_data, verbose=1, seed=0):
    """The demo's compositions (:data:`COMPOSITIONS`) of ``members``: ``{label: keras.Model}``.

    ``(x, y)`` is the held-out data everything learned fits on; ``train_data`` the
    members' training data ``(x_train, y_train)``.
    """
    import keras

    from ensemblekit import compositions

    x_train, y_train = train_data
    ctx = compositions.Context(members, x, y, x_train=x_train, y_train=y_train, seed=seed, settings=SETTINGS)
    progress = keras.utils.Progbar(len(COMPOSITIONS), unit_name="composition", verbose=verbose)
    composed = {}
    for label, _, result in compositions.build_each(COMPOSITIONS, ctx):
        if isinstance(result, compositions.Skip):
            raise ValueError(f"the demo's {label!r} does not apply to these members: {result}")
        composed[label] = result.model
        progress.add(1)
    return composed


def format_table(rows):
    """A Markdown table of ``[(label, metrics dict)]``.

    Example:
        >>> print(format_table([("m", dict(accuracy=0.9, nll=0.3, brier=0.1, ece=0.05))]))
        | model | accuracy | NLL | Brier | ECE |
        |---|---:|---:|---:|---:|
        | m | 0.9000 | 0.3000 | 0.1000 | 0.0500 |
    """
    lines = ["| model | accuracy | NLL | Brier | ECE |", "|---|---:|---:|---:|---:|"]
    for label, scores in rows:
        lines.append(
            f"| {label} | {scores['accuracy']:.4f} | {scores['nll']:.4f} | "
            f"{scores['brier']:.4f} | {scores['ece']:.4f} |"
        )
    return "\n".join(lines)


def run_demo(members=5, epochs=15, seed=0, verbose=1, json_path=None):
    """Train, compose, evaluate (under :func:`deterministic`); return ``([(label, metrics)], seconds)``."""
    import keras

    from ensemblekit.datasets import load_mnist1d
    from ensemblekit.metrics import evaluate

    start = time.perf_counter()
    (x, y), (x_test, y_test) = load_mnist1d()
    x_train, y_train = x[:-VALIDATION], y[:-VALIDATION]
    x_val, y_val = x[-VALIDATION:], y[-VALIDATION:]
    with deterministic(seed):
        trained = train_members(x_train, y_train, count=members, epochs=epochs, seed=seed, verbose=verbose)
        composed = compose_all(trained, x_val, y_val, (x_train, y_train), verbose=verbose, seed=seed)
        rows = [(f"member {m.name}", evaluate(m, x_test, y_test)) for m in trained]
        rows += [(label, evaluate(model, x_test, y_test)) for label, model in composed.items()]
    elapsed = time.perf_counter() - start
    if json_path:
        from pathlib import Path

        Path(json_path).write_text(json.dumps(
            {"seconds": elapsed, "members": members, "epochs": epochs, "seed": seed,
             "backend": keras.backend.backend(), "results": dict(rows)}, indent=2))
    return rows, elapsed


def _run_cli(args):
    rows, elapsed = run_demo(members=args.members, epochs=args.epochs, seed=args.seed,
                             verbose=0 if args.quiet else 1, json_path=args.json)
    print(f"\nmnist1d test set (1000 sequences); {args.members} CNN members; {elapsed:.0f} s in all\n")
    print(format_table(rows))
    return 0


def register_cli(subparsers):
    """Add ``ensemblekit demo [--members K] [--epochs E] [--seed S] [--json path] [--quiet]``.

    Example:
        >>> import argparse
        >>> parser = argparse.ArgumentParser()
        >>> register_cli(parser.add_subparsers())
        >>> parser.parse_args(["demo", "--members", "3"]).members
        3
    """
    parser = subparsers.add_parser("demo", help="train members on mnist1d and compare every composition")
    parser.add_argument("--members", type=int, default=5, help="how many members to train (default 5)")
    parser.add_argument("--epochs", type=int, default=15, help="training epochs per member (default 15)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the first member (default 0)")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.set_defaults(run=_run_cli)
