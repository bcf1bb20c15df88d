"""``ensemblekit bench throughput``: the throughput benchmark from the command line."""

from __future__ import annotations


def register_cli(subparsers):
    """Add ``bench`` with its ``throughput`` sub-command to the ``ensemblekit`` command."""
    bench = subparsers.add_parser("bench", help="run benchmarks")
    kinds = bench.add_subparsers(dest="benchmark", required=True)
    throughput = kinds.add_parser(
        "throughput", help="samples/s of every way to run an ensemble (predict loop ... ek.pack + XLA)"
    )
    from ensemblekit.bench.throughput import add_arguments

    add_arguments(throughput)
    throughput.set_defaults(run=_run_throughput)


def _run_throughput(args):
    from ensemblekit.bench.throughput import main

    return main(args)
