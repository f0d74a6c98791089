"""Plotting and analysis scripts: loss curves, MAD scores, hyper-connection matrices."""
