"""Adapting a model to a user's data: peft methods, QLoRA on packed layers, DP-SGD, canaries, GGUF adapters."""
