"""The DeepSpeed engine: its JSON config, the optimizer, the learning-rate schedule, collectives."""
