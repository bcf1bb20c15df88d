"""MicroBatcher: gathering concurrent calls, row bookkeeping, errors."""

import asyncio

import numpy as np
import pytest

from ensemblekit.deploy import MicroBatcher


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
    outputs = _run(_predict_all(MicroBatcher(predict_fn, max_batch=64, max_wait_ms=50), requests))
    for rows, out in zip(requests, outputs, strict=True):
        np.testing.assert_array_equal(out, rows.sum(axis=1, keepdims=True) * 10)
    assert sum(calls) == sum(len(r) for r in requests)
    assert len(calls) < len(requests)


def test_max_batch_is_respected_and_oversized_requests_run_alone():
    calls = []

    def predict_fn(x):
        calls.append(len(x))
        return x

    requests = [np.full((3, 2), float(i)) for i in range(6)] + [np.full((9, 2), 99.0)]
    outputs = _run(_predict_all(MicroBatcher(predict_fn, max_batch=7, max_wait_ms=50), requests))
    for rows, out in zip(requests, outputs, strict=True):
        np.testing.assert_array_equal(out, rows)
    assert all(size <= 7 for size in calls if size != 9)
    assert calls.count(9) == 1 and sum(calls) == 27


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


@pytest.mark.parametrize(("kwargs", "match"), [({"max_batch": 0}, "max_batch is 0"),
                                                ({"max_wait_ms": -1}, "max_wait_ms is -1")])
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
    assert calls == [3]
    np.testing.assert_array_equal(first, np.zeros((1, 1)))
    np.testing.assert_array_equal(second, np.ones((2, 1)))
