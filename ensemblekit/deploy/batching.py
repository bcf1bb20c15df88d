"""Dynamic micro-batching: concurrent requests share one model call.

The idea is the dynamic batcher of TensorFlow Serving and NVIDIA Triton
(Crankshaw et al., "Clipper: A Low-Latency Online Prediction Serving System",
NSDI 2017): requests that arrive within ``max_wait_ms`` of each other are
stacked into one batch of at most ``max_batch`` rows, the model runs once, and
each caller gets back exactly its own rows. Unlike a fixed timeout, the batcher
waits only for requests it knows are on their way (see
:meth:`MicroBatcher.arriving`), so a lone client pays no waiting time, while
requests that pile up during a model call form the next batch.

As in TensorFlow Serving's batching parameters, every batch is padded with zero
rows up to the next of ``allowed_batch_sizes`` (the padding rows are dropped
from the answers), so the model only ever sees a fixed set of batch shapes,
each compiled once; at most ``max_enqueued`` requests wait, and the one after
them is refused at once (:class:`QueueFull`) rather than left waiting without bound.

Rows are an array of shape ``(n, ...)`` or, for models with named inputs, a
``{input name: array}`` dict whose arrays all have ``n`` rows; the model's
answer may likewise be an array or a ``{output name: array}`` dict. Batches
stack, pad and split every entry alike, so a caller's rows stay together.

``DEFAULT_MAX_BATCH``, ``DEFAULT_MAX_WAIT_MS`` and :func:`default_max_enqueued`
are the one source of the defaults of ``ensemblekit serve``, ``ek.deploy.serve``
and the TensorFlow Serving batching file written by ``ek.deploy.export``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

DEFAULT_MAX_BATCH = 64
DEFAULT_MAX_WAIT_MS = 5.0
_ENQUEUED_BATCHES = 8


def default_max_enqueued(max_batch):
    """Requests allowed to wait by default: ``8 * max_batch`` (eight full batches of one-row requests)."""
    return _ENQUEUED_BATCHES * max_batch


def n_rows(rows):
    """Rows of an array or of a ``{name: array}`` dict (all its arrays have as many)."""
    return len(next(iter(rows.values())) if isinstance(rows, dict) else rows)


def concatenate_rows(parts):
    """Stack arrays, or dicts of arrays name by name, along the batch axis."""
    if isinstance(parts[0], dict):
        return {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def slice_rows(rows, start, stop):
    """Rows ``start:stop`` of an array or of every array of a dict."""
    if isinstance(rows, dict):
        return {name: np.asarray(value)[start:stop] for name, value in rows.items()}
    return np.asarray(rows)[start:stop]


def _pad_rows(rows, padding):
    if isinstance(rows, dict):
        return {name: _pad_rows(value, padding) for name, value in rows.items()}
    return np.concatenate([rows, np.zeros((padding, *rows.shape[1:]), rows.dtype)])


class QueueFull(RuntimeError):
    """The batcher already holds ``max_enqueued`` waiting requests; try again later."""


def default_batch_sizes(max_batch):
    """Powers of two below ``max_batch``, then ``max_batch``: ``8 -> (1, 2, 4, 8)``, ``6 -> (1, 2, 4, 6)``."""
    sizes = [1 << k for k in range(max_batch.bit_length()) if 1 << k < max_batch]
    return (*sizes, max_batch)


def allowed_sizes(allowed_batch_sizes, max_batch):
    """``allowed_batch_sizes`` checked (increasing, ending with ``max_batch``), or the default sizes."""
    if allowed_batch_sizes is None:
        return default_batch_sizes(max_batch)
    sizes = tuple(allowed_batch_sizes)
    if (not sizes or not all(isinstance(s, int) and s >= 1 for s in sizes)
            or list(sizes) != sorted(set(sizes))):
        raise ValueError(
            f"allowed_batch_sizes is {allowed_batch_sizes!r}; it must be increasing integers >= 1."
        )
    if sizes[-1] != max_batch:
        raise ValueError(
            f"allowed_batch_sizes ends with {sizes[-1]} but max_batch is {max_batch}; "
            "the largest allowed batch size must equal max_batch."
        )
    return sizes


class MicroBatcher:
    """Gather concurrent ``predict`` calls into batched calls of ``predict_fn``.

    ``predict_fn`` runs in ONE worker thread, so the event loop stays free to
    accept requests while the model computes, and the model is never called
    from two threads at once.

    Args:
        predict_fn: maps an array of shape ``(n, ...)`` to an array with ``n`` rows.
        max_batch: most rows in one call; ``1`` turns batching off. A single
            request with more rows than this is split into calls of ``max_batch`` rows.
        max_wait_ms: the longest the first request of a batch waits for others;
            it waits only while other requests are :meth:`arriving`.
        allowed_batch_sizes: increasing batch sizes ending with ``max_batch``;
            each call is padded with zero rows up to the next one (default:
            :func:`default_batch_sizes`, powers of two).
        max_enqueued: most requests waiting for a call; one more raises
            :class:`QueueFull` at once (default ``8 * max_batch``).
        timeout_ms: a request not answered within this raises ``TimeoutError``
            (``None``: no limit); its rows are dropped if they are still queued.
        on_call: optional ``fn(rows, padding_rows)`` called after each model call.

    Attributes:
        batch_sizes: rows of each model call so far, padding not counted (the last 10,000 calls).
        padding_rows: zero rows added to reach an allowed batch size, in all.

    Example:
        >>> import asyncio, numpy as np
        >>> async def demo():
        ...     batcher = MicroBatcher(lambda x: x * 2, max_batch=8, max_wait_ms=20)
        ...     async with batcher:
        ...         rows = [np.full((1, 2), i) for i in range(4)]
        ...         out = await asyncio.gather(*(batcher.predict(r) for r in rows))
        ...     return [int(o[0, 0]) for o in out], batcher.batch_sizes
        >>> asyncio.run(demo())
        ([0, 2, 4, 6], [4])
    """

    def __init__(self, predict_fn, max_batch=DEFAULT_MAX_BATCH, max_wait_ms=DEFAULT_MAX_WAIT_MS,
                 allowed_batch_sizes=None,
                 max_enqueued=None, timeout_ms=None, on_call=None):
        if not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"max_batch is {max_batch!r}; it must be an integer >= 1.")
        if not max_wait_ms >= 0:
            raise ValueError(f"max_wait_ms is {max_wait_ms!r}; it must be a number >= 0.")
        max_enqueued = default_max_enqueued(max_batch) if max_enqueued is None else max_enqueued
        if not isinstance(max_enqueued, int) or max_enqueued < 1:
            raise ValueError(f"max_enqueued is {max_enqueued!r}; it must be an integer >= 1.")
        if timeout_ms is not None and not timeout_ms > 0:
            raise ValueError(f"timeout_ms is {timeout_ms!r}; it must be a number > 0 or None.")
        self.predict_fn = predict_fn
        self.max_batch = max_batch
        self.max_wait_ms = max_wait_ms
        self.allowed_batch_sizes = allowed_sizes(allowed_batch_sizes, max_batch)
        self.max_enqueued = max_enqueued
        self.timeout_ms = timeout_ms
        self.on_call = on_call
        self.batch_sizes = []
        self.padding_rows = 0
        self._queue = None
        self._task = None
        self._executor = None
        self._carry = None
        self._arriving = 0

    @contextlib.contextmanager
    def arriving(self):
        """Mark a request as on its way (being received and parsed); batches wait for it."""
        self._arriving += 1
        try:
            yield
        finally:
            self._arriving -= 1

    @property
    def queue_depth(self):
        """Requests waiting for a model call."""
        waiting = self._queue.qsize() if self._queue is not None else 0
        return waiting + (self._carry is not None)

    @property
    def full(self):
        """True while ``max_enqueued`` requests wait: the next one would be refused."""
        return self._queue is not None and self._queue.full()

    def check_room(self):
        """Raise :class:`QueueFull` if ``max_enqueued`` requests already wait (before parsing a new one)."""
        if self.full:
            raise QueueFull(
                f"{self.max_enqueued} requests are already waiting (max_enqueued); try again later."
            )

    async def start(self):
        """Start the gathering task on the running event loop."""
        self._queue = asyncio.Queue(maxsize=self.max_enqueued)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ensemblekit-model")
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self):
        """Stop gathering; callers still waiting get ``RuntimeError``."""
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        pending = [self._carry] if self._carry else []
        while self._queue is not None and not self._queue.empty():
            pending.append(self._queue.get_nowait())
        for _, future in pending:
            if not future.done():
                future.set_exception(RuntimeError("the server is shutting down"))
        if self._executor is not None:
            self._executor.shutdown(wait=True)
        self._task = self._executor = self._carry = None

    async def __aenter__(self):
        await self.start()
        return self

    async def __aexit__(self, *exc_info):
        await self.stop()

    async def run_in_worker(self, fn, *args):
        """Run ``fn(*args)`` in the model thread (e.g. a warm-up call)."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def predict(self, rows):
        """Queue ``rows`` (shape ``(n, ...)``, or a dict of such) and return the model's ``n`` output rows.

        Raises:
            QueueFull: ``max_enqueued`` requests are already waiting.
            TimeoutError: no answer within ``timeout_ms``.
        """
        if self._task is None:
            raise RuntimeError("MicroBatcher.predict called before start().")
        future = asyncio.get_running_loop().create_future()
        self.check_room()
        self._queue.put_nowait((rows, future))
        if self.timeout_ms is None:
            return await future
        try:
            # wait_for cancels the future on timeout, so a still-queued request is skipped.
            return await asyncio.wait_for(future, self.timeout_ms / 1000)
        except TimeoutError:
            raise TimeoutError(f"no answer within {self.timeout_ms:g} ms (timeout_ms).") from None

    def padded_size(self, n_rows):
        """The allowed batch size a call of ``n_rows`` rows (at most ``max_batch``) is padded to."""
        return next(size for size in self.allowed_batch_sizes if size >= n_rows)

    def _predict_padded(self, stacked):
        """Run ``predict_fn`` in calls of allowed sizes only; the answer has ``len(stacked)`` rows."""
        outputs = []
        total = n_rows(stacked)
        for start in range(0, total, self.max_batch):
            chunk = slice_rows(stacked, start, start + self.max_batch)
            rows = n_rows(chunk)
            padding = self.padded_size(rows) - rows
            if padding:
                chunk = _pad_rows(chunk, padding)
            answer = self.predict_fn(chunk)
            outputs.append(slice_rows(answer if isinstance(answer, dict) else np.asarray(answer), 0, rows))
            self.batch_sizes = [*self.batch_sizes[-9999:], rows]
            self.padding_rows += padding
            if self.on_call is not None:
                self.on_call(rows, padding)
        return concatenate_rows(outputs)

    async def _next_request(self, timeout):
        if self._carry is not None:
            request, self._carry = self._carry, None
            return request
        if timeout is None:
            return await self._queue.get()
        if timeout <= 0:
            return self._queue.get_nowait()  # take what is already queued, wait no longer
        return await asyncio.wait_for(self._queue.get(), timeout)

    async def _gather(self):
        """Wait for one request, then add more until ``max_batch`` rows or ``max_wait_ms``."""
        batch = [await self._next_request(None)]
        gathered = n_rows(batch[0][0])
        deadline = time.monotonic() + self.max_wait_ms / 1000
        while gathered < self.max_batch:
            remaining = deadline - time.monotonic()
            if self._queue.empty() and (remaining <= 0 or self._arriving == 0):
                break
            try:
                request = await self._next_request(max(remaining, 0))
            except (TimeoutError, asyncio.QueueEmpty):
                break
            if request[1].cancelled():  # timed out while queued
                continue
            if gathered + n_rows(request[0]) > self.max_batch:
                self._carry = request  # starts the next batch
                break
            batch.append(request)
            gathered += n_rows(request[0])
        return batch

    async def _run(self):
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._gather()
            batch = [(rows, future) for rows, future in batch if not future.cancelled()]
            if not batch:
                continue
            stacked = concatenate_rows([rows for rows, _ in batch])
            try:
                outputs = await loop.run_in_executor(self._executor, self._predict_padded, stacked)
            except Exception as error:  # noqa: BLE001 - every caller of this batch gets it
                for _, future in batch:
                    if not future.done():
                        future.set_exception(error)
                continue
            start = 0
            for rows, future in batch:
                if not future.done():
                    future.set_result(slice_rows(outputs, start, start + n_rows(rows)))
                start += n_rows(rows)
