"""Benchmark harnesses used by ``benchmarks/`` and the ``ensemblekit bench`` command."""
