"""Submission validators apply the servers' rules, and a file that would be rejected is never written."""

from __future__ import annotations

import json

import pytest

from training.evaluation.submissions import (
    SubmissionError,
    validate_circo_submission,
    validate_cirr_submission,
    write_circo_submission,
    write_cirr_submissions,
)

GALLERY = [f"test1-{index}" for index in range(60)]
PAIRS = {
    "7": ("test1-0", GALLERY[0:6]),
    "8": ("test1-6", GALLERY[6:12]),
}
CIRCO_GALLERY = [str(1000 + index) for index in range(60)]


def _cirr_predictions() -> tuple[dict, dict]:
    recall = {"7": GALLERY[1:51], "8": GALLERY[7:57]}
    subset = {"7": GALLERY[1:4], "8": GALLERY[7:10]}
    return recall, subset


def test_valid_cirr_files_are_written(tmp_path) -> None:
    recall, subset = _cirr_predictions()
    paths = write_cirr_submissions(tmp_path, recall, subset, PAIRS, GALLERY)
    assert [path.name for path in paths] == ["cirr_test1_recall.json", "cirr_test1_recall_subset.json"]
    written = json.loads(paths[0].read_text())
    assert written["version"] == "rc2" and written["metric"] == "recall" and len(written["7"]) == 50
    assert json.loads(paths[1].read_text())["8"] == ["test1-7", "test1-8", "test1-9"]


@pytest.mark.parametrize(
    ("broken", "message"),
    [
        ("missing_pair", "test pair"),
        ("duplicate", "duplicate prediction"),
        ("outside_gallery", "not in the test1 gallery"),
        ("subset_reference", "not in members minus reference"),
        ("short", "exactly 50"),
    ],
)
def test_cirr_rejections_write_nothing(tmp_path, broken: str, message: str) -> None:
    recall, subset = _cirr_predictions()
    if broken == "missing_pair":
        del recall["8"]
    elif broken == "duplicate":
        recall["7"] = [GALLERY[1], *GALLERY[1:50]]
    elif broken == "outside_gallery":
        recall["8"] = [*GALLERY[7:56], "val-99"]
    elif broken == "subset_reference":
        subset["7"] = ["test1-0", "test1-1", "test1-2"]  # the reference is not a candidate
    elif broken == "short":
        recall["7"] = GALLERY[1:40]
    with pytest.raises(SubmissionError, match=message):
        write_cirr_submissions(tmp_path / "out", recall, subset, PAIRS, GALLERY)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_cirr_version_and_metric_fields() -> None:
    recall, _ = _cirr_predictions()
    with pytest.raises(SubmissionError, match="version"):
        validate_cirr_submission({"version": "rc1", "metric": "recall", **recall}, "recall", PAIRS, GALLERY)
    with pytest.raises(SubmissionError, match="metric"):
        validate_cirr_submission({"version": "rc2", "metric": "recall_subset", **recall}, "recall", PAIRS, GALLERY)
    with pytest.raises(SubmissionError, match="not test pairids"):
        validate_cirr_submission(
            {"version": "rc2", "metric": "recall", **recall, "99": GALLERY[:50]}, "recall", PAIRS, GALLERY
        )


def test_valid_circo_file_is_written_with_integer_ids(tmp_path) -> None:
    predictions = {"0": CIRCO_GALLERY[:50], "1": CIRCO_GALLERY[5:55]}
    path = write_circo_submission(tmp_path, predictions, ["0", "1"], CIRCO_GALLERY)
    written = json.loads(path.read_text())
    assert list(written) == ["0", "1"] and written["1"][0] == 1005 and len(written["0"]) == 50


@pytest.mark.parametrize(
    ("predictions", "query_ids", "message"),
    [
        ({"0": CIRCO_GALLERY[:50], "2": CIRCO_GALLERY[:50]}, ["0", "2"], "consecutive from 0"),
        ({"1": CIRCO_GALLERY[:50], "2": CIRCO_GALLERY[:50]}, ["1", "2"], "consecutive from 0"),
        ({"0": CIRCO_GALLERY[:50]}, ["0", "1"], "missing"),
        ({"0": [CIRCO_GALLERY[0], *CIRCO_GALLERY[:49]]}, ["0"], "duplicate prediction"),
        ({"0": [*CIRCO_GALLERY[:49], "5"]}, ["0"], "not in the CIRCO gallery"),
    ],
)
def test_circo_rejections_write_nothing(tmp_path, predictions, query_ids, message) -> None:
    with pytest.raises(SubmissionError, match=message):
        write_circo_submission(tmp_path / "out", predictions, query_ids, CIRCO_GALLERY)
    assert not (tmp_path / "out").exists()


def test_circo_validator_on_a_hand_written_file() -> None:
    validate_circo_submission({"0": [int(name) for name in CIRCO_GALLERY[:50]]}, ["0"], CIRCO_GALLERY)
    with pytest.raises(SubmissionError, match="decimal strings"):
        validate_circo_submission({"q0": CIRCO_GALLERY[:50]}, ["q0"], CIRCO_GALLERY)
