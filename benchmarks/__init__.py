"""Benchmarks that compare configurations side by side in one run (not timed tests)."""
