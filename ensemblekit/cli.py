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
    "ensemblekit.distill",
    "ensemblekit.deploy.cli",
    "ensemblekit.merge.cli",
    "ensemblekit.bench.cli",
    "ensemblekit.prune.cli",
    "ensemblekit.advise.cli",
    "ensemblekit.metrics",
]


# What a command raises for bad input (a missing or unwritable file, a corrupt model, a bad
# config key, a missing optional dependency): one line on stderr and status 2, no traceback.
INPUT_ERRORS = (ValueError, TypeError, KeyError, OSError, ImportError)


class _Parser(argparse.ArgumentParser):
    """``argparse`` with usage errors in ONE line; sub-command parsers inherit the class."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser():
    parser = _Parser(
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
    except INPUT_ERRORS as error:
        print(f"ensemblekit {args.command}: error: {_one_line(error)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"ensemblekit {args.command}: interrupted", file=sys.stderr)
        return 130


def _one_line(error):
    """The first line of an error's message, naming the file for ``OSError``s."""
    if isinstance(error, OSError) and error.strerror:
        where = error.filename if error.filename is not None else ""
        return f"{error.strerror}: {str(where)!r}" if where != "" else error.strerror
    if isinstance(error, KeyError) and error.args:
        text = f"{type(error).__name__}: {error.args[0]}"
    else:
        text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _quiet_tensorflow_logger():
    """Keep TensorFlow's Python warnings (e.g. retracing notices) out of command output."""
    import keras

    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        tf.get_logger().setLevel("ERROR")


if __name__ == "__main__":
    sys.exit(main())
