"""Submission files for the CIRR test1 and CIRCO test servers, checked against each server's rules first.

A file that a server would reject is never written: the writers validate everything (both CIRR files) before
the first byte goes to disk, and write each file atomically.

CIRR (two files): `{"version": "rc2", "metric": "recall" | "recall_subset", "<pairid>": [names], ...}`; keys are
`str(pairid)`; every test pair is present and nothing else; "recall" lists 50 unique names of the test1 gallery;
"recall_subset" lists 3 unique names from the pair's `img_set.members` minus its reference.

CIRCO (one file): `{"<id>": [50 unique gallery image ids]}` with the query ids as keys, consecutive from 0.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from training.checkpoint.layout import write_atomically

CIRR_VERSION = "rc2"
CIRR_RECALL_LENGTH = 50
CIRR_SUBSET_LENGTH = 3
CIRCO_LENGTH = 50


class SubmissionError(ValueError):
    """A submission the server would reject; the message lists what is wrong."""


def _check_ranking(
    key: str, names: object, length: int, allowed: Iterable[str] | set[str], problems: list[str], what: str
) -> None:
    if not isinstance(names, list):
        problems.append(f"{key}: expected a list, got {type(names).__name__}")
        return
    if len(names) != length:
        problems.append(f"{key}: {len(names)} predictions, the server reads exactly {length}")
    duplicated = sorted(name for name, count in Counter(map(str, names)).items() if count > 1)
    if duplicated:
        problems.append(f"{key}: duplicate prediction(s) {duplicated}")
    allowed = allowed if isinstance(allowed, set) else set(allowed)
    outside = [name for name in names if str(name) not in allowed]
    if outside:
        problems.append(f"{key}: {outside[:5]} not in {what}")


def _raise(problems: list[str], what: str) -> None:
    if problems:
        shown = "; ".join(problems[:10])
        more = f" (and {len(problems) - 10} more)" if len(problems) > 10 else ""
        raise SubmissionError(f"{what} would be rejected: {shown}{more}")


def validate_cirr_submission(
    submission: Mapping[str, object],
    metric: str,
    pairs: Mapping[str, tuple[str, Sequence[str]]],
    gallery: Iterable[str],
) -> None:
    """Check one CIRR test1 file against the server's rules.

    Args:
        submission: the file's content.
        metric: `recall` or `recall_subset`.
        pairs: every test pair, `str(pairid) -> (reference, img_set.members)`.
        gallery: the names of the test1 image split.

    Raises:
        SubmissionError: listing every problem found.
    """
    if metric not in ("recall", "recall_subset"):
        raise SubmissionError(f"CIRR metric must be recall or recall_subset, got {metric!r}")
    problems = []
    if submission.get("version") != CIRR_VERSION:
        problems.append(f"version is {submission.get('version')!r}, must be {CIRR_VERSION!r}")
    if submission.get("metric") != metric:
        problems.append(f"metric is {submission.get('metric')!r}, must be {metric!r}")
    keys = {key for key in submission if key not in ("version", "metric")}
    missing = sorted(set(pairs) - keys)
    extra = sorted(keys - set(pairs))
    if missing:
        problems.append(f"{len(missing)} test pair(s) missing, e.g. {missing[:5]}")
    if extra:
        problems.append(f"{len(extra)} key(s) that are not test pairids, e.g. {extra[:5]}")
    gallery_names = set(gallery)
    for key in sorted(keys & set(pairs)):
        reference, members = pairs[key]
        if metric == "recall":
            _check_ranking(key, submission[key], CIRR_RECALL_LENGTH, gallery_names, problems, "the test1 gallery")
        else:
            candidates = {name for name in members if name != reference}
            _check_ranking(key, submission[key], CIRR_SUBSET_LENGTH, candidates, problems, "members minus reference")
    _raise(problems, f"CIRR {metric} submission")


def validate_circo_submission(
    submission: Mapping[str, object], query_ids: Iterable[str], gallery: Iterable[str]
) -> None:
    """Check a CIRCO test file: keys are the test query ids, consecutive from 0; 50 unique gallery ids each.

    Raises:
        SubmissionError: listing every problem found.
    """
    problems = []
    keys = list(submission)
    if not all(isinstance(key, str) and key.isdigit() for key in keys):
        odd = [key for key in keys if not (isinstance(key, str) and key.isdigit())]
        problems.append(f"keys must be query ids as decimal strings, got e.g. {odd[:5]}")
    else:
        numbers = sorted(int(key) for key in keys)
        if numbers != list(range(len(numbers))):
            gaps = sorted(set(range(max(numbers, default=-1) + 1)) - set(numbers))
            problems.append(f"keys must be consecutive from 0; missing {gaps[:5]}" if gaps else "keys must start at 0")
    expected = set(query_ids)
    if set(keys) != expected:
        problems.append(
            f"keys differ from the test query ids: missing {sorted(expected - set(keys))[:5]}, "
            f"extra {sorted(set(keys) - expected)[:5]}"
        )
    gallery_ids = set(gallery)
    for key in keys:
        _check_ranking(key, submission[key], CIRCO_LENGTH, gallery_ids, problems, "the CIRCO gallery")
    _raise(problems, "CIRCO submission")


def _coco_id(name: str) -> int | str:
    # The server reads COCO ids as integers; anything else stays as is for the validator to name.
    return int(name) if str(name).isdigit() else name


def _dump(content: Mapping[str, object]) -> str:
    return json.dumps(content, indent=None, separators=(",", ":")) + "\n"


def write_cirr_submissions(
    out_dir: str | Path,
    recall_predictions: Mapping[str, Sequence[str]],
    subset_predictions: Mapping[str, Sequence[str]],
    pairs: Mapping[str, tuple[str, Sequence[str]]],
    gallery: Iterable[str],
    prefix: str = "cirr_test1",
) -> list[Path]:
    """Validate both CIRR test1 files, then write `<prefix>_recall.json` and `<prefix>_recall_subset.json`.

    Args:
        out_dir: destination folder (created).
        recall_predictions: `str(pairid) -> ranked names` (at least 50; the first 50 are kept).
        subset_predictions: `str(pairid) -> ranked member names` (at least 3; the first 3 are kept).
        pairs: every test pair, `str(pairid) -> (reference, members)`.
        gallery: the test1 image names.

    Raises:
        SubmissionError: either file would be rejected; neither is written.
    """
    gallery = list(gallery)
    recall = {"version": CIRR_VERSION, "metric": "recall"}
    recall.update({key: list(names)[:CIRR_RECALL_LENGTH] for key, names in recall_predictions.items()})
    subset = {"version": CIRR_VERSION, "metric": "recall_subset"}
    subset.update({key: list(names)[:CIRR_SUBSET_LENGTH] for key, names in subset_predictions.items()})
    validate_cirr_submission(recall, "recall", pairs, gallery)
    validate_cirr_submission(subset, "recall_subset", pairs, gallery)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{prefix}_recall.json", out_dir / f"{prefix}_recall_subset.json"]
    for path, content in zip(paths, (recall, subset)):
        write_atomically(path, _dump(content))
    return paths


def write_circo_submission(
    out_dir: str | Path,
    predictions: Mapping[str, Sequence[str]],
    query_ids: Iterable[str],
    gallery: Iterable[str],
    name: str = "circo_test.json",
) -> Path:
    """Validate, then write the CIRCO test file with image ids as integers (COCO ids), 50 per query.

    Raises:
        SubmissionError: the file would be rejected; nothing is written.
    """
    content = {key: [_coco_id(image) for image in list(ranked)[:CIRCO_LENGTH]] for key, ranked in predictions.items()}
    content = dict(sorted(content.items(), key=lambda item: int(item[0]) if item[0].isdigit() else -1))
    validate_circo_submission(content, query_ids, gallery)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / name
    write_atomically(path, _dump(content))
    return path
