"""Streaming shard sets: per-epoch seeded plan, loader slots, decoding, the resumable per-rank reader."""
