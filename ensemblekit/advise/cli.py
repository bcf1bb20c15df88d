"""``ensemblekit advise m1.keras m2.keras ... --data mnist1d|digits|file.npz``."""

from __future__ import annotations

import json

import numpy as np

from ensemblekit.advise.core import METRICS, advise
from ensemblekit.costs import COSTS


def register_cli(subparsers):
    """Add ``ensemblekit advise m1.keras m2.keras ... --data mnist1d|digits|file.npz``.

    Example:
        >>> import argparse
        >>> parser = argparse.ArgumentParser()
        >>> register_cli(parser.add_subparsers())
        >>> parser.parse_args(["advise", "a.keras", "b.keras", "--data", "digits"]).budget is None
        True
    """
    parser = subparsers.add_parser(
        "advise", help="merge or ensemble? score every option on held-out data and recommend one",
        description="Measure soups, aligned merges, TIES and output ensembles of the members on "
                    "held-out data (half to fit, half to score) and recommend one within a budget.")
    parser.add_argument("models", nargs="+", help="member .keras/.h5 files (at least 2)")
    parser.add_argument("--data", required=True,
                        help="mnist1d or digits (their test split), or an .npz with x_val/y_val (or x/y)")
    parser.add_argument("--budget", type=float, default=None, help="single-member costs allowed (1.0 = one)")
    parser.add_argument("--cost", choices=COSTS, default="params")
    parser.add_argument("--metric", choices=METRICS, default="nll")
    parser.add_argument("--base", default=None, help="the model the members were fine-tuned from (enables TIES)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the fit/score split")
    parser.add_argument("--json", default=None, help="also write the advice as JSON to this path")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(run=_run_cli)


def _cli_data(spec, input_shape):
    if spec in ("mnist1d", "digits"):
        from ensemblekit.datasets import load_digits, load_mnist1d

        _, (x, y) = load_mnist1d() if spec == "mnist1d" else load_digits()
    elif spec.endswith(".npz"):
        try:
            arrays = np.load(spec)
        except OSError as error:
            raise ValueError(f"--data: could not read {spec!r}: {error}") from None
        keys = ("x_val", "y_val") if "x_val" in arrays else ("x", "y")
        if not all(k in arrays for k in keys):
            raise ValueError(f"--data: {spec!r} needs arrays x_val and y_val (or x and y); has {sorted(arrays)}.")
        x, y = arrays[keys[0]], arrays[keys[1]]
    else:
        raise ValueError(f"--data must be mnist1d, digits or an .npz file, got {spec!r}.")
    if None not in input_shape and x.shape[1:] != tuple(input_shape) and \
            int(np.prod(x.shape[1:])) == int(np.prod(input_shape)):
        x = x.reshape((len(x), *input_shape))  # e.g. mnist1d (n, 40, 1) for a (40,) member
    return x, y


def _run_cli(args):
    from ensemblekit._graph import model_input_shape
    from ensemblekit._io import load_members

    models = load_members(args.models, min_count=2, what="advise")
    x, y = _cli_data(args.data, model_input_shape(models[0]))
    advice = advise(models, x, y, budget=args.budget, cost=args.cost, metric=args.metric,
                    base=args.base, verbose=0 if args.quiet else 1, seed=args.seed)
    if args.quiet:
        print(advice)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(advice.to_dict(), handle, indent=2)
        print(f"advice written to {args.json}")
    return 0
