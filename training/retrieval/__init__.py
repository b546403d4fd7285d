"""Using a trained model: inference bundles, gallery indexes, search and contact sheets (no DeepSpeed, no Ray)."""
