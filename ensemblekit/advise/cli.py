"""``ensemblekit advise m1.keras m2.keras ... --data mnist1d|digits|file.npz``."""

from __future__ import annotations

import json

from ensemblekit.advise.core import TASK_METRICS, TASKS, advise
from ensemblekit.costs import COSTS
from ensemblekit.datasets import load_data_spec


def register_cli(subparsers):
    """Add ``ensemblekit advise m1.keras m2.keras ... --data mnist1d|digits|file.npz``.

    Example:
        >>> import argparse
        >>> parser = argparse.ArgumentParser()
        >>> register_cli(parser.add_subparsers())
        >>> parser.parse_args(["advise", "a.keras", "b.keras", "--data", "digits"]).budget is None
        True
        >>> args = parser.parse_args(["advise", "a.keras", "b.keras", "--data", "v.npz", "--task", "regression"])
        >>> args.task, args.metric
        ('regression', None)
        >>> args = parser.parse_args(["advise", "a.keras", "b.keras", "--data", "v.npz", "--task", "multilabel",
        ...                           "--metric", "auroc"])
        >>> args.task, args.metric
        ('multilabel', 'auroc')
    """
    parser = subparsers.add_parser(
        "advise", help="merge or ensemble? score every option on held-out data and recommend one",
        description="Measure soups, aligned merges, TIES and output ensembles of the members "
                    "(multiclass, binary, multilabel or regression) on held-out data (half to fit, half to "
                    "score; multilabel y is 0/1 of shape (n, labels)) "
                    "and recommend one within a budget.")
    parser.add_argument("models", nargs="+", help="member .keras/.h5 files (at least 2)")
    parser.add_argument("--data", required=True,
                        help="mnist1d or digits (their test split), an .npz with x_val/y_val (or x/y), a folder "
                             "of images in class subfolders (read by image_dataset_from_directory, never "
                             "held in memory), or a saved tf.data dataset directory")
    parser.add_argument("--image-size", type=int, nargs=2, metavar=("HEIGHT", "WIDTH"), default=None,
                        help="image size for a folder of images (default: the members' input size)")
    parser.add_argument("--budget", type=float, default=None, help="single-member costs allowed (1.0 = one)")
    parser.add_argument("--cost", choices=COSTS, default="params")
    metrics = list(dict.fromkeys(m for names in TASK_METRICS.values() for m in names))
    parser.add_argument("--metric", choices=metrics, default=None,
                        help="what 'best' means (default: nll for classifiers, rmse for regression; "
                             "auroc for binary and multilabel)")
    parser.add_argument("--task", choices=("auto", *TASKS), default=None,
                        help="the members' task (default: detected; a linear one-unit output needs "
                             "binary or regression, multilabel logits need multilabel)")
    parser.add_argument("--base", default=None, help="the model the members were fine-tuned from (enables TIES)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the fit/score split")
    parser.add_argument("--json", default=None, help="also write the advice as JSON to this path")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(run=_run_cli)


def _run_cli(args):
    from ensemblekit._graph import model_input_shape
    from ensemblekit._io import load_members

    models = load_members(args.models, min_count=2, what="advise")
    x, y = load_data_spec(args.data, model_input_shape(models[0]), datasets=True, image_size=args.image_size)
    advice = advise(models, x, y, budget=args.budget, cost=args.cost, metric=args.metric,
                    base=args.base, verbose=0 if args.quiet else 1, seed=args.seed, task=args.task)
    if args.quiet:
        print(advice)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(advice.to_dict(), handle, indent=2)
        print(f"advice written to {args.json}")
    return 0
