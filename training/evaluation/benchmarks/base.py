"""What a benchmark is: a registered name, its settings, a reader producing `BenchmarkSplit`s, and a protocol.

A benchmark is one module in this package that calls `register_benchmark(Benchmark(...))`. The eval job, the config
validation (`eval.benchmarks`, `eval.datasets.<name>`) and `launch/eval.py --list` all find it through `BENCHMARKS`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from training.registry import Registry


class BenchmarkError(ValueError):
    """A benchmark's files are missing or malformed; the message names the path (and the entry)."""


@dataclass(frozen=True)
class Protocol:
    """How one benchmark is scored."""

    recall_ks: tuple[int, ...] = ()
    """Cut-offs of recall@K over the whole gallery."""
    subset_ks: tuple[int, ...] = ()
    """Cut-offs of recall_subset@K within each query's `subset` (reference removed)."""
    map_ks: tuple[int, ...] = ()
    """Cut-offs of CIRCO's mAP@K over each query's `ground_truth`."""
    remove_reference: bool = True
    """Drop the query's own reference image from its gallery ranking (CIRR, PatternCIR)."""
    average: tuple[str, ...] = ()
    """Metrics whose mean is reported as `avg` (CIRR: recall@5 and recall_subset@1)."""
    grounding: bool = False
    """Score how each noun phrase's maps find its box on the reference (`training.evaluation.grounding`; synthetic)."""
    hard_negatives: bool = False
    """Score `target_above_hard_negative`: the share of queries whose target outscores each of its `hard_negatives`
    (chance 0.5; the synthetic `binding` split)."""


@dataclass(frozen=True)
class GroundedPhrase:
    """A noun phrase of a query caption and the box on the reference image it is grounded on."""

    text: str
    box: tuple[float, float, float, float]
    """(x0, y0, x1, y1) as fractions of the reference image's width and height."""
    char_start: int | None = None
    """Character offset of the phrase in the caption when the annotation gives it; else its first occurrence."""
    kind: str = "present"
    """What it names: `present` (an object of the reference; its box), `added` (an object the edit creates; the
    cell it goes to), `position` (a grid cell), or anything else (e.g. `other`: "the colour of the red circle")."""


@dataclass(frozen=True)
class Query:
    """One composed query: reference image + text, with its labels when the split has them."""

    query_id: str
    reference: str
    """Image name of the reference (a key of `BenchmarkSplit.image_paths`)."""
    text: str
    """The query text the model reads (for CIRCO and FashionIQ, already built from their fields)."""
    target: str | None = None
    """The single target scored by recall@K; None on an unlabelled test split."""
    ground_truth: tuple[str, ...] = ()
    """Every relevant image (CIRCO's gt_img_ids); scored by mAP@K."""
    subset: tuple[str, ...] = ()
    """The query's candidate set (CIRR's img_set.members), reference included as distributed."""
    phrases: tuple[GroundedPhrase, ...] = ()
    hard_negatives: tuple[str, ...] = ()
    """Images that differ from the target only where the text decides (the synthetic `binding` split: the same edit
    applied to the wrong object); scored when the protocol has `hard_negatives`."""


@dataclass
class BenchmarkSplit:
    """Queries and gallery of one benchmark split (or one FashionIQ category)."""

    name: str
    """`cirr`, `circo`, `fashioniq/dress`, `patterncir`, `synthetic`."""
    split: str
    queries: list[Query]
    gallery: list[str]
    """Gallery image names, in the order the files list them."""
    image_paths: dict[str, Path]
    """Every image a query or the gallery names -> its file."""
    protocol: Protocol
    version: dict[str, Any] = field(default_factory=dict)
    """What identifies the benchmark data: annotation files' sha256 and counts."""

    @property
    def labelled(self) -> bool:
        """True when every query has a target (scored); False for a test split (submissions only)."""
        return bool(self.queries) and all(query.target is not None for query in self.queries)

    def gallery_index(self) -> dict[str, int]:
        return {name: index for index, name in enumerate(self.gallery)}


