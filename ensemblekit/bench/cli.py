"""``ensemblekit bench throughput|accuracy``: the benchmarks from the command line."""

from __future__ import annotations


def register_cli(subparsers):
    """Add ``bench`` with its ``throughput`` and ``accuracy`` sub-commands to the ``ensemblekit`` command."""
    bench = subparsers.add_parser("bench", help="run benchmarks")
    kinds = bench.add_subparsers(dest="benchmark", required=True)
    throughput = kinds.add_parser(
        "throughput", help="samples/s of every way to run an ensemble (predict loop ... ek.pack + XLA)"
    )
    from ensemblekit.bench.throughput import add_arguments

    add_arguments(throughput)
    throughput.set_defaults(run=_run_throughput)
    accuracy = kinds.add_parser(
        "accuracy", help="accuracy / NLL / Brier / ECE vs params, MACs, samples/s of every composition"
    )
    from ensemblekit.bench.accuracy import add_arguments as add_accuracy_arguments

    add_accuracy_arguments(accuracy)
    accuracy.set_defaults(run=_run_accuracy)


def _run_throughput(args):
    from ensemblekit.bench.throughput import main

    return main(args)


def _run_accuracy(args):
    from ensemblekit.bench.accuracy import main

    return main(args)
