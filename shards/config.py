"""Config section `data`: raw sources, noun-phrase extraction, shard building and streaming."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING

from shards.caption_joining import FASHIONIQ_CATEGORIES

SOURCE_KINDS = ("cirr", "lasco", "jsonl", "cirr_r", "hotel_cir", "fashioniq")
CAPTION_MODES = ("each", "joined")
DEFAULT_CAPTION_JOINER = " and "
NP_PARSERS = ("stanza", "trees")
BUILD_ON = ("ray", "processes")
NP_SELECTIONS = ("bfs", "leaf")


@dataclass
class SourceConfig:
    """One raw dataset in the aggregated mixture."""

    name: str = MISSING
    """Label of the source: prefixes sample ids and names the source in build statistics."""
    kind: str = MISSING
    """Reader: `cirr` (CIRR on-disk layout), `lasco` (LaSCo JSON), `jsonl` (manifest, one triplet a line),
    `cirr_r` (CIRR_R as released), `hotel_cir` (Hotel-CIR as released) or `fashioniq` (FashionIQ layout)."""
    path: str = MISSING
    """cirr: the dataset root holding `cirr/`; lasco: the `lasco_{split}.json` file; jsonl: the manifest file;
    cirr_r: the root holding `rewritten_captions/`; hotel_cir: the root holding `captions/` and `images/`;
    fashioniq: the root holding `captions/` and `images/`."""
    image_root: str | None = None
    """lasco (required): the COCO root that the LaSCo image paths are relative to. cirr_r: the CIRR root holding
    `cirr/image_splits/` that names the images (default: `path`)."""
    split: str = "train"
    """cirr: which `cap.rc2.{split}.json`; cirr_r: `rewritten_{split}.json`; hotel_cir: `hotel_{split}_data.json`
    (images from `images/train/` for train, `images/val_test/` otherwise); fashioniq: `cap.{category}.{split}.json`."""
    caption_mode: str = "each"
    """cirr_r only: `each` makes one triplet per difference caption; `joined` one triplet per image pair whose
    caption is the pair's difference captions joined by `caption_joiner`."""
    caption_joiner: str = DEFAULT_CAPTION_JOINER
    """cirr_r with caption_mode `joined`: the text between two difference captions (trailing periods dropped)."""
    categories: list[str] = field(default_factory=lambda: list(FASHIONIQ_CATEGORIES))
    """fashioniq only: the categories read (`dress`, `shirt`, `toptee`)."""
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
        self._check_kind_options()

    def _check_kind_options(self) -> None:
        key = f"data.sources[{self.name}]"
        if self.caption_mode not in CAPTION_MODES:
            raise ValueError(f"{key}.caption_mode={self.caption_mode!r} must be one of {CAPTION_MODES}")
        if self.kind != "cirr_r" and (self.caption_mode != "each" or self.caption_joiner != DEFAULT_CAPTION_JOINER):
            raise ValueError(
                f"{key}.caption_mode and caption_joiner apply to cirr_r sources only (this one is {self.kind!r})"
            )
        if self.image_root and self.kind not in ("lasco", "cirr_r"):
            raise ValueError(f"{key}.image_root applies to lasco and cirr_r sources only (this one is {self.kind!r})")
        if not self.caption_joiner:
            raise ValueError(f"{key}.caption_joiner must not be empty")
        if self.kind != "fashioniq" and list(self.categories) != list(FASHIONIQ_CATEGORIES):
            raise ValueError(f"{key}.categories applies to fashioniq sources only (this one is {self.kind!r})")
        unknown = [category for category in self.categories if category not in FASHIONIQ_CATEGORIES]
        if unknown or not self.categories or len(set(self.categories)) != len(self.categories):
            raise ValueError(
                f"{key}.categories={list(self.categories)} must be distinct FashionIQ categories out of "
                f"{FASHIONIQ_CATEGORIES}"
            )


