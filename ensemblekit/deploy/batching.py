"""Dynamic micro-batching: concurrent requests share one model call.

The idea is the dynamic batcher of TensorFlow Serving and NVIDIA Triton
(Crankshaw et al., "Clipper: A Low-Latency Online Prediction Serving System",
NSDI 2017): requests that arrive within ``max_wait_ms`` of each other are
stacked into one batch of at most ``max_batch`` rows, the model runs once, and
each caller gets back exactly its own rows. Unlike a fixed timeout, the batcher
waits only for requests it knows are on their way (see
:meth:`MicroBatcher.arriving`), so a lone client pays no waiting time, while
requests that pile up during a model call form the next batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np


class MicroBatcher:
    """Gather concurrent ``predict`` calls into batched calls of ``predict_fn``.

    ``predict_fn`` runs in ONE worker thread, so the event loop stays free to
    accept requests while the model computes, and the model is never called
    from two threads at once.

    Args:
        predict_fn: maps an array of shape ``(n, ...)`` to an array with ``n`` rows.
        max_batch: most rows in one call; ``1`` turns batching off. A single
            request with more rows than this runs alone, unsplit.
        max_wait_ms: the longest the first request of a batch waits for others;
            it waits only while other requests are :meth:`arriving`.

    Attributes:
        batch_sizes: rows of each model call so far (the last 10,000 calls).

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

    def __init__(self, predict_fn, max_batch=64, max_wait_ms=5.0):
        if not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"max_batch is {max_batch!r}; it must be an integer >= 1.")
        if not max_wait_ms >= 0:
            raise ValueError(f"max_wait_ms is {max_wait_ms!r}; it must be a number >= 0.")
        self.predict_fn = predict_fn
        self.max_batch = max_batch
        self.max_wait_ms = max_wait_ms
        self.batch_sizes = []
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

    async def start(self):
        """Start the gathering task on the running event loop."""
        self._queue = asyncio.Queue()
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
        """Queue ``rows`` (shape ``(n, ...)``) and return the model's ``n`` output rows."""
        if self._task is None:
            raise RuntimeError("MicroBatcher.predict called before start().")
        future = asyncio.get_running_loop().create_future()
        await self._queue.put((rows, future))
        return await future

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
        n_rows = len(batch[0][0])
        deadline = time.monotonic() + self.max_wait_ms / 1000
        while n_rows < self.max_batch:
            remaining = deadline - time.monotonic()
            if self._queue.empty() and (remaining <= 0 or self._arriving == 0):
                break
            try:
                request = await self._next_request(max(remaining, 0))
            except (TimeoutError, asyncio.QueueEmpty):
                break
            if n_rows + len(request[0]) > self.max_batch:
                self._carry = request  # starts the next batch
                break
            batch.append(request)
            n_rows += len(request[0])
        return batch

    async def _run(self):
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._gather()
            batch = [(rows, future) for rows, future in batch if not future.cancelled()]
            if not batch:
                continue
            stacked = np.concatenate([rows for rows, _ in batch], axis=0)
            self.batch_sizes = [*self.batch_sizes[-9999:], len(stacked)]
            try:
                outputs = await loop.run_in_executor(self._executor, self.predict_fn, stacked)
            except Exception as error:  # noqa: BLE001 - every caller of this batch gets it
                for _, future in batch:
                    if not future.done():
                        future.set_exception(error)
                continue
            start = 0
            for rows, future in batch:
                if not future.done():
                    future.set_result(outputs[start:start + len(rows)])
                start += len(rows)
