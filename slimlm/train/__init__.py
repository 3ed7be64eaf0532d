"""Training: one plain loop (AdamW/Adafactor, schedules, accumulation, checkpoints) and FSDP2 under torchrun."""
