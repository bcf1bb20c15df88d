"""``ensemblekit serve MODEL.keras``: the HTTP prediction service from the command line."""

from __future__ import annotations

import sys

from ensemblekit.deploy.serve import DEFAULT_MAX_BODY_BYTES


def register_cli(subparsers):
    """Add the ``serve`` sub-command."""
    parser = subparsers.add_parser(
        "serve",
        help="serve a .keras model over HTTP (TensorFlow Serving REST API, micro-batching)",
        description=(
            "Serve MODEL over HTTP: POST /v1/models/NAME:predict with {\"instances\": [...]} "
            "answers {\"predictions\": [...]}, as TensorFlow Serving does; docs at /docs. "
            "Stops cleanly on Ctrl-C or SIGTERM."
        ),
    )
    parser.add_argument("model", help="path to a .keras (or .h5) model, loaded in safe_mode")
    parser.add_argument("--name", default=None, help="model name in the URL (default: file stem)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="TCP port; 0 picks a free one")
    parser.add_argument("--max-batch", type=int, default=64, help="most rows per model call (1: off)")
    parser.add_argument("--max-wait-ms", type=float, default=5.0,
                        help="how long a request waits for others to share its model call")
    parser.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES,
                        help="larger request bodies get HTTP 413")
    parser.add_argument("--log-level", default="warning",
                        choices=["critical", "error", "warning", "info", "debug"])
    parser.set_defaults(run=run)
    return parser


def _announce(service):
    print(
        f"ensemblekit serve: POST {service.model_url}:predict (docs: {service.url}/docs); "
        "Ctrl-C or SIGTERM stops.",
        flush=True,
    )


def run(args):
    from ensemblekit.deploy.serve import serve

    serve(args.model, name=args.name, host=args.host, port=args.port, max_batch=args.max_batch,
          max_wait_ms=args.max_wait_ms, max_body_bytes=args.max_body_bytes,
          log_level=args.log_level, on_ready=_announce)
    print("ensemblekit serve: stopped.", file=sys.stderr, flush=True)
    return 0
