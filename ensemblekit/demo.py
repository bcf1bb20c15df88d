"""``ensemblekit demo``: train small members on mnist1d, compose them every way, print a table.

Five small 1-D CNNs are trained with different seeds on 3500 of mnist1d's
4000 training sequences; the other 500 are the validation split that the
learned compositions (weights, selection, stacking, calibration) fit on.
Every model is scored on the 1000 test sequences.
"""

from __future__ import annotations

import json
import time

import numpy as np

VALIDATION = 500


def make_cnn(seed, name=None):
    """The demo member: a small Conv1D classifier on (40, 1) sequences, logits out."""
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


def train_members(x, y, count=5, epochs=15, seed=0, verbose=1):
    """Train ``count`` demo CNNs that differ only in their seed."""
    import keras

    progress = keras.utils.Progbar(count, unit_name="member", verbose=verbose)
    members = []
    for index in range(count):
        model = make_cnn(seed + index)
        model.fit(x, y, epochs=epochs, batch_size=64, verbose=0)
        members.append(model)
        progress.add(1)
    return members


def compose_all(members, x_val, y_val, x_train, y_train, verbose=1, seed=0):
    """Every composition of this library over ``members``: ``{label: keras.Model}``."""
    import keras

    import ensemblekit as ek

    steps = ["ensembles", "optimize_weights", "select", "stack", "fuse", "calibrate"]
    progress = keras.utils.Progbar(len(steps), unit_name="step", verbose=verbose)
    composed = {f"ensemble {m}": ek.ensemble(members, m) for m in
                ("mean", "logit_mean", "geometric", "vote")}
    progress.add(1)
    weights = ek.optimize_weights(members, x_val, y_val)
    composed["optimize_weights (weighted)"] = ek.ensemble(members, "weighted", weights=weights)
    progress.add(1)
    chosen = ek.select(members, x_val, y_val)
    counts = np.bincount(chosen, minlength=len(members))
    composed["select (Caruana)"] = ek.ensemble(members, "weighted", weights=counts.tolist())
    progress.add(1)
    composed["stack logistic"] = ek.stack(members, x_val, y_val, meta="logistic", cv=5, seed=seed, verbose=0)
    progress.add(1)
    fused = ek.fuse(members, taps=-2, fusion="concat")  # the Flatten before each classifier
    fused.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy")
    fused.fit(x_train, y_train, epochs=5, batch_size=64, verbose=0)
    composed["fuse concat (new head)"] = fused
    progress.add(1)
    composed["calibrate(ensemble mean)"] = ek.calibrate(composed["ensemble mean"], x_val, y_val)
    progress.add(1)
    return composed


def format_table(rows):
    """A Markdown table of ``[(label, metrics dict)]``."""
    lines = ["| model | accuracy | NLL | Brier | ECE |", "|---|---:|---:|---:|---:|"]
    for label, scores in rows:
        lines.append(
            f"| {label} | {scores['accuracy']:.4f} | {scores['nll']:.4f} | "
            f"{scores['brier']:.4f} | {scores['ece']:.4f} |"
        )
    return "\n".join(lines)


def run_demo(members=5, epochs=15, seed=0, verbose=1, json_path=None):
    """Train, compose, evaluate; return ``[(label, metrics)]`` (members first)."""
    import ensemblekit as ek
    from ensemblekit.datasets import load_mnist1d

    start = time.perf_counter()
    (x, y), (x_test, y_test) = load_mnist1d()
    x_train, y_train = x[:-VALIDATION], y[:-VALIDATION]
    x_val, y_val = x[-VALIDATION:], y[-VALIDATION:]
    trained = train_members(x_train, y_train, count=members, epochs=epochs, seed=seed, verbose=verbose)
    composed = compose_all(trained, x_val, y_val, x_train, y_train, verbose=verbose, seed=seed)
    rows = [(f"member {m.name}", ek.evaluate(m, x_test, y_test)) for m in trained]
    rows += [(label, ek.evaluate(model, x_test, y_test)) for label, model in composed.items()]
    elapsed = time.perf_counter() - start
    if json_path:
        from pathlib import Path

        Path(json_path).write_text(json.dumps(
            {"seconds": elapsed, "members": members, "epochs": epochs, "seed": seed,
             "results": dict(rows)}, indent=2))
    return rows, elapsed


def _run_cli(args):
    rows, elapsed = run_demo(members=args.members, epochs=args.epochs, seed=args.seed,
                             verbose=0 if args.quiet else 1, json_path=args.json)
    print(f"\nmnist1d test set (1000 sequences); {args.members} CNN members; {elapsed:.0f} s in all\n")
    print(format_table(rows))
    return 0


def register_cli(subparsers):
    parser = subparsers.add_parser("demo", help="train members on mnist1d and compare every composition")
    parser.add_argument("--members", type=int, default=5, help="how many members to train (default 5)")
    parser.add_argument("--epochs", type=int, default=15, help="training epochs per member (default 15)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the first member (default 0)")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.set_defaults(run=_run_cli)
