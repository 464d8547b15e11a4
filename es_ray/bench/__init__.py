"""Benchmarks (`make bench`): each writes bench/results/<name>-<dataset>.json and refreshes BENCHMARKS.md."""
