"""Benchmarks: each prints its figures. Run from the repository root as ``python -m bench.NAME``."""
