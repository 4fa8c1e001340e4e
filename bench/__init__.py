"""Benchmarks that print ratios against the stock model: python -m bench.<name> [--quick]  (see bench/README.md)."""
