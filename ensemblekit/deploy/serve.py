"""An HTTP prediction service speaking TensorFlow Serving's REST API, with micro-batching.

``POST /v1/models/NAME:predict`` with ``{"instances": [...]}`` returns
``{"predictions": [...]}`` (the row format; the columnar ``{"inputs": ...}`` ->
``{"outputs": ...}`` works too) and ``GET /v1/models/NAME`` returns the model
status, exactly as TensorFlow Serving does, so clients can move to TensorFlow
Serving with the SavedModel from :func:`ensemblekit.deploy.export` unchanged.
FastAPI serves the OpenAPI docs at ``/docs``.

Versions and names follow TensorFlow Serving as well: ``GET /v1/models/NAME``
lists ``model_version_status`` for every version, ``/v1/models/NAME/versions/N``
(status, ``/metadata``, ``:predict``) addresses one, and unversioned routes use
the highest. Models with several named inputs take ``{"instances": [{"a": ...,
"b": ...}, ...]}`` or ``{"inputs": {"a": [...], "b": [...]}}``; models with
several outputs answer each by name (``{"predictions": [{"out1": ..., ...}]}``
or ``{"outputs": {"out1": [...], ...}}``); ``/metadata`` lists every input and
output with its name, dtype and shape. The predict function is traced once per
input shape; ``ensemblekit_compilations_total`` counts the new shapes (zero
after warm-up when every batch is padded to an allowed size), and under JAX
``ensemblekit_jax_backend_compiles`` counts XLA compilations via ``jax.monitoring``.

Production behaviour follows TensorFlow Serving too: the port opens at once and
every allowed batch size is compiled on a probe batch in the background; until
then the status says ``LOADING`` and ``:predict`` answers 503 with
``Retry-After``, then ``AVAILABLE``. ``GET /healthz`` is a plain liveness
check, ``GET /metrics`` exposes Prometheus metrics, a full queue answers 503 at
once (before routing and parsing, so shedding load stays cheap) and a request
over ``timeout_ms`` answers 504; each answer carries ``Server-Timing: app;dur=MS``. On SIGTERM the server stops
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

from ensemblekit._io import load_model
from ensemblekit.deploy.batching import (
    DEFAULT_MAX_BATCH,
    DEFAULT_MAX_WAIT_MS,
    MicroBatcher,
    QueueFull,
)
from ensemblekit.deploy.export import batch_fits
from ensemblekit.deploy.models_config import load_models_config

DEFAULT_MAX_BODY_BYTES = 8 * 1024 * 1024
DEFAULT_DRAIN_TIMEOUT_S = 30.0
RETRY_AFTER_S = 1
CLIENT_CLOSED_REQUEST = 499
SHUTDOWN_READ_GRACE_S = 0.25
_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
_PREDICT_PATH = re.compile(r"^/v1/models/([^/:]+)(?:/versions/([0-9]+))?:predict$")
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
    """A model ready to serve: its name, version, named inputs and outputs, and one predict call.

    Single-input models take ``{"instances": [row, ...]}`` (or ``{"inputs": [row, ...]}``);
    models with several inputs take a dict per instance, ``{"instances": [{"a": ..., "b": ...}]}``,
    or columns, ``{"inputs": {"a": [...], "b": [...]}}``. Models with several
    outputs (a list or a dict of outputs) answer every output by name.

    Args:
        model: a ``keras.Model``, a path to a ``.keras``/``.h5`` file (loaded in ``safe_mode``),
            or a TensorFlow SavedModel directory (``ensemblekit._io.load_savedmodel``).
        name: the name in the URL (default: the file's stem, or ``model.name``).
        safe_mode: passed to ``keras.saving.load_model`` for paths.
        version: the version number served at ``/v1/models/NAME/versions/N`` (default 1).

    Attributes:
        load_seconds: time spent loading the file (0 for an in-memory model).
        inputs: ``{input name: (shape without the batch axis, dtype)}`` in the model's order.
        outputs: ``{output name: shape without the batch axis}``.
        signatures: the distinct input shapes the predict function has been called
            with; each new one is a trace and compile of the backend's predict function.
    """

    def __init__(self, model, name=None, safe_mode=True, version=1):
        started = time.perf_counter()
        if isinstance(model, (str, os.PathLike)):
            path = os.fspath(model)
            model = load_model(path, safe_mode=safe_mode)
            # a SavedModel folder's name is often a version ("models/clf/1"): its model is "clf_1"
            name = name or (model.name if os.path.isdir(path) else os.path.splitext(os.path.basename(path))[0])
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
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise ValueError(f"version of model {name!r} is {version!r}; it must be an integer >= 1.")
        if not getattr(model, "inputs", None) or not getattr(model, "outputs", None):
            raise ValueError(f"Model {name!r} is not built (no inputs); call it on data or give it "
                             "a keras.Input first.")
        self.model, self.name, self.version = model, name, version
        self.inputs = {tensor.name: (tuple(tensor.shape[1:]), keras.backend.standardize_dtype(tensor.dtype))
                       for tensor in model.inputs}
        if len(self.inputs) != len(model.inputs):
            raise ValueError(f"Model {name!r} has inputs with repeated names "
                             f"{[t.name for t in model.inputs]}; name each keras.Input distinctly.")
        try:
            output = model.output  # the {name: tensor} dict of a functional model with dict outputs
        except AttributeError:  # a Sequential model not called since loading; its outputs are a list
            output = None
        if isinstance(output, dict):
            names, tensors = list(output), list(output.values())
        else:
            tensors = list(model.outputs)
            names = list(getattr(model, "output_names", None) or [t.name for t in tensors])
        self.outputs = {n: tuple(t.shape[1:]) for n, t in zip(names, tensors)}
        self._output_dtypes = [keras.backend.standardize_dtype(t.dtype) for t in tensors]
        self.named_inputs = len(self.inputs) > 1
        self.named_outputs = len(self.outputs) > 1
        self.input_shape, self.dtype = next(iter(self.inputs.values()))
        self.output_shape = next(iter(self.outputs.values()))
        self.signatures = set()
        self.on_new_signature = None

    def _signature(self, rows):
        if isinstance(rows, dict):
            return tuple((n, np.shape(v)) for n, v in sorted(rows.items()))
        return np.shape(rows)

    def predict(self, rows):
        """One compiled call of the model on a batch (an array, or ``{input name: array}``).

        Returns an array, or ``{output name: array}`` for a model with several outputs.
        """
        signature = self._signature(rows)
        if signature not in self.signatures:
            self.signatures.add(signature)
            if self.on_new_signature is not None:
                self.on_new_signature()
        answer = self.model.predict_on_batch(rows)
        if isinstance(answer, dict):
            answer = [answer[n] for n in self.outputs]
        elif not isinstance(answer, (list, tuple)):
            answer = [answer]
        arrays = [np.asarray(keras.ops.convert_to_numpy(a)) for a in answer]
        return dict(zip(self.outputs, arrays)) if self.named_outputs else arrays[0]

    def probe_rows(self, size):
        """Zero rows of batch ``size`` for every input (unknown dimensions: 1)."""
        rows = {n: np.zeros([size, *(1 if d is None else d for d in shape)], dtype)
                for n, (shape, dtype) in self.inputs.items()}
        return rows if self.named_inputs else next(iter(rows.values()))

    def warm_up(self, batch_sizes):
        """Trace and compile the predict function before the first request."""
        for size in batch_sizes:
            self.predict(self.probe_rows(size))

    def describe_instance(self, input_name=None):
        if input_name is None and self.named_inputs:
            return "instances {" + ", ".join(
                f'"{n}": shape {_shape_text(shape)}' for n, (shape, _) in self.inputs.items()) + "}"
        shape = self.inputs[input_name][0] if input_name else self.input_shape
        return f"instances of shape {_shape_text(shape)}"

    def _error(self, message):
        return RequestError(400, f"model {self.name!r}: {message}")

    def _array(self, key, values, input_name):
        """One input's values as a checked array of shape ``(n, *input shape)``."""
        shape, dtype = self.inputs[input_name]
        where = f'"{key}"' if not self.named_inputs else f'input "{input_name}" of "{key}"'
        expected = self.describe_instance(input_name)
        if not isinstance(values, list) or not values:
            raise self._error(f"{where} must be a non-empty list of {expected}.")
        try:
            array = np.asarray(values)
        except (ValueError, TypeError):
            raise self._error(f"{where} is ragged; expected {expected}, all alike.") from None
        if array.dtype.kind not in "iuf":
            raise self._error(f"{where} holds non-numeric values; expected numbers, {expected}.")
        if not batch_fits(array.shape, shape):
            raise self._error(
                f"{where} has shape {array.shape}; expected {expected}, i.e. "
                f"(n, {', '.join('?' if d is None else str(d) for d in shape)}).")
        if not np.all(np.isfinite(array)):
            raise self._error(f"{where} holds NaN or infinity; expected finite numbers.")
        return array.astype(dtype)

    def _check_names(self, given, where):
        missing = [n for n in self.inputs if n not in given]
        unknown = [n for n in given if n not in self.inputs]
        if missing or unknown:
            problem = (f"lacks input {missing[0]!r}" if missing else f"has unknown input {unknown[0]!r}")
            raise self._error(f"{where} {problem}; the inputs are {', '.join(map(repr, self.inputs))}.")

    def _named_rows(self, key, columns):
        """``{input name: list}`` -> checked arrays with one row count; one array for one input."""
        arrays = {n: self._array(key, columns[n], n) for n in self.inputs}
        counts = {n: len(a) for n, a in arrays.items()}
        if len(set(counts.values())) > 1:
            raise self._error(f'the inputs of "{key}" have different numbers of rows: '
                              + ", ".join(f"{n} {c}" for n, c in counts.items()) + ".")
        return arrays if self.named_inputs else next(iter(arrays.values()))

    def parse(self, body):
        """Turn a request body into ``(key, rows)``; raise ``RequestError`` on any mistake.

        ``rows`` is an array, or ``{input name: array}`` for a model with several inputs.
        """
        try:
            payload = json.loads(body)
        except (ValueError, RecursionError) as error:
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise RequestError(400, f"request body is not valid JSON ({reason}); {_EXAMPLE_NOTE}.") from None
        key = next((k for k in ("instances", "inputs") if isinstance(payload, dict) and k in payload), None)
        if key is None:
            raise RequestError(400, f"{_EXAMPLE_NOTE}, with {self.describe_instance()}.")
        values = payload[key]
        if key == "inputs" and isinstance(values, dict):
            self._check_names(values, '"inputs"')
            return key, self._named_rows(key, values)
        if isinstance(values, list) and values and any(isinstance(v, dict) for v in values):
            for index, instance in enumerate(values):
                if not isinstance(instance, dict):
                    raise self._error(f'instance {index} of "{key}" is not a {{input name: value}} '
                                      f"object like the others; expected {self.describe_instance()}.")
                self._check_names(instance, f'instance {index} of "{key}"')
            return key, self._named_rows(key, {n: [v[n] for v in values] for n in self.inputs})
        if self.named_inputs:
            names = ", ".join(f'"{n}": ...' for n in self.inputs)
            raise self._error(f"it has inputs {', '.join(map(repr, self.inputs))}; send "
                              f'{{"instances": [{{{names}}}, ...]}} or {{"inputs": {{{names}}}}}.')
        return key, self._array(key, values, next(iter(self.inputs)))

    def answer(self, key, outputs):
        """The response body: ``predictions`` (row format) or ``outputs`` (columnar), by name if several."""
        if not self.named_outputs:
            return {"predictions" if key == "instances" else "outputs": outputs.tolist()}
        if key == "inputs":
            return {"outputs": {n: v.tolist() for n, v in outputs.items()}}
        columns = {n: v.tolist() for n, v in outputs.items()}
        return {"predictions": [dict(zip(columns, row)) for row in zip(*columns.values())]}

    def version_status(self, state="AVAILABLE", error_message=""):
        """One entry of TensorFlow Serving's ``model_version_status``."""
        return {"version": str(self.version), "state": state,
                "status": {"error_code": "UNKNOWN" if error_message else "OK",
                           "error_message": error_message}}

    def status(self, state="AVAILABLE", error_message=""):
        """TensorFlow Serving's status body: ``LOADING``, ``AVAILABLE`` or ``END`` (failed)."""
        return {"model_version_status": [self.version_status(state, error_message)]}

    def metadata(self):
        """Every input and output with name, dtype and shape (``-1``: any size).

        ``signature_def`` lists them by name; ``inputs``/``outputs`` are the one
        tensor of a single-input/single-output model, else the same by-name dicts.
        """
        def tensor(name, shape, dtype):
            return {"name": name, "dtype": dtype,
                    "tensor_shape": [-1, *(-1 if d is None else d for d in shape)]}

        inputs = {n: tensor(n, shape, dtype) for n, (shape, dtype) in self.inputs.items()}
        outputs = {n: tensor(n, shape, dtype) for (n, shape), dtype
                   in zip(self.outputs.items(), self._output_dtypes)}
        return {
            "model_spec": {"name": self.name, "version": str(self.version)},
            "metadata": {
                "inputs": inputs if self.named_inputs else next(iter(inputs.values())),
                "outputs": outputs if self.named_outputs else next(iter(outputs.values())),
                "signature_def": {"inputs": inputs, "outputs": outputs},
            },
        }


def _shape_text(shape):
    return str(tuple("?" if d is None else d for d in shape))


async def _read_body(request, limit):
    """The request body, refusing anything over ``limit`` bytes before reading it all."""
    declared = request.headers.get("content-length", "")
    too_large = f"request body is larger than the limit of {limit} bytes (--max-body-bytes)."
    if declared.isdigit() and int(declared) > limit:
        raise RequestError(413, too_large)
    from starlette.requests import ClientDisconnect

    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise RequestError(413, too_large)
            chunks.append(chunk)
    except ClientDisconnect:
        # nginx's 499 "client closed request": counted in /metrics, never delivered, no traceback.
        raise RequestError(CLIENT_CLOSED_REQUEST, "the client closed the connection before sending "
                                                  "the whole body.") from None
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
            raise RequestError(503, f"model {self.served.name!r} version {self.served.version} is "
                                    "warming up (state LOADING); try again shortly.",
                               retry_after=RETRY_AFTER_S)
        if self.state != "AVAILABLE":
            raise RequestError(503, f"model {self.served.name!r} version {self.served.version} is "
                                    f"not available: {self.error_message}")


def _labels(served):
    return served.name, str(served.version)


_JAX_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
_jax_compiles = {"count": 0, "listening": False}


def _jax_backend_compiles():
    """XLA compilations so far in this process, counted by a ``jax.monitoring`` listener."""
    if not _jax_compiles["listening"]:
        import jax.monitoring

        def count(event, duration_secs, **kwargs):
            if event == _JAX_COMPILE_EVENT:
                _jax_compiles["count"] += 1

        jax.monitoring.register_event_duration_secs_listener(count)
        _jax_compiles["listening"] = True
    return _jax_compiles["count"]


def _shed_when_full(app, versions, slots):
    """Pure ASGI middleware: ``:predict`` for a model whose queue is full gets 503 before routing.

    Under overload most requests are refused; refusing them here, before FastAPI
    routes them and before their body is read, keeps each refusal much cheaper
    than an answer, so the accepted requests keep the CPU.
    """
    from types import SimpleNamespace

    async def shed(scope, receive, send):
        match = _PREDICT_PATH.match(scope["path"]) if scope["type"] == "http" else None
        if match is not None and scope["method"] == "POST":
            name, version = match.groups()
            slot = slots.get(name) if version is None else versions.get(name, {}).get(int(version))
            if slot is not None and slot.state == "AVAILABLE" and slot.batcher.full:
                template = "/v1/models/{name}" + ("/versions/{version}" if version else "") + ":predict"
                scope["route"] = SimpleNamespace(path=template)  # the metrics' route label
                body = json.dumps({"error": f"{slot.batcher.max_enqueued} requests are already "
                                            "waiting (max_enqueued); try again later."}).encode()
                await send({"type": "http.response.start", "status": 503, "headers": [
                    (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                    (b"retry-after", str(RETRY_AFTER_S).encode())]})
                await send({"type": "http.response.body", "body": body})
                return
        await app(scope, receive, send)
    return shed


class _Metrics:
    """The Prometheus metrics of one app, in its own registry (apps in one process never clash)."""

    def __init__(self, slots, batch_buckets):
        """``slots``: every :class:`_ModelSlot` (all versions); model metrics carry ``model`` and ``version``."""
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        kw = {"registry": self.registry}
        self.requests = Counter("ensemblekit_requests", "HTTP requests by route and status code.",
                                ["route", "status"], **kw)
        self.latency = Histogram("ensemblekit_request_duration_seconds", "HTTP request latency by route.",
                                 ["route"], **kw)
        model = ["model", "version"]
        self.batch_rows = Histogram("ensemblekit_batch_rows", "Rows per model call, padding not counted.",
                                    model, buckets=[*batch_buckets, float("inf")], **kw)
        self.padding_rows = Counter("ensemblekit_padding_rows", "Zero rows added to reach an allowed batch size.",
                                    model, **kw)
        queue_depth = Gauge("ensemblekit_queue_depth", "Requests waiting for a model call.", model, **kw)
        load = Gauge("ensemblekit_model_load_seconds", "Time spent loading the model file.", model, **kw)
        self.warm_up = Gauge("ensemblekit_warmup_seconds", "Time spent compiling the allowed batch sizes.",
                             model, **kw)
        compilations = Counter(
            "ensemblekit_compilations", "New input shape signatures reaching the model's predict "
            "function, warm-up included: each is one trace and compile of it.", model, **kw)
        for slot in slots:
            labels = _labels(slot.served)
            queue_depth.labels(*labels).set_function(lambda batcher=slot.batcher: batcher.queue_depth)
            load.labels(*labels).set(slot.served.load_seconds)
            slot.served.on_new_signature = compilations.labels(*labels).inc
        if keras.backend.backend() == "jax":
            _jax_backend_compiles()  # listen from now on, warm-up included
            Gauge("ensemblekit_jax_backend_compiles", "XLA compilations in this process since it "
                  "started (jax.monitoring backend_compile events), all models and warm-up included.",
                  **kw).set_function(_jax_backend_compiles)

    def on_call(self, served):
        """A ``MicroBatcher.on_call`` hook recording one model call of ``served``."""
        labels = _labels(served)
        batch_rows, padding_rows = self.batch_rows.labels(*labels), self.padding_rows.labels(*labels)

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


def build_app(served, max_batch=DEFAULT_MAX_BATCH, max_wait_ms=DEFAULT_MAX_WAIT_MS,
              max_body_bytes=DEFAULT_MAX_BODY_BYTES,
              allowed_batch_sizes=None, max_enqueued=None, timeout_ms=None):
    """The FastAPI application serving :class:`ServedModel` s through :class:`MicroBatcher` s.

    Warm-up runs in the background once the app starts: each model's status is
    ``LOADING`` (its ``:predict`` answers 503 with ``Retry-After``) until every
    allowed batch size has run once, then ``AVAILABLE``.

    Args:
        served: the :class:`ServedModel`, or a list of them; each (name, version)
            once. ``/v1/models/NAME`` lists every version of NAME, and its
            ``:predict`` and ``/metadata`` use the highest version;
            ``/v1/models/NAME/versions/N`` addresses version N.
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
        ``app.state.registry`` its Prometheus registry, ``app.state.slots``
        ``{name: slot of the highest version}`` and ``app.state.versions``
        ``{name: {version: slot}}``.

    Example:
        >>> import keras
        >>> from ensemblekit.deploy import build_app
        >>> from ensemblekit.deploy.serve import ServedModel
        >>> model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(3)], name="tiny")
        >>> app = build_app(ServedModel(model), max_batch=4)
        >>> sorted(route.path for route in app.routes if route.path.startswith("/v1"))
        ['/v1/models/{name}', '/v1/models/{name}/metadata', '/v1/models/{name}/versions/{version}', '/v1/models/{name}/versions/{version}/metadata', '/v1/models/{name}/versions/{version}:predict', '/v1/models/{name}:predict']
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
    keys = [f"{s.name} version {s.version}" for s in served_models]
    if not keys or len(set(keys)) != len(keys):
        raise ValueError(f"models are {keys}; give at least one model and each name and version once.")
    versions = {}
    for model in served_models:
        batcher = MicroBatcher(model.predict, max_batch=max_batch, max_wait_ms=max_wait_ms,
                               allowed_batch_sizes=allowed_batch_sizes, max_enqueued=max_enqueued,
                               timeout_ms=timeout_ms)
        versions.setdefault(model.name, {})[model.version] = _ModelSlot(model, batcher)
    versions = {name: dict(sorted(by_version.items())) for name, by_version in versions.items()}
    slots = {name: by_version[max(by_version)] for name, by_version in versions.items()}
    every_slot = [slot for by_version in versions.values() for slot in by_version.values()]
    names = list(slots)
    first = slots[names[0]]
    metrics = _Metrics(every_slot, first.batcher.allowed_batch_sizes)
    for slot in every_slot:
        slot.batcher.on_call = metrics.on_call(slot.served)
    ready = threading.Event()

    async def warm_up_all():
        try:
            for slot in every_slot:
                await slot.warm_up()
                if slot.warm_up_seconds is not None:
                    metrics.warm_up.labels(*_labels(slot.served)).set(slot.warm_up_seconds)
        finally:
            ready.set()

    @contextlib.asynccontextmanager
    async def lifespan(app):
        async with contextlib.AsyncExitStack() as stack:
            for slot in every_slot:
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
    app.add_middleware(lambda inner: _shed_when_full(inner, versions, slots))
    app.add_middleware(metrics.middleware)  # added last: outermost, so it counts the shed requests too
    app.state.batcher = first.batcher
    app.state.served = first.served
    app.state.slots = slots
    app.state.versions = versions
    app.state.ready = ready
    app.state.registry = metrics.registry

    def error(status, message, retry_after=None):
        headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
        return JSONResponse({"error": message}, status_code=status, headers=headers)

    def slot_named(name, version=None):
        """The slot of ``name`` at ``version`` (a URL segment; ``None``: the highest version)."""
        if name not in slots:
            raise RequestError(404, f"model {name!r} is not served here; the served "
                                    f"model{'s are' if len(slots) > 1 else ' is'} {', '.join(map(repr, slots))}.")
        if version is None:
            return slots[name]
        by_version = versions[name]
        if not (version.isdigit() and int(version) in by_version):
            raise RequestError(404, f"model {name!r} has no version {version!r}; its versions are "
                                    f"{', '.join(map(str, by_version))}.")
        return by_version[int(version)]

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

    @app.get("/v1/models/{name}", summary="Status of every version (TensorFlow Serving format)")
    async def model_status(name: str):
        slot_named(name)
        return {"model_version_status": [slot.served.version_status(slot.state, slot.error_message)
                                         for slot in versions[name].values()]}

    @app.get("/v1/models/{name}/versions/{version}", summary="Status of one version")
    async def model_version_status(name: str, version: str):
        slot = slot_named(name, version)
        return slot.served.status(slot.state, slot.error_message)

    @app.get("/v1/models/{name}/metadata", summary="Inputs and outputs: names, dtypes, shapes")
    async def model_metadata(name: str):
        return slot_named(name).served.metadata()

    @app.get("/v1/models/{name}/versions/{version}/metadata", summary="Metadata of one version")
    async def model_version_metadata(name: str, version: str):
        return slot_named(name, version).served.metadata()

    async def predict_with(slot, request):
        started = time.perf_counter()
        slot.check_available()
        try:
            slot.batcher.check_room()  # a full queue sheds load before the body is read and parsed
            with slot.batcher.arriving():
                key, rows = slot.served.parse(await _read_body(request, max_body_bytes))
            outputs = await slot.batcher.predict(rows)
        except QueueFull as full:
            raise RequestError(503, str(full), retry_after=RETRY_AFTER_S) from None
        except TimeoutError as late:
            raise RequestError(504, str(late)) from None
        # Server-Timing: time from routing to the answer (body read, queue, model call), so a
        # client can tell the server's share of a latency from the network's and its own.
        server_ms = (time.perf_counter() - started) * 1000
        return JSONResponse(slot.served.answer(key, outputs), headers={"server-timing": f"app;dur={server_ms:.2f}"})

    @app.post("/v1/models/{name}:predict", summary="Predict (highest version)", openapi_extra=_PREDICT_BODY)
    async def predict(name: str, request: Request):
        return await predict_with(slot_named(name), request)

    @app.post("/v1/models/{name}/versions/{version}:predict", summary="Predict with one version",
              openapi_extra=_PREDICT_BODY)
    async def predict_version(name: str, version: str, request: Request):
        return await predict_with(slot_named(name, version), request)

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

            async def shutdown(self, sockets=None):
                # Stop accepting, then let requests already in accepted connections' buffers be
                # read: uvicorn closes a connection with no parsed request as idle, which would
                # reset a request the client had already sent.
                for server in self.servers:
                    server.close()
                await asyncio.sleep(SHUTDOWN_READ_GRACE_S)
                await super().shutdown(sockets)

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
        """``{name: state}`` of each model's highest version: ``LOADING``, ``AVAILABLE`` or ``END`` (failed)."""
        return {name: slot.state for name, slot in self.app.state.slots.items()}

    @property
    def version_states(self):
        """``{name: {version: state}}`` for every served version."""
        return {name: {version: slot.state for version, slot in by_version.items()}
                for name, by_version in self.app.state.versions.items()}

    def wait_ready(self, timeout=300):
        """Block until warm-up has ended; raise ``RuntimeError`` if a model failed it or time ran out."""
        if not self.app.state.ready.wait(timeout):
            raise RuntimeError(f"the models are still warming up after {timeout} s.")
        failed = [f"{name}: {slot.error_message}" for name, by_version in self.app.state.versions.items()
                  for slot in by_version.values() if slot.state != "AVAILABLE"]
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


def _served_models(model, name, safe_mode, version=1):
    """``model`` as a list of :class:`ServedModel`.

    ``model`` is one model (or path), ``{name: model}``, or ``{name: {version: model}}``.
    """
    if isinstance(model, dict):
        if name is not None:
            raise ValueError("name is given but model is a {name: model} mapping; give one or the other.")
        return [served for n, m in model.items() for served in _versions_of(m, n, safe_mode)]
    if isinstance(model, ServedModel):
        return [model]
    return [ServedModel(model, name=name, safe_mode=safe_mode, version=version)]


def _versions_of(model, name, safe_mode):
    if not isinstance(model, dict):
        return _served_models(model, name, safe_mode)
    if not model:
        raise ValueError(f"model {name!r} has no versions; give {{version: model or path}}.")
    served = []
    for version, versioned in model.items():
        if isinstance(version, bool) or not str(version).isdigit() or int(version) < 1:
            raise ValueError(f"model {name!r} has version {version!r}; versions are integers >= 1.")
        served += _served_models(versioned, name, safe_mode, version=int(version))
    return served


def serve(model=None, name=None, host="127.0.0.1", port=8000, max_batch=DEFAULT_MAX_BATCH,
          max_wait_ms=DEFAULT_MAX_WAIT_MS, max_body_bytes=DEFAULT_MAX_BODY_BYTES, block=True,
          safe_mode=True, log_level="warning", on_ready=None, allowed_batch_sizes=None,
          max_enqueued=None, timeout_ms=None, drain_timeout_s=DEFAULT_DRAIN_TIMEOUT_S,
          wait_ready=True, models_config=None):
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
        model: a ``keras.Model`` (with one input or several named ones), a
            path to a ``.keras``/``.h5`` file (loaded in ``safe_mode``) or a
            TensorFlow SavedModel directory (TensorFlow backend), a
            ``{name: model or path}`` mapping to serve several at
            ``/v1/models/NAME`` each, or ``{name: {version: model or path}}``
            to serve versions at ``/v1/models/NAME/versions/N`` (unversioned
            routes use the highest; a model without versions is version 1).
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
        models_config: instead of ``model``, a JSON/YAML file naming each model
            and its versions (see :mod:`ensemblekit.deploy.models_config`).

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
    if (model is None) == (models_config is None):
        raise ValueError("give either model or models_config (a JSON/YAML file), not both or neither.")
    if models_config is not None:
        model = load_models_config(models_config)
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
