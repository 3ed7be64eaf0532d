"""Models in and out: loading, the architecture adapter table, saving with a manifest."""
