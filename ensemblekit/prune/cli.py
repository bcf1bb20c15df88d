"""``ensemblekit prune magnitude|channels|report``: pruning from the command line."""

from __future__ import annotations

import json


def register_cli(subparsers):
    """Add ``prune`` with ``magnitude``, ``channels`` and ``report`` sub-commands."""
    prune = subparsers.add_parser("prune", help="prune a .keras model (magnitude, channels, report)")
    kinds = prune.add_subparsers(dest="prune_command", required=True)

    magnitude = kinds.add_parser("magnitude", help="zero the smallest weights (no fine-tune), save stripped")
    _paths(magnitude)
    magnitude.add_argument("--sparsity", type=float, default=0.8, help="fraction of kernel weights to zero")
    magnitude.add_argument("--scope", choices=("global", "layer"), default="global")
    magnitude.add_argument("--n-m", default=None, help="N:M pattern such as 2:4 (instead of --sparsity)")
    magnitude.set_defaults(run=_run_magnitude)

    channels = kinds.add_parser("channels", help="remove channels: a smaller, faster model")
    _paths(channels)
    channels.add_argument("--ratio", type=float, default=0.5, help="fraction of channels removed per group")
    channels.add_argument("--importance", choices=("l1", "l2", "bn_scale"), default="l1")
    channels.add_argument("--round-to", type=int, default=None)
    channels.add_argument("--global-ranking", action="store_true")
    channels.set_defaults(run=_run_channels)

    report = kinds.add_parser("report", help="compare two models: params, zeros, MACs, size, latency")
    report.add_argument("before")
    report.add_argument("after")
    report.add_argument("--repeats", type=int, default=7)
    report.set_defaults(run=_run_report)


def _paths(parser):
    parser.add_argument("model", help="input .keras/.h5 model")
    parser.add_argument("output", help="where to save the pruned .keras model")


def _save(model, path):
    from ensemblekit._io import atomic_save

    print(f"saved {atomic_save(model, path)}")


def _run_magnitude(args):
    from ensemblekit._io import load_model
    from ensemblekit.prune.magnitude import magnitude, sparsity_of, strip

    n_m = None
    if args.n_m:
        try:
            n_m = tuple(int(part) for part in args.n_m.split(":"))
        except ValueError:
            raise ValueError(f"--n-m must look like 2:4, got {args.n_m!r}.") from None
    pruned = strip(magnitude(load_model(args.model), args.sparsity, scope=args.scope, n_m=n_m))
    print(f"kernel sparsity {sparsity_of(pruned):.3f}")
    _save(pruned, args.output)


def _run_channels(args):
    from ensemblekit._io import load_model
    from ensemblekit.prune.channels import channels

    model = load_model(args.model)
    pruned = channels(model, args.ratio, importance=args.importance, round_to=args.round_to,
                      global_ranking=args.global_ranking)
    print(f"parameters {model.count_params():,} -> {pruned.count_params():,}")
    _save(pruned, args.output)


def _run_report(args):
    from ensemblekit._io import load_model
    from ensemblekit.prune.report import report

    result = report(load_model(args.before, label="before"), load_model(args.after, label="after"),
                    repeats=args.repeats)
    print(json.dumps(result, indent=2))
