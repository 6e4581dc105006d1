"""Benchmarks: figures next to their baselines, measured in the same run (python -m benchmarks)."""
