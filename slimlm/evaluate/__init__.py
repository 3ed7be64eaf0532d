"""Quality (perplexity, KL vs the base model) and footprint (parameters, sparsity, bytes, memory) of a model."""
