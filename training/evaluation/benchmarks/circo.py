"""CIRCO in its distributed layout.

    <root>/annotations/{val,test}.json   [{id, reference_img_id, target_img_id, relative_caption, shared_concept,
                                           gt_img_ids: [...]}]   (test: no target_img_id / gt_img_ids)
    <root>/COCO2017_unlabeled/annotations/image_info_unlabeled2017.json   {"images": [{"id", "file_name"}, ...]}
    <root>/COCO2017_unlabeled/unlabeled2017/<file_name>

Protocol: the whole COCO-2017 unlabeled set is the gallery and the reference is NOT removed; mAP@{5,10,25,50} over
`gt_img_ids` and recall@K on `target_img_id`. The query text is the configured template filled with
`shared_concept` and `relative_caption`. Image names are the COCO ids as strings.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
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
from training.evaluation.submissions import write_circo_submission

CIRCO_PROTOCOL = Protocol(recall_ks=(1, 5, 10, 25, 50), map_ks=(5, 10, 25, 50), remove_reference=False)
DEFAULT_TEMPLATE = "Find a picture that also {shared_concept}, but {relative_caption}."


def gallery_info_path(root: Path) -> Path:
    return Path(root) / "COCO2017_unlabeled" / "annotations" / "image_info_unlabeled2017.json"


def annotations_path(root: Path, split: str) -> Path:
    return Path(root) / "annotations" / f"{split}.json"


def query_text(template: str, shared_concept: str, relative_caption: str) -> str:
    """Fill the CIRCO query template; an unknown field in the template is a clear error."""
    try:
        return template.format(shared_concept=shared_concept.strip(), relative_caption=relative_caption.strip())
    except (KeyError, IndexError, ValueError) as error:
        raise BenchmarkError(
            f"eval.datasets.circo.template {template!r} may only use {{shared_concept}} and {{relative_caption}}: {error!r}"
        ) from error


def read_circo(root: str | Path, split: str = "val", template: str = DEFAULT_TEMPLATE) -> BenchmarkSplit:
    """Read CIRCO `val` (scored) or `test` (for the submission file).

    Raises:
        BenchmarkError: a missing annotation file or image, a malformed entry, or an id outside the gallery.
    """
    root = Path(root)
    annotations_file, info_file = annotations_path(root, split), gallery_info_path(root)
    entries = read_json(annotations_file, "CIRCO annotations")
    info = read_json(info_file, "CIRCO gallery image_info")
    if not isinstance(entries, list):
        raise BenchmarkError(f"{annotations_file}: expected a list of query entries")
    if not isinstance(info, dict) or not isinstance(info.get("images"), list):
        raise BenchmarkError(f"{info_file}: expected {{'images': [{{'id', 'file_name'}}, ...]}}")
    image_folder = info_file.parent.parent / "unlabeled2017"
    image_paths = {}
    for position, image in enumerate(info["images"]):
        require_keys(image, ("id", "file_name"), info_file, f"images[{position}]")
        image_paths[str(image["id"])] = image_folder / image["file_name"]
    labelled = split != "test"
    queries = []
    for position, entry in enumerate(entries):
        fields = ("id", "reference_img_id", "relative_caption", "shared_concept")
        require_keys(entry, fields, annotations_file, f"entry {position}")
        where = f"query id {entry['id']}"
        if labelled:
            require_keys(entry, ("target_img_id", "gt_img_ids"), annotations_file, where)
        target = str(entry["target_img_id"]) if "target_img_id" in entry else None
        ground_truth = tuple(dict.fromkeys(str(image_id) for image_id in entry.get("gt_img_ids", ())))
        if target is not None and target not in ground_truth:
            ground_truth = (target, *ground_truth)
        named = [str(entry["reference_img_id"]), *ground_truth]
        require_known(named, image_paths, annotations_file, where)
        queries.append(
            Query(
                query_id=str(entry["id"]),
                reference=str(entry["reference_img_id"]),
                text=query_text(template, str(entry["shared_concept"]), str(entry["relative_caption"])),
                target=target,
                ground_truth=ground_truth,
            )
        )
    if not queries:
        raise BenchmarkError(f"{annotations_file}: no query entries")
    require_images(image_paths, f"CIRCO gallery ({image_folder})")
    return BenchmarkSplit(
        name="circo",
        split=split,
        queries=queries,
        gallery=list(image_paths),
        image_paths=image_paths,
        protocol=CIRCO_PROTOCOL,
        version={
            "annotations": str(annotations_file),
            "annotations_sha256": file_digest(annotations_file),
            "image_info_sha256": file_digest(info_file),
            "queries": len(queries),
            "gallery": len(image_paths),
            "template": template,
        },
    )


@dataclass
class CircoSettings(DatasetSettings):
    """`eval.datasets.circo`."""

    template: str = DEFAULT_TEMPLATE
    """Query text; fields `shared_concept` and `relative_caption`."""


def _write_submission(
    out_dir: Path, split: BenchmarkSplit, predictions: Mapping[str, list[str]], subsets: Mapping[str, list[str]]
) -> list[Path]:
    del subsets  # CIRCO has no subset protocol
    query_ids = [query.query_id for query in split.queries]
    return [write_circo_submission(out_dir, predictions, query_ids, split.gallery)]


def _scored(settings: CircoSettings, splits: Sequence[str]) -> list[BenchmarkSplit]:
    return [read_circo(settings.root, "val", settings.template)] if "val" in splits else []


register_benchmark(
    Benchmark(
        name="circo",
        protocol=CIRCO_PROTOCOL,
        read=_scored,
        summary="CIRCO val: mAP@{5,10,25,50} over the COCO-2017 unlabeled gallery, reference kept; query text from "
        "`template`. With `test` in eval.splits: the test server file",
        settings=CircoSettings,
        read_submission=lambda settings: read_circo(settings.root, "test", settings.template),
        write_submission=_write_submission,
    )
)
