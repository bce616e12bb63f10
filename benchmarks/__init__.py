"""Benchmarks of stc against its baselines: ``python -m benchmarks`` (see BENCHMARKS.md)."""
