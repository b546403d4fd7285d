"""What a person watching a run sees: TensorBoard scalars and attention images, metrics.jsonl, the console."""
