"""Config section `data`: raw sources, noun-phrase extraction, shard building and streaming."""

from __future__ import annotations

from dataclasses import dataclass, field

from omegaconf import MISSING

SOURCE_KINDS = ("cirr", "lasco", "jsonl")
NP_PARSERS = ("stanza", "trees")


@dataclass
class SourceConfig:
    """One raw dataset in the aggregated mixture."""

    name: str = MISSING
    """Label of the source: prefixes sample ids and names the source in build statistics."""
    kind: str = MISSING
    """Reader: `cirr` (CIRR on-disk layout), `lasco` (LaSCo JSON) or `jsonl` (manifest, one triplet a line)."""
    path: str = MISSING
    """cirr: the dataset root holding `cirr/`; lasco: the `lasco_{split}.json` file; jsonl: the manifest file."""
    image_root: str | None = None
    """lasco only: the COCO root that the LaSCo image paths are relative to."""
    split: str = "train"
    """cirr only: which `cap.rc2.{split}.json` to read."""
    weight: float = 1.0
    """Mixture weight: every triplet is taken floor(weight) times, plus once more with probability frac(weight)."""
    trees: str | None = None
    """JSONL sidecar of `{"caption", "tree"}` PTB trees, read when `data.noun_phrases.parser` is `trees`."""

    def __post_init__(self) -> None:
        if self.kind not in SOURCE_KINDS:
            raise ValueError(f"data.sources[{self.name}].kind={self.kind!r} must be one of {SOURCE_KINDS}")
        if self.weight <= 0:
            raise ValueError(f"data.sources[{self.name}].weight={self.weight} must be positive")
        if self.kind == "lasco" and not self.image_root:
            raise ValueError(f"data.sources[{self.name}].image_root is required for a lasco source (the COCO root)")


@dataclass
class NounPhraseConfig:
    """How noun phrases are found in modification captions."""

    parser: str = "stanza"
    """`stanza` (constituency parser) or `trees` (PTB bracket trees from each source's `trees` sidecar)."""
    max_nps: int = 10
    """Noun phrases kept per caption, in breadth-first order."""
    np_length: int = 16
    """Length the isolated NP ids are padded to, start and end tokens included."""
    stanza_dir: str | None = None
    """Where stanza's English models live; None means stanza's default (`$STANZA_RESOURCES_DIR` or ~/stanza_resources)."""
    batch_size: int = 64
    """Captions per stanza call."""
    use_gpu: bool = True
    """Let stanza use a GPU when one is present."""

    def __post_init__(self) -> None:
        if self.parser not in NP_PARSERS:
            raise ValueError(f"data.noun_phrases.parser={self.parser!r} must be one of {NP_PARSERS}")
        if self.max_nps < 0:
            raise ValueError("data.noun_phrases.max_nps must be >= 0")
        if self.np_length < 3:
            raise ValueError("data.noun_phrases.np_length must be >= 3 (start, one token, end)")


@dataclass
class DataConfig:
    """Raw sources, the shard set built from them, and the streaming reader."""

    sources: list[SourceConfig] = field(default_factory=list)
    """The aggregated mixture: every source is built into one shard set."""
    shards_dir: str = MISSING
    """Directory of the shard set: `shard-XXXXXX.tar` files plus `index.json`."""
    samples_per_shard: int = 1000
    """Triplets per tar shard."""
    image_short_side: int = 256
    """Images are re-encoded at build time with this short side (pixels)."""
    jpeg_quality: int = 90
    """JPEG quality of the re-encoded images."""
    build_workers: int = 0
    """Processes for building shards; 0 means one per core."""
    seed: int = 0
    """Seed of the mixture sampling, the shard assignment and the streaming shuffles."""
    noun_phrases: NounPhraseConfig = field(default_factory=NounPhraseConfig)
    loader_workers: int = 2
    """Loader processes per training rank."""
    shuffle_buffer: int = 1000
    """Samples in the seeded shuffle buffer of each loader worker."""

    def __post_init__(self) -> None:
        if self.samples_per_shard < 1:
            raise ValueError("data.samples_per_shard must be >= 1")
        if self.image_short_side < 8:
            raise ValueError("data.image_short_side must be >= 8")
        if self.loader_workers < 0:
            raise ValueError("data.loader_workers must be >= 0")
        if self.shuffle_buffer < 1:
            raise ValueError("data.shuffle_buffer must be >= 1")
        names = [source.name for source in self.sources]
        if len(set(names)) != len(names):
            raise ValueError(f"data.sources names must be unique, got {names}")
