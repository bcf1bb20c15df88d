"""The one timer: every latency and throughput number of ensemblekit is measured here.

One meaning of *latency* throughout the library (``ek.advise(cost="latency")``,
``ek.prune.select_members(cost="latency")``, ``ek.prune.report``, the benchmarks):
the median wall-clock seconds of one call on one batch of ``batch_size`` rows,
after warm-up (tracing and compilation excluded), with the models timed
round-robin so a change of machine load hits all of them alike. What is called
is chosen by the caller: :mod:`ensemblekit.costs` times models compiled by
``compile_for_inference`` (one XLA call per batch), the way a model is served.
"""

from __future__ import annotations

import statistics
import time

import numpy as np


def time_paths(functions, repeats=5, target_s=0.1, warmup=2):
    """Median seconds per call of each function, timed round-robin (warm-up excluded).

    Repeat ``repeats`` times: every function once in turn, so a change of
    machine load (the CPU may be shared) hits all of them alike. Each function
    runs ``n`` calls per repeat, ``n`` chosen so that its repeat lasts about
    ``target_s``.

    Args:
        functions: ``{name: fn}`` with ``fn()`` doing one call.
        repeats: timed rounds; the median over them is reported.
        target_s: seconds one function's share of a round should last.
        warmup: untimed calls of each function first.

    Returns:
        ``{name: median seconds per call}``.

    Example:
        >>> seconds = time_paths({"sum": lambda: sum(range(100))}, repeats=3, target_s=0.001)
        >>> 0 < seconds["sum"] < 1
        True
    """
    calls = {}
    for name, fn in functions.items():
        for _ in range(warmup):
            fn()
        start = time.perf_counter()
        fn()
        calls[name] = max(1, int(target_s / max(time.perf_counter() - start, 1e-6)))
    samples = {name: [] for name in functions}
    for _ in range(repeats):
        for name, fn in functions.items():
            start = time.perf_counter()
            for _ in range(calls[name]):
                fn()
            samples[name].append((time.perf_counter() - start) / calls[name])
    return {name: statistics.median(values) for name, values in samples.items()}


def fixed_batch(x, batch_size):
    """``x`` repeated (or cut) to ``batch_size`` rows, as float32.

    Example:
        >>> fixed_batch(np.zeros((3, 2)), 5).shape
        (5, 2)
    """
    return np.resize(np.asarray(x), (batch_size, *np.shape(x)[1:])).astype("float32")


def batch_seconds(functions, x, batch_size, repeats=5, target_s=0.05):
    """Median seconds per call of each ``{name: f}`` on one batch of ``batch_size`` rows of ``x``.

    ``x`` is repeated (or cut) to ``batch_size`` rows and every ``f(batch)``
    (e.g. a ``compile_for_inference`` result) is timed round-robin by
    :func:`time_paths`.

    Example:
        >>> seconds = batch_seconds({"double": lambda b: b * 2}, np.ones((3, 4)), 8, repeats=2,
        ...                         target_s=0.001)
        >>> sorted(seconds)
        ['double']
    """
    batch = fixed_batch(x, batch_size)
    return time_paths({name: (lambda f=f: f(batch)) for name, f in functions.items()},
                      repeats=repeats, target_s=target_s)
