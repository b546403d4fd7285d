"""Timing benchmarks behind `launch/bench.py`, one module per benchmark; ratios measured side by side."""
