"""An HTTP prediction service speaking TensorFlow Serving's REST API, with micro-batching.

``POST /v1/models/NAME:predict`` with ``{"instances": [...]}`` returns
``{"predictions": [...]}`` (the row format; the columnar ``{"inputs": ...}`` ->
``{"outputs": ...}`` works too) and ``GET /v1/models/NAME`` returns the model
status, exactly as TensorFlow Serving does, so clients can move to TensorFlow
Serving with the SavedModel from :func:`ensemblekit.deploy.export` unchanged.
FastAPI serves the OpenAPI docs at ``/docs``.

Production behaviour follows TensorFlow Serving too: the port opens at once and
every allowed batch size is compiled on a probe batch in the background; until
then the status says ``LOADING`` and ``:predict`` answers 503 with
``Retry-After``, then ``AVAILABLE``. ``GET /healthz`` is a plain liveness
check, ``GET /metrics`` exposes Prometheus metrics, a full queue answers 503 at
once and a request over ``timeout_ms`` answers 504. On SIGTERM the server stops
accepting, finishes every accepted request (at most ``drain_timeout_s``) and exits.
"""

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import threading
import time

import keras
import numpy as np

from ensemblekit._graph import model_input_shape, model_output_shape
from ensemblekit._io import load_model
from ensemblekit.deploy.batching import MicroBatcher, QueueFull
from ensemblekit.deploy.export import batch_fits

DEFAULT_MAX_BODY_BYTES = 8 * 1024 * 1024
DEFAULT_DRAIN_TIMEOUT_S = 30.0
RETRY_AFTER_S = 1
_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
_EXAMPLE_NOTE = 'expected {"instances": [instance, ...]} or {"inputs": [instance, ...]}'


def _require_serving_stack():
    try:
        import fastapi  # noqa: F401
        import prometheus_client  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as error:
        raise ImportError(
            f'serving needs {error.name}, which is not installed; pip install "ensemblekit[serve]"'
        ) from None


