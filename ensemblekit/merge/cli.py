"""``ensemblekit merge config.yaml -o merged.keras``."""

from __future__ import annotations


def _run(args):
    from ensemblekit.merge.config import merge_from_config

    path = merge_from_config(args.config, output=args.output, verbose=0 if args.quiet else 1)
    print(f"merged model saved to {path}")
    return 0


def register_cli(subparsers):
    """Add the ``merge`` sub-command."""
    parser = subparsers.add_parser(
        "merge", help="merge models of one architecture into one (YAML/JSON config)",
        description="Merge Keras models per a config file: method, models, base, weights, parameters.",
    )
    parser.add_argument("config", help="YAML or JSON merge config")
    parser.add_argument("-o", "--output", help="where to save the merged .keras file")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(run=_run)
