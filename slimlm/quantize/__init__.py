"""Quantization: integer weights with scales, stored packed."""
