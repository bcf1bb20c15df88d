"""An HTTP prediction service speaking TensorFlow Serving's REST API, with micro-batching.

``POST /v1/models/NAME:predict`` with ``{"instances": [...]}`` returns
``{"predictions": [...]}`` (the row format; the columnar ``{"inputs": ...}`` ->
``{"outputs": ...}`` works too) and ``GET /v1/models/NAME`` returns the model
status, exactly as TensorFlow Serving does, so clients can move to TensorFlow
Serving with the SavedModel from :func:`ensemblekit.deploy.export` unchanged.
FastAPI serves the OpenAPI docs at ``/docs``.
"""

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import threading

import keras
import numpy as np

from ensemblekit._graph import model_input_shape, model_output_shape
from ensemblekit._io import load_model
from ensemblekit.deploy.batching import MicroBatcher
from ensemblekit.deploy.export import batch_fits

DEFAULT_MAX_BODY_BYTES = 8 * 1024 * 1024
_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
_EXAMPLE_NOTE = 'expected {"instances": [instance, ...]} or {"inputs": [instance, ...]}'


def _require_serving_stack():
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as error:
        raise ImportError(
            f'serving needs {error.name}, which is not installed; pip install "ensemblekit[serve]"'
        ) from None


class RequestError(Exception):
    """A client mistake: answered with ``status`` and one line, never a traceback."""

    def __init__(self, status, message):
        super().__init__(message)
        self.status = status
        self.message = message


class ServedModel:
    """A model ready to serve: its name, input contract and one compiled predict call.

    Args:
        model: a single-input, single-output ``keras.Model`` or a path to a
            ``.keras``/``.h5`` file (loaded in ``safe_mode``).
        name: the name in the URL (default: the file's stem, or ``model.name``).
        safe_mode: passed to ``keras.saving.load_model`` for paths.
    """

    def __init__(self, model, name=None, safe_mode=True):
        if isinstance(model, (str, os.PathLike)):
            name = name or os.path.splitext(os.path.basename(os.fspath(model)))[0]
            model = load_model(model, safe_mode=safe_mode)
        if not isinstance(model, keras.Model):
            raise TypeError(
                f"model must be a keras.Model or a path to a .keras file, got {type(model).__name__}."
            )
        name = name or model.name
        if not isinstance(name, str) or not _NAME_PATTERN.match(name):
            raise ValueError(
                f"name {name!r} cannot be used in a URL; use letters, digits, '_', '.' and '-'."
            )
        self.model = model
        self.name = name
        self.input_shape = model_input_shape(model)
        self.output_shape = model_output_shape(model)
        self.dtype = keras.backend.standardize_dtype(model.inputs[0].dtype)

    def predict(self, rows):
        """One compiled call of the model on a batch (the backend's predict function)."""
        return np.asarray(keras.ops.convert_to_numpy(self.model.predict_on_batch(rows)))

    def warm_up(self, batch_sizes):
        """Trace and compile the predict function before the first request."""
        for size in batch_sizes:
            shape = [size, *(1 if d is None else d for d in self.input_shape)]
            self.predict(np.zeros(shape, self.dtype))

    def describe_instance(self):
        return f"instances of shape {tuple('?' if d is None else d for d in self.input_shape)}"

    def parse(self, body):
        """Turn a request body into ``(key, array)``; raise ``RequestError`` on any mistake."""
        try:
            payload = json.loads(body)
        except (ValueError, RecursionError) as error:
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise RequestError(400, f"request body is not valid JSON ({reason}); {_EXAMPLE_NOTE}.") from None
        key = next((k for k in ("instances", "inputs") if isinstance(payload, dict) and k in payload), None)
        if key is None:
            raise RequestError(400, f"{_EXAMPLE_NOTE}, with {self.describe_instance()}.")
        values = payload[key]
        if not isinstance(values, list) or not values:
            raise RequestError(400, f'"{key}" must be a non-empty list of {self.describe_instance()}.')
        try:
            array = np.asarray(values)
        except (ValueError, TypeError):
            raise RequestError(
                400, f'"{key}" is ragged; expected {self.describe_instance()}, all alike.'
            ) from None
        if array.dtype.kind not in "iuf":
            raise RequestError(
                400, f'"{key}" holds non-numeric values; expected numbers, {self.describe_instance()}.'
            )
        if not batch_fits(array.shape, self.input_shape):
            raise RequestError(
                400,
                f'"{key}" has shape {array.shape}; expected {self.describe_instance()}, i.e. '
                f"(n, {', '.join('?' if d is None else str(d) for d in self.input_shape)}).",
            )
        if not np.all(np.isfinite(array)):
            raise RequestError(400, f'"{key}" holds NaN or infinity; expected finite numbers.')
        return key, array.astype(self.dtype)

    def status(self):
        return {
            "model_version_status": [
                {"version": "1", "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}
            ]
        }

    def metadata(self):
        def tensor(shape):
            return {"dtype": self.dtype, "tensor_shape": [-1, *(-1 if d is None else d for d in shape)]}

        return {
            "model_spec": {"name": self.name, "version": "1"},
            "metadata": {"inputs": tensor(self.input_shape), "outputs": tensor(self.output_shape)},
        }


async def _read_body(request, limit):
    """The request body, refusing anything over ``limit`` bytes before reading it all."""
    declared = request.headers.get("content-length", "")
    too_large = f"request body is larger than the limit of {limit} bytes (--max-body-bytes)."
    if declared.isdigit() and int(declared) > limit:
        raise RequestError(413, too_large)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError(413, too_large)
        chunks.append(chunk)
    return b"".join(chunks)


_PREDICT_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "instances": {"type": "array", "items": {}, "description": "row format"},
                        "inputs": {"type": "array", "items": {}, "description": "columnar format"},
                    },
                },
                "example": {"instances": [[0.0, 1.0]]},
            }
        },
    }
}


