"""Benchmarks: every stage against the raw engine beneath it. Run `python -m benchmarks.run`."""
