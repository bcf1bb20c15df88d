"""MicroBatcher: gathering concurrent calls, row bookkeeping, errors."""

import asyncio
import threading

import numpy as np
import pytest

from ensemblekit.deploy import MicroBatcher
from ensemblekit.deploy.batching import QueueFull, default_batch_sizes


def _run(coroutine):
    return asyncio.run(coroutine)


async def _predict_all(batcher, requests):
    async with batcher:
        return await asyncio.gather(*(batcher.predict(rows) for rows in requests), return_exceptions=True)


def test_concurrent_requests_share_calls_and_get_their_own_rows():
    calls = []

    def predict_fn(x):
        calls.append(len(x))
        return x.sum(axis=1, keepdims=True) * 10

    requests = [np.full((1 + i % 3, 4), float(i)) for i in range(20)]
    batcher = MicroBatcher(predict_fn, max_batch=64, max_wait_ms=50)
    outputs = _run(_predict_all(batcher, requests))
    for rows, out in zip(requests, outputs, strict=True):
        np.testing.assert_array_equal(out, rows.sum(axis=1, keepdims=True) * 10)
    assert sum(batcher.batch_sizes) == sum(len(r) for r in requests)
    assert set(calls) <= {1, 2, 4, 8, 16, 32, 64}  # padded to the default allowed sizes
    assert sum(calls) - sum(batcher.batch_sizes) == batcher.padding_rows
    assert len(calls) < len(requests)


def test_max_batch_is_respected_and_oversized_requests_are_split():
    calls = []

    def predict_fn(x):
        calls.append(len(x))
        return x

    requests = [np.full((3, 2), float(i)) for i in range(6)] + [np.full((9, 2), 99.0)]
    batcher = MicroBatcher(predict_fn, max_batch=7, max_wait_ms=50)
    outputs = _run(_predict_all(batcher, requests))
    for rows, out in zip(requests, outputs, strict=True):
        np.testing.assert_array_equal(out, rows)
    assert batcher.allowed_batch_sizes == (1, 2, 4, 7)
    assert set(calls) <= {1, 2, 4, 7}
    assert sum(batcher.batch_sizes) == 27 and max(batcher.batch_sizes) == 7


def test_max_batch_one_calls_the_model_once_per_request():
    calls = []

    def predict_fn(x):
        calls.append(len(x))
        return -x

    requests = [np.full((1, 2), float(i)) for i in range(8)]
    outputs = _run(_predict_all(MicroBatcher(predict_fn, max_batch=1, max_wait_ms=50), requests))
    assert calls == [1] * 8
    assert [float(o[0, 0]) for o in outputs] == [-float(i) for i in range(8)]


def test_a_failing_call_reaches_its_callers_and_the_next_call_works():
    def predict_fn(x):
        if np.any(x < 0):
            raise RuntimeError("model exploded")
        return x + 1

    async def scenario():
        batcher = MicroBatcher(predict_fn, max_batch=4, max_wait_ms=20)
        async with batcher:
            bad = await asyncio.gather(batcher.predict(np.full((1, 1), -1.0)), return_exceptions=True)
            good = await batcher.predict(np.full((2, 1), 1.0))
        return bad, good

    bad, good = _run(scenario())
    assert isinstance(bad[0], RuntimeError) and "exploded" in str(bad[0])
    np.testing.assert_array_equal(good, np.full((2, 1), 2.0))


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"max_batch": 0}, "max_batch is 0"),
    ({"max_wait_ms": -1}, "max_wait_ms is -1"),
    ({"max_enqueued": 0}, "max_enqueued is 0"),
    ({"timeout_ms": 0}, "timeout_ms is 0"),
    ({"allowed_batch_sizes": [8, 1, 64]}, r"allowed_batch_sizes is \[8, 1, 64\]; it must be increasing"),
    ({"allowed_batch_sizes": [1, 8, 32]}, "allowed_batch_sizes ends with 32 but max_batch is 64"),
])
def test_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MicroBatcher(lambda x: x, **kwargs)


def test_a_lone_request_does_not_wait_for_the_timeout():
    async def scenario():
        async with MicroBatcher(lambda x: x, max_batch=8, max_wait_ms=60_000) as batcher:
            return await asyncio.wait_for(batcher.predict(np.ones((1, 1))), timeout=20)

    np.testing.assert_array_equal(_run(scenario()), np.ones((1, 1)))