def build_app(served, max_batch=64, max_wait_ms=5.0, max_body_bytes=DEFAULT_MAX_BODY_BYTES):
    """The FastAPI application serving one :class:`ServedModel` through a :class:`MicroBatcher`.

    Args:
        served: the :class:`ServedModel`.
        max_batch: most rows per model call; ``1`` calls the model once per request.
        max_wait_ms: how long a request waits for others to share its call.
        max_body_bytes: larger request bodies get 413.

    Returns:
        A ``fastapi.FastAPI`` app; ``app.state.batcher`` is the running batcher.

    Example:
        >>> import keras
        >>> from ensemblekit.deploy import build_app
        >>> from ensemblekit.deploy.serve import ServedModel
        >>> model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(3)], name="tiny")
        >>> app = build_app(ServedModel(model), max_batch=4)
        >>> sorted(route.path for route in app.routes if route.path.startswith("/v1"))
        ['/v1/models/{name}', '/v1/models/{name}/metadata', '/v1/models/{name}:predict']
        >>> app.state.batcher.max_batch
        4
    """
    _require_serving_stack()
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException

    if not isinstance(max_body_bytes, int) or max_body_bytes < 1:
        raise ValueError(f"max_body_bytes is {max_body_bytes!r}; it must be a positive integer.")
    batcher = MicroBatcher(served.predict, max_batch=max_batch, max_wait_ms=max_wait_ms)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        async with batcher:
            await batcher.run_in_worker(served.warm_up, sorted({1, max_batch}))
            yield

    app = FastAPI(
        title=f"ensemblekit: {served.name}",
        description="TensorFlow Serving compatible REST API (row and columnar predict formats).",
        lifespan=lifespan,
    )
    app.state.batcher = batcher
    app.state.served = served

    def error(status, message):
        return JSONResponse({"error": message}, status_code=status)

    def check_name(name):
        if name != served.name:
            raise RequestError(404, f"model {name!r} is not served here; the served model is {served.name!r}.")

    @app.exception_handler(RequestError)
    async def on_request_error(request, exc):
        return error(exc.status, exc.message)

    @app.exception_handler(HTTPException)
    async def on_http_error(request, exc):
        return error(exc.status_code, f"{exc.detail}: {request.method} {request.url.path}; expected "
                     f"GET /v1/models/{served.name} or POST /v1/models/{served.name}:predict.")

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request, exc):
        return error(422, f"invalid request to {request.url.path}; {_EXAMPLE_NOTE}.")

    @app.exception_handler(Exception)
    async def on_unexpected(request, exc):
        return error(500, f"internal error while predicting ({type(exc).__name__}); see the server log.")

    @app.get("/v1/models/{name}", summary="Model status (TensorFlow Serving format)")
    async def model_status(name: str):
        check_name(name)
        return served.status()

    @app.get("/v1/models/{name}/metadata", summary="Input and output shapes")
    async def model_metadata(name: str):
        check_name(name)
        return served.metadata()

    @app.post("/v1/models/{name}:predict", summary="Predict", openapi_extra=_PREDICT_BODY)
    async def predict(name: str, request: Request):
        check_name(name)
        with batcher.arriving():
            key, rows = served.parse(await _read_body(request, max_body_bytes))
        outputs = await batcher.predict(rows)
        return JSONResponse({"predictions" if key == "instances" else "outputs": outputs.tolist()})

    return app


