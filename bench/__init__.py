"""Benchmarks: each prints one line per figure and writes a JSON file under bench/out/.

Run as `python -m bench.NAME` (`--help` says what it measures, `--quick` is a smoke run)."""
