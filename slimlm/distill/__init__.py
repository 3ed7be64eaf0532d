"""Distillation: KD losses (logits, hidden states, cross-tokenizer), training data, and the distill / QAT stages."""