@dataclass
class NounPhraseConfig:
    """How noun phrases are found in modification captions."""

    parser: str = "stanza"
    """`stanza` (constituency parser) or `trees` (PTB bracket trees from each source's `trees` sidecar)."""
    max_nps: int = 10
    """Noun phrases kept per caption: the first ones in the order of `selection`."""
    selection: str = "bfs"
    """Which NP constituents are used: `bfs` every NP of the tree in breadth-first order (branch-level before
    leaf-level, as the paper prescribes); `leaf` only the innermost NPs (those containing no other NP), left to
    right. Changing it re-extracts the noun phrases and rebuilds the shards."""
    np_length: int = 16
    """Length the isolated NP ids are padded to, start and end tokens included."""
    stanza_dir: str | None = None
    """Where stanza's English models live; None means stanza's default (`$STANZA_RESOURCES_DIR` or ~/stanza_resources)."""
    batch_size: int = 64
    """Captions per stanza call."""
    chunk_size: int = 1024
    """Captions per parse job: each job's result is cached as one file the moment it is done, so a killed build
    loses at most the chunks in flight and a rerun parses only the chunks it lacks."""
    use_gpu: bool = True
    """Let stanza use a GPU when one is present."""

    def __post_init__(self) -> None:
        if self.parser not in NP_PARSERS:
            raise ValueError(f"data.noun_phrases.parser={self.parser!r} must be one of {NP_PARSERS}")
        if self.max_nps < 0:
            raise ValueError("data.noun_phrases.max_nps must be >= 0")
        if self.selection not in NP_SELECTIONS:
            raise ValueError(f"data.noun_phrases.selection={self.selection!r} must be one of {NP_SELECTIONS}")
        if self.np_length < 3:
            raise ValueError("data.noun_phrases.np_length must be >= 3 (start, one token, end)")
        if self.chunk_size < 1:
            raise ValueError(f"data.noun_phrases.chunk_size must be >= 1, got {self.chunk_size}")


@dataclass
class DataConfig:
    """Raw sources, the shard set built from them, and the streaming reader."""

    sources: list[SourceConfig] = field(default_factory=list)
    """The aggregated mixture: every source is built into one shard set."""
    shards_dir: str = MISSING
    """Directory or URL (`s3://`, `gs://`, `http(s)://`, any fsspec URL) of the shard set: `shard-XXXXXX.tar`
    files plus `index.json`. See shards/storage.py."""
    storage_options: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of the fsspec filesystem of a URL `shards_dir`, e.g. `{endpoint_url: http://...}` for an
    S3-compatible store. Credentials belong in the store's environment variables, not here."""
    read_retries: int = 5
    """Retries, with exponential backoff, of a transient error reading a remote shard."""
    staging_dir: str | None = None
    """Local directory where `build_shards.py` builds a URL `shards_dir` before uploading it; None: a directory
    under `~/.cache/context-cir/staging` named after the URL (kept, so an interrupted build resumes)."""
    samples_per_shard: int = 1000
    """Triplets per tar shard."""
    image_short_side: int = 256
    """Images are re-encoded at build time with this short side (pixels)."""
    jpeg_quality: int = 90
    """JPEG quality of the re-encoded images."""
    build_workers: int = 0
    """Parallel workers of `launch/build_shards.py` (each parses caption chunks and writes shards): 0 builds in
    the launching process (tests, small sets); -1 one per CPU (of the Ray cluster, or of this machine with
    `build_on: processes`). The bytes built do not depend on it."""
    build_on: str = "ray"
    """Where the workers run: `ray` (parser actors and shard-writing tasks on Ray Data, on the job's cluster under
    `ray job submit`, else a private local Ray on 127.0.0.1) or `processes` (a process pool on this machine)."""
    seed: int = 0
    """Seed of the mixture sampling, the shard assignment and the streaming shuffles."""
    noun_phrases: NounPhraseConfig = field(default_factory=NounPhraseConfig)
    loader_workers: int = 2
    """Loader processes per training rank."""
    shuffle_buffer: int = 1000
    """Samples in the seeded shuffle buffer of each loader worker."""

    def __post_init__(self) -> None:
        if self.build_workers < -1:
            raise ValueError(
                f"data.build_workers must be -1 (one per CPU), 0 (in process) or more, got {self.build_workers}"
            )
        if self.build_on not in BUILD_ON:
            raise ValueError(f"data.build_on={self.build_on!r} must be one of {BUILD_ON}")
        if self.samples_per_shard < 1:
            raise ValueError("data.samples_per_shard must be >= 1")
        if self.image_short_side < 8:
            raise ValueError("data.image_short_side must be >= 8")
        if self.loader_workers < 0:
            raise ValueError("data.loader_workers must be >= 0")
        if self.shuffle_buffer < 1:
            raise ValueError("data.shuffle_buffer must be >= 1")
        if self.read_retries < 0:
            raise ValueError("data.read_retries must be >= 0")
        names = [source.name for source in self.sources]
        if len(set(names)) != len(names):
            raise ValueError(f"data.sources names must be unique, got {names}")
