"""Benchmarks for Sluice, run from the repository root: ``python -m bench.overload``,
``bench.engine``, ``bench.scheduler``, and ``bench.load`` for one load run.

Shared pieces: :mod:`bench.load` (open-loop load generation), :mod:`bench.stats` (the one
statistics module) and :mod:`bench.paths`. Results land in ``bench/results/``; scenarios live in
``bench/scenarios/``.
"""
