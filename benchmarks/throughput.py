"""Ensemble throughput, every path side by side: ``python -m benchmarks.throughput [--quick]``.

Writes benchmarks/results/throughput.{json,md,png} (``--quick``: throughput_quick.*).
``--workloads mobilenetv2`` times K=4 MobileNetV2 members, ``ek.pack`` vs ``ek.ensemble``
(each through ``compile_for_inference``) at batch 1/32/256, into throughput_mobilenetv2.*.
The harness lives in ``ensemblekit.bench.throughput``; ``ensemblekit bench throughput``
runs the same thing.
"""

import argparse
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from ensemblekit.bench.throughput import add_arguments, main  # noqa: E402

if __name__ == "__main__":
    parser = add_arguments(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    sys.exit(main(parser.parse_args()))