class RequestError(Exception):
    """A client mistake: answered with ``status`` and one line, never a traceback."""

    def __init__(self, status, message, retry_after=None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.retry_after = retry_after


class ServedModel:
    """A model ready to serve: its name, input contract and one compiled predict call.

    Args:
        model: a single-input, single-output ``keras.Model`` or a path to a
            ``.keras``/``.h5`` file (loaded in ``safe_mode``).
        name: the name in the URL (default: the file's stem, or ``model.name``).
        safe_mode: passed to ``keras.saving.load_model`` for paths.

    Attributes:
        load_seconds: time spent loading the file (0 for an in-memory model).
    """

    def __init__(self, model, name=None, safe_mode=True):
        started = time.perf_counter()
        if isinstance(model, (str, os.PathLike)):
            name = name or os.path.splitext(os.path.basename(os.fspath(model)))[0]
            model = load_model(model, safe_mode=safe_mode)
        self.load_seconds = time.perf_counter() - started
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

    def status(self, state="AVAILABLE", error_message=""):
        """TensorFlow Serving's status body: ``LOADING``, ``AVAILABLE`` or ``END`` (failed)."""
        error_code = "UNKNOWN" if error_message else "OK"
        return {
            "model_version_status": [
                {"version": "1", "state": state,
                 "status": {"error_code": error_code, "error_message": error_message}}
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


class _ModelSlot:
    """One served model with its batcher and readiness (``LOADING`` -> ``AVAILABLE`` or ``END``)."""

    def __init__(self, served, batcher):
        self.served = served
        self.batcher = batcher
        self.state = "LOADING"
        self.error_message = ""
        self.warm_up_seconds = None

    async def warm_up(self):
        """Compile every allowed batch size in the model thread; record the outcome."""
        started = time.perf_counter()
        try:
            await self.batcher.run_in_worker(self.served.warm_up, self.batcher.allowed_batch_sizes)
        except Exception as error:  # noqa: BLE001 - reported in the status, not raised
            self.state, self.error_message = "END", f"warm-up failed: {type(error).__name__}: {error}"
            return
        self.warm_up_seconds = time.perf_counter() - started
        self.state = "AVAILABLE"

    def check_available(self):
        if self.state == "LOADING":
            raise RequestError(503, f"model {self.served.name!r} is warming up (state LOADING); "
                                    "try again shortly.", retry_after=RETRY_AFTER_S)
        if self.state != "AVAILABLE":
            raise RequestError(503, f"model {self.served.name!r} is not available: {self.error_message}")


class _Metrics:
    """The Prometheus metrics of one app, in its own registry (apps in one process never clash)."""

    def __init__(self, slots, batch_buckets):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        kw = {"registry": self.registry}
        self.requests = Counter("ensemblekit_requests", "HTTP requests by route and status code.",
                                ["route", "status"], **kw)
        self.latency = Histogram("ensemblekit_request_duration_seconds", "HTTP request latency by route.",
                                 ["route"], **kw)
        self.batch_rows = Histogram("ensemblekit_batch_rows", "Rows per model call, padding not counted.",
                                    ["model"], buckets=[*batch_buckets, float("inf")], **kw)
        self.padding_rows = Counter("ensemblekit_padding_rows", "Zero rows added to reach an allowed batch size.",
                                    ["model"], **kw)
        queue_depth = Gauge("ensemblekit_queue_depth", "Requests waiting for a model call.", ["model"], **kw)
        load = Gauge("ensemblekit_model_load_seconds", "Time spent loading the model file.", ["model"], **kw)
        self.warm_up = Gauge("ensemblekit_warmup_seconds", "Time spent compiling the allowed batch sizes.",
                             ["model"], **kw)
        for name, slot in slots.items():
            queue_depth.labels(name).set_function(lambda batcher=slot.batcher: batcher.queue_depth)
            load.labels(name).set(slot.served.load_seconds)

    def on_call(self, name):
        """A ``MicroBatcher.on_call`` hook recording one model call of ``name``."""
        batch_rows, padding_rows = self.batch_rows.labels(name), self.padding_rows.labels(name)

        def record(rows, padding):
            batch_rows.observe(rows)
            padding_rows.inc(padding)
        return record

    def middleware(self, app):
        """Pure ASGI middleware counting each HTTP request by route template and status."""

        async def count_requests(scope, receive, send):
            if scope["type"] != "http":
                return await app(scope, receive, send)
            started, status = time.perf_counter(), [500]

            async def send_recording_status(message):
                if message["type"] == "http.response.start":
                    status[0] = message["status"]
                await send(message)

            try:
                await app(scope, receive, send_recording_status)
            finally:
                route = getattr(scope.get("route"), "path", "unmatched")
                self.requests.labels(route, str(status[0])).inc()
                self.latency.labels(route).observe(time.perf_counter() - started)
        return count_requests


def build_app(served, max_batch=64, max_wait_ms=5.0, max_body_bytes=DEFAULT_MAX_BODY_BYTES,
              allowed_batch_sizes=None, max_enqueued=None, timeout_ms=None):
    """The FastAPI application serving :class:`ServedModel` s through :class:`MicroBatcher` s.

    Warm-up runs in the background once the app starts: each model's status is
    ``LOADING`` (its ``:predict`` answers 503 with ``Retry-After``) until every
    allowed batch size has run once, then ``AVAILABLE``.

    Args:
        served: the :class:`ServedModel`, or a list of them with distinct names.
        max_batch: most rows per model call; ``1`` calls the model once per request.
        max_wait_ms: how long a request waits for others to share its call.
        max_body_bytes: larger request bodies get 413.
        allowed_batch_sizes: batch sizes the model is compiled for, ending
            with ``max_batch``; batches are padded with zero rows up to the next
            one (default: powers of two up to ``max_batch``).
        max_enqueued: most requests waiting per model; more get 503 at once
            (default ``8 * max_batch``).
        timeout_ms: a request not answered within this gets 504 (default: none).

    Returns:
        A ``fastapi.FastAPI`` app; ``app.state.batcher`` is the (first) model's
        batcher, ``app.state.ready`` a ``threading.Event`` set once warm-up ends,
        ``app.state.registry`` its Prometheus registry.

    Example:
        >>> import keras
        >>> from ensemblekit.deploy import build_app
        >>> from ensemblekit.deploy.serve import ServedModel
        >>> model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(3)], name="tiny")
        >>> app = build_app(ServedModel(model), max_batch=4)
        >>> sorted(route.path for route in app.routes if route.path.startswith("/v1"))
        ['/v1/models/{name}', '/v1/models/{name}/metadata', '/v1/models/{name}:predict']
        >>> app.state.batcher.max_batch, app.state.batcher.allowed_batch_sizes
        (4, (1, 2, 4))
    """
    _require_serving_stack()
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, PlainTextResponse
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
    from starlette.exceptions import HTTPException

    if not isinstance(max_body_bytes, int) or max_body_bytes < 1:
        raise ValueError(f"max_body_bytes is {max_body_bytes!r}; it must be a positive integer.")
    served_models = list(served) if isinstance(served, (list, tuple)) else [served]
    names = [s.name for s in served_models]
    if not names or len(set(names)) != len(names):
        raise ValueError(f"model names are {names}; give at least one model and each a distinct name.")
    slots = {}
    for model in served_models:
        batcher = MicroBatcher(model.predict, max_batch=max_batch, max_wait_ms=max_wait_ms,
                               allowed_batch_sizes=allowed_batch_sizes, max_enqueued=max_enqueued,
                               timeout_ms=timeout_ms)
        slots[model.name] = _ModelSlot(model, batcher)
    first = slots[names[0]]
    metrics = _Metrics(slots, first.batcher.allowed_batch_sizes)
    for name, slot in slots.items():
        slot.batcher.on_call = metrics.on_call(name)
    ready = threading.Event()

    async def warm_up_all():
        try:
            for name, slot in slots.items():
                await slot.warm_up()
                if slot.warm_up_seconds is not None:
                    metrics.warm_up.labels(name).set(slot.warm_up_seconds)
        finally:
            ready.set()

    @contextlib.asynccontextmanager
    async def lifespan(app):
        async with contextlib.AsyncExitStack() as stack:
            for slot in slots.values():
                await stack.enter_async_context(slot.batcher)
            warming = asyncio.get_running_loop().create_task(warm_up_all())
            try:
                yield
            finally:
                warming.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await warming

    app = FastAPI(
        title=f"ensemblekit: {', '.join(names)}",
        description="TensorFlow Serving compatible REST API (row and columnar predict formats).",
        lifespan=lifespan,
    )
    app.add_middleware(metrics.middleware)
    app.state.batcher = first.batcher
    app.state.served = first.served
    app.state.slots = slots
    app.state.ready = ready
    app.state.registry = metrics.registry

    def error(status, message, retry_after=None):
        headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
        return JSONResponse({"error": message}, status_code=status, headers=headers)

    def slot_named(name):
        if name not in slots:
            raise RequestError(404, f"model {name!r} is not served here; the served "
                                    f"model{'s are' if len(slots) > 1 else ' is'} {', '.join(map(repr, slots))}.")
        return slots[name]

    @app.exception_handler(RequestError)
    async def on_request_error(request, exc):
        return error(exc.status, exc.message, exc.retry_after)

    @app.exception_handler(HTTPException)
    async def on_http_error(request, exc):
        return error(exc.status_code, f"{exc.detail}: {request.method} {request.url.path}; expected "
                     f"GET /v1/models/{first.served.name} or POST /v1/models/{first.served.name}:predict.")

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request, exc):
        return error(422, f"invalid request to {request.url.path}; {_EXAMPLE_NOTE}.")

    @app.exception_handler(Exception)
    async def on_unexpected(request, exc):
        return error(500, f"internal error while predicting ({type(exc).__name__}); see the server log.")

    @app.get("/healthz", summary="Liveness: 200 while the process serves HTTP")
    async def healthz():
        return {"status": "ok"}

    @app.get("/metrics", summary="Prometheus metrics", response_class=PlainTextResponse)
    async def prometheus_metrics():
        return PlainTextResponse(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models/{name}", summary="Model status (TensorFlow Serving format)")
    async def model_status(name: str):
        slot = slot_named(name)
        return slot.served.status(slot.state, slot.error_message)

    @app.get("/v1/models/{name}/metadata", summary="Input and output shapes")
    async def model_metadata(name: str):
        return slot_named(name).served.metadata()

    @app.post("/v1/models/{name}:predict", summary="Predict", openapi_extra=_PREDICT_BODY)
    async def predict(name: str, request: Request):
        slot = slot_named(name)
        slot.check_available()
        with slot.batcher.arriving():
            key, rows = slot.served.parse(await _read_body(request, max_body_bytes))
        try:
            outputs = await slot.batcher.predict(rows)
        except QueueFull as full:
            raise RequestError(503, str(full), retry_after=RETRY_AFTER_S) from None
        except TimeoutError as late:
            raise RequestError(504, str(late)) from None
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
        model_url: ``url + "/v1/models/NAME"`` of the (first) model.
        model_urls: ``{name: url + "/v1/models/NAME"}`` for every served model.
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

    def __init__(self, app, sock, log_level="warning", drain_timeout_s=DEFAULT_DRAIN_TIMEOUT_S):
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

        if not drain_timeout_s > 0:
            raise ValueError(f"drain_timeout_s is {drain_timeout_s!r}; it must be a number > 0.")
        self.app = app
        self.drain_timeout_s = drain_timeout_s
        self._sock = sock
        # On SIGTERM uvicorn stops accepting, lets accepted requests finish for at most
        # timeout_graceful_shutdown seconds, then runs the lifespan shutdown (the batchers).
        self._server = _Server(uvicorn.Config(app, log_level=log_level, lifespan="on",
                                              timeout_graceful_shutdown=drain_timeout_s))
        self._thread = None
        host, port = sock.getsockname()[:2]
        self.url = f"http://{f'[{host}]' if ':' in host else host}:{port}"
        self.model_urls = {name: f"{self.url}/v1/models/{name}" for name in app.state.slots}
        self.model_url = f"{self.url}/v1/models/{app.state.served.name}"

    def run(self, on_ready=None):
        """Serve in this thread until SIGINT/SIGTERM (or ``stop()`` from another thread).

        ``on_ready(service)`` is called once warm-up has ended. Uses uvloop's event
        loop when it is installed (the ``serve`` extra brings it).
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
        while not (self._server.started and self.app.state.ready.is_set()) and not task.done():
            await asyncio.sleep(0.01)
        if self._server.started and on_ready is not None:
            on_ready(self)
        await task
        self._sock.close()
        if not self._server.started:
            raise RuntimeError("the server did not start; see the log above.")

    @property
    def states(self):
        """``{name: state}``: ``LOADING``, ``AVAILABLE`` or ``END`` (warm-up failed)."""
        return {name: slot.state for name, slot in self.app.state.slots.items()}

    def wait_ready(self, timeout=300):
        """Block until warm-up has ended; raise ``RuntimeError`` if a model failed it or time ran out."""
        if not self.app.state.ready.wait(timeout):
            raise RuntimeError(f"the models are still warming up after {timeout} s.")
        failed = [f"{name}: {slot.error_message}" for name, slot in self.app.state.slots.items()
                  if slot.state != "AVAILABLE"]
        if failed:
            raise RuntimeError(f"model not available ({'; '.join(failed)}).")
        return self

    def start(self, timeout=120, wait_ready=True):
        """Serve from a background thread; return once requests are accepted (and warm-up ended)."""
        self._thread = threading.Thread(target=self.run, name="ensemblekit-serve", daemon=True)
        self._thread.start()
        while not self._server.started and self._thread.is_alive() and timeout > 0:
            self._thread.join(0.02)
            timeout -= 0.02
        if not self._server.started:
            self.stop()
            raise RuntimeError("the server did not start; see the log above.")
        if wait_ready:
            try:
                self.wait_ready()
            except RuntimeError:
                self.stop()
                raise
        return self

    def stop(self, timeout=None):
        """Stop accepting, finish the accepted requests, stop the batchers and free the port.

        Waits at most ``timeout`` seconds (default: ``drain_timeout_s`` plus 10).
        """
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(self.drain_timeout_s + 10 if timeout is None else timeout)
            self._thread = None
        self._sock.close()

    @property
    def batch_sizes(self):
        """Rows of each model call so far (of the first model)."""
        return list(self.app.state.batcher.batch_sizes)

    def __enter__(self):
        return self if self._thread is not None else self.start()

    def __exit__(self, *exc_info):
        self.stop()


def _served_models(model, name, safe_mode):
    """``model`` as a list of :class:`ServedModel`: one model, or a ``{name: model}`` mapping."""
    if isinstance(model, dict):
        if name is not None:
            raise ValueError("name is given but model is a {name: model} mapping; give one or the other.")
        return [_served_models(m, n, safe_mode)[0] for n, m in model.items()]
    if isinstance(model, ServedModel):
        return [model]
    return [ServedModel(model, name=name, safe_mode=safe_mode)]


def serve(model, name=None, host="127.0.0.1", port=8000, max_batch=64, max_wait_ms=5.0,
          max_body_bytes=DEFAULT_MAX_BODY_BYTES, block=True, safe_mode=True, log_level="warning",
          on_ready=None, allowed_batch_sizes=None, max_enqueued=None, timeout_ms=None,
          drain_timeout_s=DEFAULT_DRAIN_TIMEOUT_S, wait_ready=True):
    """Serve a model over HTTP with TensorFlow Serving's REST API and dynamic micro-batching.

    Concurrent requests arriving within ``max_wait_ms`` share one compiled
    model call of at most ``max_batch`` rows, padded with zero rows up to the
    next of ``allowed_batch_sizes``; each caller gets its own rows. Bad
    requests (invalid JSON, wrong shape, non-numeric values, unknown model
    name, bodies over ``max_body_bytes``) get a 4xx with one line
    ``{"error": "..."}`` and the server keeps serving. The port opens at once;
    ``:predict`` answers 503 with ``Retry-After`` until warm-up has compiled
    every allowed batch size, or while ``max_enqueued`` requests wait.

    Args:
        model: a single-input, single-output ``keras.Model``, a path to a
            ``.keras``/``.h5`` file (loaded in ``safe_mode``), or a
            ``{name: model or path}`` mapping to serve several at
            ``/v1/models/NAME`` each.
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
        on_ready: optional ``fn(service)`` called once warm-up has ended.
        allowed_batch_sizes: increasing batch sizes ending with ``max_batch``,
            each compiled at start (default: powers of two up to ``max_batch``).
        max_enqueued: most requests waiting per model; more get 503 at once
            (default ``8 * max_batch``).
        timeout_ms: a request not answered within this gets 504 (default: none).
        drain_timeout_s: on SIGTERM/``stop()``, how long accepted requests may
            still take before they are cancelled.
        wait_ready: with ``block=False``, return only after warm-up (``False``:
            return once the port accepts; see :meth:`Service.wait_ready`).

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
    app = build_app(_served_models(model, name, safe_mode), max_batch=max_batch,
                    max_wait_ms=max_wait_ms, max_body_bytes=max_body_bytes,
                    allowed_batch_sizes=allowed_batch_sizes, max_enqueued=max_enqueued,
                    timeout_ms=timeout_ms)
    service = Service(app, _bind(host, port), log_level=log_level, drain_timeout_s=drain_timeout_s)
    if not block:
        return service.start(wait_ready=wait_ready)
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
