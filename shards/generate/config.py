"""Config section `generate`: making training triplets from image pairs with a vision-language model."""

from __future__ import annotations

from dataclasses import dataclass, field

from shards.generate.bounded_http import DEFAULT_MAX_RESPONSE_BYTES

TREE_MAKERS = ("none", "synthetic")


@dataclass
class MiningConfig:
    """Pairs mined from an unpaired image collection by nearest neighbours in a gallery index."""

    index: str | None = None
    """A gallery index directory (`launch/index.py`); set it to mine pairs instead of reading them."""
    k: int = 2
    """Neighbours kept per image (fewer when fewer fall inside the band)."""
    min_similarity: float = 0.5
    """Below this cosine similarity two images are unrelated."""
    max_similarity: float = 0.98
    """Above it they are near-duplicates, with nothing to describe between them."""
    candidates: int = 32
    """Neighbours searched per image before the band and the seeded choice."""
    seed: int = 0

    def __post_init__(self) -> None:
        if self.k < 1 or self.candidates < self.k:
            raise ValueError("generate.mine.k must be >= 1 and generate.mine.candidates >= k")
        if not -1.0 <= self.min_similarity < self.max_similarity <= 1.0:
            raise ValueError("generate.mine needs -1 <= min_similarity < max_similarity <= 1")


@dataclass
class GenerateConfig:
    """Where the pairs come from, the endpoint that describes them, and what becomes of the answers."""

    pairs: str | None = None
    """JSONL of `{"id", "reference", "target"}`, image paths relative to the file."""
    source: str | None = None
    """Or: the name of a `data.sources` entry whose (reference, target) pairs are used, captions ignored."""
    mine: MiningConfig = field(default_factory=MiningConfig)
    out: str = "data/generated"
    """Output directory: CIRR_R layout, JSONL manifest, stage outputs, failures, summary, cache."""
    split: str = "train"
    """Split name of the CIRR_R file (`rewritten_captions/rewritten_{split}.json`)."""
    image_root: str | None = None
    """Directory the output's image paths are relative to; None: the common parent of every image."""
    endpoint: str = "http://127.0.0.1:8011/v1"
    """Base URL of an OpenAI-compatible API (`<endpoint>/chat/completions`)."""
    model: str = "scene-oracle"
    api_key_env: str = "OPENAI_API_KEY"
    """Environment variable holding the API key (never written anywhere by this project)."""
    prompts: str = "v1"
    """Prompt set under shards/generate/prompts/."""
    concurrency: int = 4
    """Ray Data workers, each with one request in flight: the bound on concurrent requests to the endpoint."""
    requests_per_second: float = 0.0
    """Cap on request starts per second over the whole run (0: none), shared out between the workers."""
    timeout_s: float = 120.0
    """Seconds one request may take in all: connecting, the headers and the whole answer (a total deadline, not the
    gap between two reads). A request past it is cut off and counts as a timeout, which is retried."""
    max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES
    """Longest answer body accepted, in bytes (2 MiB; an honest answer of `max_tokens` tokens is a few KB). A longer
    one is cut off and the pair fails as `endpoint_response_too_large`: it is not retried, cached or sent back in
    a repair turn, and a cached answer over the limit is dropped and asked again."""
    max_retries: int = 6
    """Retries of a request after 429, 5xx, a timeout or a dropped connection, with exponential backoff."""
    backoff_s: float = 1.0
    repair_attempts: int = 2
    """Times an answer that is not valid JSON under its schema is sent back to be repaired before the pair fails."""
    max_tokens: int = 1024
    price_prompt_per_million: float = 0.0
    """Price of a million prompt tokens, for the cost summary (the `usage` fields count the tokens)."""
    price_completion_per_million: float = 0.0
    max_modifications: int = 3
    """K: captions join 1..K single modifications."""
    captions_per_pair: int = 4
    """Captions kept per pair (singles first, then longer joins), before filters."""
    min_words: int = 3
    dedupe: bool = True
    """Drop a caption repeated within its pair (pairs themselves are distinct, so no triplet repeats)."""
    leakage_filter: bool = True
    """Drop a caption that describes the whole target, so that text alone would find it."""
    trees: str = "none"
    """`synthetic`: also write PTB trees of the captions (the synthetic benchmark's grammar) for `parser: trees`."""
    cache_dir: str | None = None
    """Response cache; None: `<out>/cache`."""
    limit: int = 0
    """Process only the first N pairs (0: all)."""
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("concurrency", "max_modifications", "captions_per_pair"):
            if getattr(self, name) < 1:
                raise ValueError(f"generate.{name} must be >= 1")
        for name in ("max_retries", "repair_attempts", "min_words", "limit", "requests_per_second", "backoff_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"generate.{name} must be >= 0")
        if self.timeout_s <= 0:
            raise ValueError("generate.timeout_s must be > 0")
        if self.max_response_bytes < 1024:
            raise ValueError("generate.max_response_bytes must be >= 1024 (the default is 2 MiB)")
        if self.trees not in TREE_MAKERS:
            raise ValueError(f"generate.trees={self.trees!r} must be one of {TREE_MAKERS}")
        if sum(x is not None for x in (self.pairs, self.source, self.mine.index)) > 1:
            raise ValueError("set only one of generate.pairs, generate.source and generate.mine.index")
