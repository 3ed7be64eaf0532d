"""Pruning: remove weights (unstructured, n:m) or whole structures."""
