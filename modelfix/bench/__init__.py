"""Benchmarks: measured numbers for docs/benchmarks.md. Never part of the test suite."""
