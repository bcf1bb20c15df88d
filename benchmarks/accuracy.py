"""Accuracy of every composition vs its cost: ``python -m benchmarks.accuracy [--quick]``.

Writes benchmarks/results/accuracy.{json,md}, accuracy_pareto_<set>.png and
accuracy_reliability.png (``--quick``: accuracy_quick.*). The harness lives in
``ensemblekit.bench.accuracy``; ``ensemblekit bench accuracy`` runs the same thing.
"""

import argparse
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from ensemblekit.bench.accuracy import add_arguments, main  # noqa: E402
from ensemblekit.cli import _quiet_tensorflow_logger  # noqa: E402

if __name__ == "__main__":
    parser = add_arguments(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    arguments = parser.parse_args()
    _quiet_tensorflow_logger()  # retracing notices from the many small models
    sys.exit(main(arguments))
