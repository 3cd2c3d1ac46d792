"""Benchmark scripts: ratios against stock onnxruntime, written to BENCHMARKS.md by run.py."""