def _bind(host, port):
    """A listening socket on ``host:port`` (port 0: a free one), with a one-line error."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP explicitly: asyncio sets TCP_NODELAY on accepted connections only for
    # sockets that say so, and without it each reply waits ~40 ms for a delayed ACK.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as error:
        sock.close()
        raise ValueError(f"cannot listen on {host}:{port}: {error.strerror or error}.") from None
    return sock


class Service:
    """A started (or startable) server; ``stop()`` or leave the ``with`` block to shut it down.

    Attributes:
        url: the base URL, e.g. ``http://127.0.0.1:8000``.
        model_url: ``url + "/v1/models/NAME"``.
        app: the FastAPI application.

    Example:
        >>> import keras
        >>> import ensemblekit as ek
        >>> model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)], name="tiny")
        >>> service = ek.serve(model, port=0, block=False)
        >>> service.model_url.startswith("http://127.0.0.1:"), service.model_url.endswith("/tiny")
        (True, True)
        >>> service.stop()
    """

    def __init__(self, app, sock, log_level="warning"):
        import uvicorn

        class _Server(uvicorn.Server):
            # uvicorn re-raises SIGINT/SIGTERM after its graceful shutdown; we return instead.
            @contextlib.contextmanager
            def capture_signals(self):
                if threading.current_thread() is not threading.main_thread():
                    yield
                    return
                handled = (signal.SIGINT, signal.SIGTERM)
                previous = {sig: signal.signal(sig, self.handle_exit) for sig in handled}
                try:
                    yield
                finally:
                    for sig, handler in previous.items():
                        signal.signal(sig, handler)

        self.app = app
        self._sock = sock
        self._server = _Server(uvicorn.Config(app, log_level=log_level, lifespan="on"))
        self._thread = None
        host, port = sock.getsockname()[:2]
        self.url = f"http://{f'[{host}]' if ':' in host else host}:{port}"
        self.model_url = f"{self.url}/v1/models/{app.state.served.name}"

    def run(self, on_ready=None):
        """Serve in this thread until SIGINT/SIGTERM (or ``stop()`` from another thread).

        Uses uvloop's event loop when it is installed (the ``serve`` extra brings it).
        """
        try:
            import uvloop
        except ImportError:
            loop_factory = None
        else:
            loop_factory = uvloop.new_event_loop
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            runner.run(self._serve(on_ready))

    async def _serve(self, on_ready):
        task = asyncio.ensure_future(self._server.serve(sockets=[self._sock]))
        while not self._server.started and not task.done():
            await asyncio.sleep(0.01)
        if self._server.started and on_ready is not None:
            on_ready(self)
        await task
        self._sock.close()
        if not self._server.started:
            raise RuntimeError("the server did not start; see the log above.")

    def start(self, timeout=120):
        """Serve from a background thread; return once requests are accepted."""
        self._thread = threading.Thread(target=self.run, name="ensemblekit-serve", daemon=True)
        self._thread.start()
        while not self._server.started and self._thread.is_alive() and timeout > 0:
            self._thread.join(0.02)
            timeout -= 0.02
        if not self._server.started:
            self.stop()
            raise RuntimeError("the server did not start; see the log above.")
        return self

    def stop(self, timeout=30):
        """Finish the requests in flight, stop the batcher and free the port."""
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        self._sock.close()

    @property
    def batch_sizes(self):
        """Rows of each model call so far."""
        return list(self.app.state.batcher.batch_sizes)

    def __enter__(self):
        return self if self._thread is not None else self.start()

    def __exit__(self, *exc_info):
        self.stop()


def serve(model, name=None, host="127.0.0.1", port=8000, max_batch=64, max_wait_ms=5.0,
          max_body_bytes=DEFAULT_MAX_BODY_BYTES, block=True, safe_mode=True, log_level="warning",
          on_ready=None):
    """Serve a model over HTTP with TensorFlow Serving's REST API and dynamic micro-batching.

    Concurrent requests arriving within ``max_wait_ms`` share one compiled
    model call of at most ``max_batch`` rows; each caller gets its own rows.
    Bad requests (invalid JSON, wrong shape, non-numeric values, unknown model
    name, bodies over ``max_body_bytes``) get a 4xx with one line
    ``{"error": "..."}`` and the server keeps serving.

    Args:
        model: a single-input, single-output ``keras.Model`` or a path to a
            ``.keras``/``.h5`` file (loaded in ``safe_mode``).
        name: the model name in the URL (default: file stem or ``model.name``).
        host: address to bind; loopback by default, so nothing outside this
            machine can connect unless you say so.
        port: TCP port; ``0`` picks a free one (see ``Service.url``).
        max_batch: most rows per model call; ``1`` turns batching off.
        max_wait_ms: how long the first request of a batch waits for more.
        max_body_bytes: larger request bodies are refused with 413.
        block: ``True`` serves until SIGINT/SIGTERM; ``False`` starts a
            background thread and returns the running :class:`Service` (use
            this inside notebooks and other running event loops).
        safe_mode: passed to ``keras.saving.load_model`` for paths.
        log_level: uvicorn's log level.
        on_ready: optional ``fn(service)`` called once requests are accepted.

    Returns:
        ``None`` after a blocking run, else the started :class:`Service`.

    Example:
        >>> import keras, httpx
        >>> import ensemblekit as ek
        >>> members = [keras.Sequential([keras.Input((2,)), keras.layers.Dense(3)]) for _ in range(2)]
        >>> with ek.deploy.serve(ek.ensemble(members), name="demo", port=0, block=False) as service:
        ...     reply = httpx.post(service.model_url + ":predict", json={"instances": [[1.0, 2.0]]})
        >>> reply.status_code, len(reply.json()["predictions"][0])
        (200, 3)
    """
    _require_serving_stack()
    served = ServedModel(model, name=name, safe_mode=safe_mode)
    app = build_app(served, max_batch=max_batch, max_wait_ms=max_wait_ms, max_body_bytes=max_body_bytes)
    service = Service(app, _bind(host, port), log_level=log_level)
    if not block:
        return service.start()
    service.run(on_ready)
    return None


@contextlib.contextmanager
def running(model, port=0, **kwargs):
    """Serve ``model`` from a background thread for the ``with`` block; yields the :class:`Service`.

    Example:
        >>> import keras, httpx
        >>> import ensemblekit as ek
        >>> model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)], name="tiny")
        >>> with ek.deploy.running(model) as service:
        ...     httpx.get(service.model_url).json()["model_version_status"][0]["state"]
        'AVAILABLE'
    """
    service = serve(model, port=port, block=False, **kwargs)
    try:
        yield service
    finally:
        service.stop()
