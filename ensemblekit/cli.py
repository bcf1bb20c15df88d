"""The ``ensemblekit`` command: ``ensemblekit demo``, ``ensemblekit merge ...``, ...

Each capability registers its sub-command through a module-level
``register_cli(subparsers)`` function; the modules are listed in
``COMMAND_MODULES`` and imported only when the command line is parsed, so
``ensemblekit --help`` stays fast and a missing optional dependency only
affects its own command.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

COMMAND_MODULES = [
    "ensemblekit.demo",
    "ensemblekit.deploy.cli",
    "ensemblekit.merge.cli",
    "ensemblekit.bench.cli",
    "ensemblekit.prune.cli",
    "ensemblekit.advise",
]


def build_parser():
    parser = argparse.ArgumentParser(
        prog="ensemblekit", description="Compose several trained Keras 3 models into one."
    )
    subparsers = parser.add_subparsers(dest="command", required=True)
    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).register_cli(subparsers)
    return parser


def main(argv=None):
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    parser = build_parser()
    args = parser.parse_args(argv)
    _quiet_tensorflow_logger()
    try:
        return args.run(args) or 0
    except (ValueError, TypeError) as error:
        print(f"ensemblekit {args.command}: error: {error}", file=sys.stderr)
        return 2


def _quiet_tensorflow_logger():
    """Keep TensorFlow's Python warnings (e.g. retracing notices) out of command output."""
    import keras

    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        tf.get_logger().setLevel("ERROR")


if __name__ == "__main__":
    sys.exit(main())
