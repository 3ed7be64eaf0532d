"""Calibration: statistics of each linear's inputs, gathered block by block."""
