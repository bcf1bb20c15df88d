"""``ensemblekit serve MODEL.keras``: the HTTP prediction service from the command line.

Models are given as one path, as ``NAME=PATH`` pairs, or as a models config
file (``--models-config FILE``, JSON or YAML) naming each model and its versions.
"""

from __future__ import annotations

import argparse
import re
import sys

from ensemblekit.deploy.batching import DEFAULT_MAX_BATCH, DEFAULT_MAX_WAIT_MS
from ensemblekit.deploy.models_config import load_models_config
from ensemblekit.deploy.serve import DEFAULT_DRAIN_TIMEOUT_S, DEFAULT_MAX_BODY_BYTES

_NAMED_MODEL = re.compile(r"^([A-Za-z0-9][A-Za-z0-9_.\-]*)=(.+)$")


def _batch_sizes(text):
    """``"1,8,32,64"`` -> ``[1, 8, 32, 64]``."""
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a comma-separated list of integers, e.g. 1,8,32,64"
        ) from None


def register_cli(subparsers):
    """Add the ``serve`` sub-command."""
    parser = subparsers.add_parser(
        "serve",
        help="serve .keras models over HTTP (TensorFlow Serving REST API, micro-batching)",
        description=(
            "Serve MODEL over HTTP: POST /v1/models/NAME:predict with {\"instances\": [...]} "
            "answers {\"predictions\": [...]}, as TensorFlow Serving does; GET /v1/models/NAME "
            "says LOADING until every allowed batch size is compiled, then AVAILABLE; "
            "GET /healthz (liveness), GET /metrics (Prometheus), docs at /docs. "
            "On Ctrl-C or SIGTERM stops accepting, finishes accepted requests and exits 0."
        ),
    )
    parser.add_argument("models", nargs="*", metavar="MODEL",
                        help="path to a .keras (or .h5) model, loaded in safe_mode; "
                             "NAME=PATH serves several, each at /v1/models/NAME")
    parser.add_argument("--models-config", default=None, metavar="FILE",
                        help="JSON/YAML file naming each model and its versions, instead of MODEL: "
                             "models: [{name: m, versions: {1: a.keras, 2: b.keras}}, "
                             "{name: n, path: n.keras}]; /v1/models/NAME uses the highest version, "
                             "/v1/models/NAME/versions/N a given one")
    parser.add_argument("--name", default=None, help="model name in the URL (default: file stem)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="TCP port; 0 picks a free one")
    parser.add_argument("--max-batch", type=int, default=DEFAULT_MAX_BATCH,
                        help=f"most rows per model call (1: off; default {DEFAULT_MAX_BATCH})")
    parser.add_argument("--max-wait-ms", type=float, default=DEFAULT_MAX_WAIT_MS,
                        help="how long a request waits for others to share its model call")
    parser.add_argument("--allowed-batch-sizes", type=_batch_sizes, default=None, metavar="N,N,...",
                        help="batch sizes compiled at start, ending with --max-batch; each call is "
                             "padded with zero rows up to the next (default: powers of two)")
    parser.add_argument("--max-enqueued", type=int, default=None,
                        help="most requests waiting per model; more get 503 + Retry-After at once "
                             "(default: 8 x max-batch)")
    parser.add_argument("--timeout-ms", type=float, default=None,
                        help="a request not answered within this gets 504 (default: no limit)")
    parser.add_argument("--drain-timeout-s", type=float, default=DEFAULT_DRAIN_TIMEOUT_S,
                        help="on SIGTERM, how long accepted requests may still take")
    parser.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES,
                        help="larger request bodies get HTTP 413")
    parser.add_argument("--log-level", default="warning",
                        choices=["critical", "error", "warning", "info", "debug"])
    parser.set_defaults(run=run)
    return parser


def model_arguments(models, name=None, models_config=None):
    """The ``serve`` model argument from the command line: one path, ``{NAME: PATH}``, or the config's.

    With ``models_config`` (a JSON/YAML file): ``{NAME: {VERSION: PATH}}`` read from it.
    """
    if models_config is not None:
        if models or name is not None:
            raise ValueError("--models-config names the models; give no MODEL paths and no --name with it.")
        return load_models_config(models_config)
    if not models:
        raise ValueError("give a MODEL path, NAME=PATH pairs, or --models-config FILE.")
    matches = [_NAMED_MODEL.match(m) for m in models]
    if len(models) == 1 and matches[0] is None:
        return models[0]
    if not all(matches):
        raise ValueError(f"serving several models needs NAME=PATH for each; got {' '.join(models)}.")
    if name is not None:
        raise ValueError("--name cannot be used with NAME=PATH models; the names are given there.")
    pairs = [match.groups() for match in matches]
    names = [n for n, _ in pairs]
    if len(set(names)) != len(names):
        raise ValueError(f"model names repeat: {' '.join(names)}; each NAME must be distinct.")
    return dict(pairs)


def _announce(service):
    urls = ", ".join(f"POST {url}:predict" for url in service.model_urls.values())
    print(f"ensemblekit serve: {urls} (docs: {service.url}/docs); Ctrl-C or SIGTERM stops.", flush=True)
    failed = {name: state for name, state in service.states.items() if state != "AVAILABLE"}
    if failed:
        print(f"ensemblekit serve: not available after warm-up: {failed}; see GET /v1/models/NAME.",
              file=sys.stderr, flush=True)


def run(args):
    from ensemblekit.deploy.serve import serve

    model = model_arguments(args.models, args.name, args.models_config)
    serve(model, name=None if isinstance(model, dict) else args.name, host=args.host, port=args.port,
          max_batch=args.max_batch, max_wait_ms=args.max_wait_ms,
          allowed_batch_sizes=args.allowed_batch_sizes, max_enqueued=args.max_enqueued,
          timeout_ms=args.timeout_ms, drain_timeout_s=args.drain_timeout_s,
          max_body_bytes=args.max_body_bytes, log_level=args.log_level, on_ready=_announce)
    print("ensemblekit serve: stopped.", file=sys.stderr, flush=True)
    return 0
