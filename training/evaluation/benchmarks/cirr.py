"""CIRR in its distributed layout (also read by PatternCIR and the synthetic benchmark).

    <root>/cirr/captions/cap.rc2.{split}.json      [{pairid, reference, target_hard, target_soft, caption,
                                                     img_set: {id, members[6], reference_rank, target_rank}}]
    <root>/cirr/image_splits/split.rc2.{split}.json {name: "./dev/dev-245-0-img0.png", ...} relative to <root>

Protocol: recall@{1,5,10,50} over the split's whole image list with the reference removed, recall_subset@{1,2,3}
within `img_set.members` minus the reference, avg = (recall@5 + recall_subset@1) / 2. `test1` has no targets and
is scored by the server from submission files.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from training.evaluation.benchmarks.base import (
    Benchmark,
    BenchmarkError,
    BenchmarkSplit,
    DatasetSettings,
    Protocol,
    Query,
    file_digest,
    read_json,
    register_benchmark,
    require_images,
    require_keys,
    require_known,
)
from training.evaluation.submissions import write_cirr_submissions

CIRR_PROTOCOL = Protocol(
    recall_ks=(1, 5, 10, 50), subset_ks=(1, 2, 3), remove_reference=True, average=("recall@5", "recall_subset@1")
)


def captions_path(root: Path, split: str) -> Path:
    return Path(root) / "cirr" / "captions" / f"cap.rc2.{split}.json"


def image_split_path(root: Path, split: str) -> Path:
    return Path(root) / "cirr" / "image_splits" / f"split.rc2.{split}.json"


def read_cirr_layout(
    root: str | Path,
    split: str,
    name: str = "cirr",
    protocol: Protocol = CIRR_PROTOCOL,
    require_labels: bool = False,
) -> BenchmarkSplit:
    """Read one split of a dataset in CIRR's layout.

    Args:
        root: the directory holding `cirr/` and the image folders.
        split: `val`, `test1`, ... (the `{split}` of the file names).
        name: the benchmark's name in results.
        protocol: how it is scored.
        require_labels: fail when any entry lacks `target_hard` (a split that must be scored, not submitted).

    Raises:
        BenchmarkError: a missing file or image, a malformed entry, or a name the image list lacks; the message
            names the path.
    """
    root = Path(root)
    captions_file, split_file = captions_path(root, split), image_split_path(root, split)
    entries = read_json(captions_file, f"{name} captions")
    listing = read_json(split_file, f"{name} image split")
    if not isinstance(entries, list):
        raise BenchmarkError(f"{captions_file}: expected a list of caption entries")
    if not isinstance(listing, dict):
        raise BenchmarkError(f"{split_file}: expected an object mapping image name -> relative path")
    image_paths = {image: root / relative for image, relative in listing.items()}
    queries = []
    for position, entry in enumerate(entries):
        where = f"entry {position}"
        require_keys(entry, ("pairid", "reference", "caption", "img_set"), captions_file, where)
        where = f"pairid {entry['pairid']}"
        members = tuple(entry["img_set"].get("members", ())) if isinstance(entry["img_set"], dict) else ()
        target = entry.get("target_hard")
        if require_labels and target is None:
            raise BenchmarkError(f"{captions_file}: {where} has no target_hard, but {name} {split} must be labelled")
        named = [entry["reference"], *members] + ([target] if target is not None else [])
        require_known(named, image_paths, captions_file, where)
        queries.append(
            Query(
                query_id=str(entry["pairid"]),
                reference=entry["reference"],
                text=str(entry["caption"]),
                target=target,
                ground_truth=(target,) if target is not None else (),
                subset=members,
            )
        )
    if not queries:
        raise BenchmarkError(f"{captions_file}: no caption entries")
    if len({query.query_id for query in queries}) != len(queries):
        raise BenchmarkError(f"{captions_file}: pairids are not unique")
    require_images(image_paths, f"{name} {split} (root {root})")
    return BenchmarkSplit(
        name=name,
        split=split,
        queries=queries,
        gallery=list(listing),
        image_paths=image_paths,
        protocol=protocol,
        version={
            "captions": str(captions_file),
            "captions_sha256": file_digest(captions_file),
            "image_split_sha256": file_digest(split_file),
            "queries": len(queries),
            "gallery": len(listing),
        },
    )


def read_cirr(root: str | Path, split: str = "val") -> BenchmarkSplit:
    """CIRR `val` (labelled, scored) or `test1` (unlabelled, for the submission files)."""
    return read_cirr_layout(root, split, name="cirr", require_labels=split == "val")


def _write_submissions(
    out_dir: Path, split: BenchmarkSplit, predictions: Mapping[str, list[str]], subsets: Mapping[str, list[str]]
) -> list[Path]:
    pairs = {query.query_id: (query.reference, query.subset) for query in split.queries}
    return write_cirr_submissions(out_dir, predictions, subsets, pairs, split.gallery)


def _scored(settings: DatasetSettings, splits: Sequence[str]) -> list[BenchmarkSplit]:
    return [read_cirr(settings.root, "val")] if "val" in splits else []


register_benchmark(
    Benchmark(
        name="cirr",
        protocol=CIRR_PROTOCOL,
        read=_scored,
        summary="CIRR val: R@{1,5,10,50} over the gallery, reference removed; Rs@{1,2,3} within the image set; "
        "Avg = (R@5 + Rs@1)/2. With `test` in eval.splits: the test1 `recall` and `recall_subset` server files",
        read_submission=lambda settings: read_cirr(settings.root, "test1"),
        write_submission=_write_submissions,
    )
)
