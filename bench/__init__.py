"""Benchmarks for Sluice (run from the repository root, e.g. ``python -m bench.engine``)."""
