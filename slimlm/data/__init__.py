"""Text sources for evaluation and calibration, and the calibration sampler."""
