"""Serving benchmark harness: model folders, server processes, load clients, reports.

Entry point: `benchmarks/run_serving.py` (see docs/benchmarks.md).
"""