def test_the_batch_waits_for_a_request_that_is_arriving():
    calls = []

    def predict_fn(x):
        calls.append(len(x))
        return x

    async def scenario():
        async with MicroBatcher(predict_fn, max_batch=8, max_wait_ms=60_000) as batcher:
            with batcher.arriving():
                first = asyncio.ensure_future(batcher.predict(np.zeros((1, 1))))
                await asyncio.sleep(0.2)
                assert not first.done()
            second = await asyncio.wait_for(batcher.predict(np.ones((2, 1))), timeout=20)
            return await first, second

    first, second = _run(scenario())
    assert calls == [4]  # 3 rows padded to the allowed size 4
    np.testing.assert_array_equal(first, np.zeros((1, 1)))
    np.testing.assert_array_equal(second, np.ones((2, 1)))


@pytest.mark.parametrize(("max_batch", "sizes"), [(1, (1,)), (8, (1, 2, 4, 8)), (6, (1, 2, 4, 6)),
                                                   (64, (1, 2, 4, 8, 16, 32, 64))])
def test_default_allowed_batch_sizes_are_powers_of_two_up_to_max_batch(max_batch, sizes):
    assert default_batch_sizes(max_batch) == sizes
    assert MicroBatcher(lambda x: x, max_batch=max_batch).allowed_batch_sizes == sizes


def test_padding_gives_the_same_rows_as_unpadded_and_only_allowed_shapes():
    calls = []
    weights = np.random.default_rng(0).normal(size=(4, 3))

    def predict_fn(x):
        calls.append(x.shape)
        return np.tanh(x @ weights)

    requests = [np.random.default_rng(i).normal(size=(1 + i % 5, 4)) for i in range(12)]
    batcher = MicroBatcher(predict_fn, max_batch=16, max_wait_ms=50, allowed_batch_sizes=[1, 8, 16])
    outputs = _run(_predict_all(batcher, requests))
    for rows, out in zip(requests, outputs, strict=True):
        np.testing.assert_allclose(out, np.tanh(rows @ weights), atol=1e-12)
    assert {shape[0] for shape in calls} <= {1, 8, 16}
    assert batcher.padding_rows == sum(shape[0] for shape in calls) - sum(len(r) for r in requests) > 0


def test_a_full_queue_is_refused_at_once():
    release = threading.Event()

    def blocking_predict(x):
        release.wait(20)
        return x

    async def scenario():
        async with MicroBatcher(blocking_predict, max_batch=1, max_enqueued=2) as batcher:
            running = asyncio.ensure_future(batcher.predict(np.zeros((1, 1))))
            await asyncio.sleep(0.2)  # the first request is inside the model call
            queued = [asyncio.ensure_future(batcher.predict(np.full((1, 1), i))) for i in (1.0, 2.0)]
            await asyncio.sleep(0)
            depth = batcher.queue_depth
            with pytest.raises(QueueFull, match="2 requests are already waiting"):
                await asyncio.wait_for(batcher.predict(np.ones((1, 1))), timeout=1)
            release.set()
            return depth, await asyncio.gather(running, *queued)

    depth, outputs = _run(scenario())
    assert depth == 2
    assert [float(o[0, 0]) for o in outputs] == [0.0, 1.0, 2.0]


def test_timeout_raises_and_a_timed_out_queued_request_is_never_computed():
    release = threading.Event()
    seen = []

    def blocking_predict(x):
        seen.extend(x[:, 0].tolist())
        release.wait(20)
        return x

    async def scenario():
        async with MicroBatcher(blocking_predict, max_batch=1, timeout_ms=200) as batcher:
            first = asyncio.ensure_future(batcher.predict(np.zeros((1, 1))))
            await asyncio.sleep(0.05)
            with pytest.raises(TimeoutError, match="no answer within 200 ms"):
                await batcher.predict(np.full((1, 1), 7.0))
            with pytest.raises(TimeoutError):
                await first
            release.set()
            return await batcher.predict(np.full((1, 1), 3.0))

    np.testing.assert_array_equal(_run(scenario()), np.full((1, 1), 3.0))
    assert seen == [0.0, 3.0]  # 7.0 timed out while queued and was dropped
