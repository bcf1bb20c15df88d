"""Runnable benchmark scripts; their reports go to benchmarks/results/."""
