"""Building shard sets: raw sources -> noun phrases -> token spans -> tar shards + index.json."""
