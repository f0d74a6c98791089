"""Launchers: scripts/run_grid.py (an experiment grid of config/grids.py) and scripts/run_mad.py (the MAD suite)."""
