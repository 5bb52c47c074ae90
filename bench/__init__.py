"""Benchmarks: eager vs Inductor vs fusion. Run `python -m bench.run --help` from the repo root."""
