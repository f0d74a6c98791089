"""Launchers and tools, run from the repository root as modules (python -m scripts.run_grid ...): run_grid (an experiment
grid of config/grids.py), run_mad (the MAD suite), kernel_cost (the GPU kernels' static cost model) and its
flash_baseline."""
