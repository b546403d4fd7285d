"""Benchmarks and sweeps that drive whole jobs: the GPU bench, the chaos benchmark, the Text-CC ablation."""
