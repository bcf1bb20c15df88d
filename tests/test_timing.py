"""The one timer: round-robin medians, fixed batches."""

import time

import numpy as np

from ensemblekit._timing import batch_seconds, fixed_batch, time_paths


def test_time_paths_orders_a_slow_and_a_fast_function():
    seconds = time_paths(
        {"slow": lambda: time.sleep(0.004), "fast": lambda: None}, repeats=3, target_s=0.01, warmup=1
    )
    assert seconds["slow"] >= 0.004 > seconds["fast"] >= 0


def test_batch_seconds_calls_every_function_on_one_fixed_batch():
    shapes = []

    def record(batch):
        shapes.append((batch.shape, batch.dtype))

    batch_seconds({"record": record}, np.arange(6).reshape(3, 2), 5, repeats=2, target_s=0.001)
    assert set(shapes) == {((5, 2), np.dtype("float32"))}
    np.testing.assert_array_equal(fixed_batch(np.arange(3)[:, None], 5)[:, 0], [0, 1, 2, 0, 1])
