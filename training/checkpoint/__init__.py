"""Checkpoints: where they live, which are complete, and the named pieces saved and loaded back."""