def file_digest(path: Path) -> str:
    """sha256 of a file, streamed."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_json(path: Path, what: str) -> Any:
    """Load a benchmark JSON file; a missing or malformed file is a BenchmarkError naming the path."""
    if not path.is_file():
        raise BenchmarkError(f"{what} not found: {path}")
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise BenchmarkError(f"{what} {path} is not readable JSON: {error}") from error


def require_keys(entry: Any, keys: tuple[str, ...], path: Path, where: str) -> None:
    """Fail with the file and entry when an annotation lacks a field."""
    if not isinstance(entry, dict):
        raise BenchmarkError(f"{path}: {where} must be an object, got {type(entry).__name__}")
    missing = [key for key in keys if key not in entry]
    if missing:
        raise BenchmarkError(f"{path}: {where} lacks {missing}")


def require_images(image_paths: dict[str, Path], benchmark: str) -> None:
    """Every image a benchmark names must exist before minutes of encoding start; name the missing paths."""
    missing = [str(path) for path in image_paths.values() if not path.is_file()]
    if missing:
        shown = ", ".join(missing[:3])
        raise BenchmarkError(f"{benchmark}: {len(missing)} image file(s) missing, e.g. {shown}")


def require_known(names: list[str] | tuple[str, ...], known: dict[str, Any], path: Path, where: str) -> None:
    """Annotation names must all be images of the split's listing."""
    unknown = [name for name in names if name not in known]
    if unknown:
        raise BenchmarkError(f"{path}: {where} names image(s) {unknown} that the split's image list lacks")


@dataclass
class DatasetSettings:
    """`eval.datasets.<name>`: where a benchmark's files are. A benchmark with options subclasses it."""

    root: str | None = None
    """The directory holding the benchmark in its distributed layout."""


SubmissionWriter = Callable[[Path, BenchmarkSplit, Mapping[str, list[str]], Mapping[str, list[str]]], list[Path]]
"""(output directory, test split, top-k predictions, subset predictions) -> the files written for the server."""


@dataclass(frozen=True)
class Benchmark:
    """One registered benchmark."""

    name: str
    """Its name in `eval.benchmarks`, results and TensorBoard (`eval/<name>/<metric>`)."""
    protocol: Protocol
    """How it is scored (also shown by `launch/eval.py --list`)."""
    read: Callable[[Any, Sequence[str]], list[BenchmarkSplit]]
    """(settings, eval.splits) -> the labelled splits to score; several for a multi-part benchmark."""
    summary: str
    """One line for the docs table: the data and the protocol."""
    settings: type[DatasetSettings] = DatasetSettings
    """The schema of `eval.datasets.<name>`."""
    read_submission: Callable[[Any], BenchmarkSplit] | None = None
    """settings -> the unlabelled test split, scored only into server files when `eval.splits` has `test`."""
    write_submission: SubmissionWriter | None = None
    read_diagnostics: Callable[[Any], list[BenchmarkSplit]] | None = None
    """settings -> labelled splits scored beside the main ones and never averaged into them: each split's metrics
    are reported as `<split.split>/<metric>` among the benchmark's own (the synthetic `binding` split)."""

    def __post_init__(self) -> None:
        if (self.read_submission is None) != (self.write_submission is None):
            raise ValueError(f"benchmark {self.name!r}: read_submission and write_submission come together")

    def scored_splits(self, settings: DatasetSettings, splits: Sequence[str]) -> list[BenchmarkSplit]:
        """The labelled splits to score, read from `settings.root`."""
        return self.read(self._checked(settings), splits)

    def submission_split(self, settings: DatasetSettings, splits: Sequence[str]) -> BenchmarkSplit | None:
        """The test split whose rankings go to a server, when `splits` asks for `test` and the benchmark has one."""
        if "test" not in splits or self.read_submission is None:
            return None
        return self.read_submission(self._checked(settings))

    def diagnostic_splits(self, settings: DatasetSettings) -> list[BenchmarkSplit]:
        """The labelled splits reported beside the main ones under their split name as a prefix; [] when none."""
        return [] if self.read_diagnostics is None else self.read_diagnostics(self._checked(settings))

    def _checked(self, settings: DatasetSettings) -> DatasetSettings:
        if not settings.root:
            raise BenchmarkError(f"eval.datasets.{self.name}.root is not set, but eval.benchmarks lists {self.name}")
        return settings


BENCHMARKS: Registry[Benchmark] = Registry("benchmark", "training.evaluation.benchmarks")


def register_benchmark(benchmark: Benchmark) -> Benchmark:
    """Make `benchmark` known to the eval job, the config validation and the docs."""
    return BENCHMARKS.register(benchmark.name, benchmark)
