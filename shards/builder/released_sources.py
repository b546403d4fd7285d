"""Readers for the paper's data as released: CIRR_R and Hotel-CIR (good4cir), and FashionIQ as a training source.

    CIRR_R     <path>/rewritten_captions/rewritten_{split}.json
               [{"query_image_url", "retrieved_image_url", "difference_captions": [str, ...]}, ...]
               images are CIRR's, named by the url's file name without extension (`.../train-10108-0-img0.png` is
               CIRR image `train-10108-0-img0`) and found through `<image_root>/cirr/image_splits/split.rc2.{split}.json`
               as the cirr reader finds them; a value that is a relative path (no scheme, with a directory) is taken
               as a file under `<image_root>` instead, so a dataset written in this format by our own pipeline needs
               no CIRR image list.
    Hotel-CIR  <path>/captions/hotel_{split}_data.json
               [{"query_image", "result_image", "difference", "distractors"}, ...]
               an image is the last three components of its url path (`<a>/<b>/<image>.jpg`) under
               `<path>/images/train/` (split train) or `<path>/images/val_test/` (val, test); distractors are not used.
    FashionIQ  <path>/captions/cap.{category}.{split}.json  [{"candidate", "target", "captions": [c0, c1]}, ...]
               images `<path>/images/<name>.png`; the caption is the benchmark's join of c0 and c1.

Ids are `<source name>-<position of the entry in its file>` (plus `-<caption number>` for CIRR_R in `each` mode,
and the category for FashionIQ), stable for a given release file. As for the other readers, an image file that
is absent on disk is left to the shard builder (skipped and counted); an entry that lacks a key, holds a wrong
type or names no image at all is a `SourceError` naming the file and the entry.
"""

from __future__ import annotations

import logging
import posixpath
from pathlib import Path
from urllib.parse import urlsplit

from shards.builder.triplets import SourceError, Triplet, load_json, load_json_list, require, require_text, resolve
from shards.caption_joining import fashioniq_text, join_captions
from shards.config import SourceConfig

logger = logging.getLogger(__name__)

HOTEL_IMAGE_DEPTH = 3
"""Hotel-CIR image urls end in `<a>/<b>/<image>.jpg`; those components are the path under `images/<dir>/`."""
_CIRR_IMAGE_SPLITS = {"test": "test1"}
"""CIRR_R calls CIRR's test1 split `test`."""


def _url_path_parts(value: str, where: str, key: str) -> list[str]:
    """The components of the path of a url or relative path, without empty and `.` parts."""
    parts = [part for part in urlsplit(value).path.split("/") if part not in ("", ".")]
    if not parts or ".." in parts:
        raise SourceError(f"{where}: {key!r}={value!r} names no image file")
    return parts


class _CirrImageNames:
    """CIRR's image list (name -> path relative to the CIRR root), read on first use."""

    def __init__(self, cirr_root: Path, split: str) -> None:
        self.cirr_root = cirr_root
        cirr_split = _CIRR_IMAGE_SPLITS.get(split, split)
        self.list_path = cirr_root / "cirr" / "image_splits" / f"split.rc2.{cirr_split}.json"
        self._paths: dict | None = None

    def _names(self) -> dict:
        if self._paths is None:
            paths = load_json(self.list_path, "CIRR image split naming the CIRR_R images")
            if not isinstance(paths, dict):
                raise SourceError(f"{self.list_path}: expected an object of CIRR image name -> relative path")
            self._paths = paths
        return self._paths

    def path(self, value: str, where: str, key: str) -> str | None:
        """The image file of a CIRR_R url or path; None when CIRR's image list does not know the name."""
        parts = _url_path_parts(value, where, key)
        is_url = bool(urlsplit(value).scheme)
        if not is_url and len(parts) > 1:
            return resolve(self.cirr_root, "/".join(parts))
        name = posixpath.splitext(parts[-1])[0]
        relative = self._names().get(name)
        if relative is not None and not isinstance(relative, str):
            raise SourceError(f"{self.list_path}: the path of image {name!r} must be a string, got {relative!r}")
        return resolve(self.cirr_root, relative) if relative is not None else None


def _difference_captions(entry: dict, where: str) -> list[str]:
    captions = entry["difference_captions"]
    if not isinstance(captions, list):
        raise SourceError(
            f"{where}: 'difference_captions' must be a list of strings, got {type(captions).__name__} {captions!r}"
        )
    for number, caption in enumerate(captions):
        if not isinstance(caption, str):
            raise SourceError(
                f"{where}: difference_captions[{number}] must be a string, got {type(caption).__name__} {caption!r}"
            )
    return [caption.strip() for caption in captions if caption.strip()]


def read_cirr_r(source: SourceConfig) -> list[Triplet]:
    """Triplets of CIRR_R's `rewritten_{split}.json`: one per difference caption, or one per pair (`joined`).

    Raises:
        SourceError: the file (or CIRR's image list) is missing, or an entry is malformed (file and entry named).
    """
    captions_path = Path(source.path) / "rewritten_captions" / f"rewritten_{source.split}.json"
    entries = load_json_list(captions_path, f"CIRR_R captions of split {source.split!r}")
    images = _CirrImageNames(Path(source.image_root or source.path), source.split)
    triplets = []
    without_captions = 0
    for position, entry in enumerate(entries):
        where = f"{captions_path} entry {position}"
        require(entry, ("query_image_url", "retrieved_image_url", "difference_captions"), where)
        reference = require_text(entry, "query_image_url", where)
        target = require_text(entry, "retrieved_image_url", where)
        captions = _difference_captions(entry, where)
        if not captions:
            without_captions += 1
            continue
        reference_path = images.path(reference, where, "query_image_url")
        target_path = images.path(target, where, "retrieved_image_url")
        if source.caption_mode == "joined":
            texts = {f"{source.name}-{position}": join_captions(captions, source.caption_joiner)}
        else:
            texts = {f"{source.name}-{position}-{number}": caption for number, caption in enumerate(captions)}
        triplets += [
            Triplet(
                id=triplet_id,
                source=source.name,
                caption=text,
                reference_name=reference,
                target_name=target,
                reference_path=reference_path,
                target_path=target_path,
            )
            for triplet_id, text in texts.items()
        ]
    if without_captions:
        logger.warning(
            "%s: %d entries have no difference captions and give no triplet", captions_path, without_captions
        )
    return triplets


def _hotel_image(image_dir: Path, entry: dict, key: str, where: str) -> tuple[str, str]:
    value = require_text(entry, key, where)
    parts = _url_path_parts(value, where, key)
    return value, resolve(image_dir, "/".join(parts[-HOTEL_IMAGE_DEPTH:]))


def read_hotel_cir(source: SourceConfig) -> list[Triplet]:
    """Triplets of Hotel-CIR's `hotel_{split}_data.json`, images under `images/train/` or `images/val_test/`.

    Raises:
        SourceError: the file is missing or an entry is malformed (file and entry named).
    """
    root = Path(source.path)
    captions_path = root / "captions" / f"hotel_{source.split}_data.json"
    image_dir = root / "images" / ("train" if source.split == "train" else "val_test")
    entries = load_json_list(captions_path, f"Hotel-CIR captions of split {source.split!r}")
    triplets = []
    for position, entry in enumerate(entries):
        where = f"{captions_path} entry {position}"
        require(entry, ("query_image", "result_image", "difference"), where)
        reference, reference_path = _hotel_image(image_dir, entry, "query_image", where)
        target, target_path = _hotel_image(image_dir, entry, "result_image", where)
        triplets.append(
            Triplet(
                id=f"{source.name}-{position}",
                source=source.name,
                caption=require_text(entry, "difference", where).strip(),
                reference_name=reference,
                target_name=target,
                reference_path=reference_path,
                target_path=target_path,
            )
        )
    return triplets


def read_fashioniq_train(source: SourceConfig) -> list[Triplet]:
    """Triplets of FashionIQ's `cap.{category}.{split}.json` for each configured category, in category order.

    The caption joins the entry's two relative captions with the benchmark's template (`fashioniq_text`), so a
    model trains on the text it is scored on.

    Raises:
        SourceError: a caption file is missing or an entry is malformed (file and entry named).
    """
    root = Path(source.path)
    triplets = []
    for category in source.categories:
        captions_path = root / "captions" / f"cap.{category}.{source.split}.json"
        entries = load_json_list(captions_path, f"FashionIQ {category} captions of split {source.split!r}")
        for position, entry in enumerate(entries):
            where = f"{captions_path} entry {position}"
            require(entry, ("candidate", "target", "captions"), where)
            reference, target = (_image_name(entry, key, where) for key in ("candidate", "target"))
            captions = entry["captions"]
            if not isinstance(captions, list) or not all(isinstance(caption, str) for caption in captions):
                raise SourceError(f"{where}: 'captions' must be a list of two strings, got {captions!r}")
            try:
                caption = fashioniq_text(captions)
            except ValueError as error:
                raise SourceError(f"{where}: {error}") from error
            triplets.append(
                Triplet(
                    id=f"{source.name}-{category}-{position}",
                    source=source.name,
                    caption=caption,
                    reference_name=reference,
                    target_name=target,
                    reference_path=resolve(root / "images", f"{reference}.png"),
                    target_path=resolve(root / "images", f"{target}.png"),
                )
            )
    return triplets


def _image_name(entry: dict, key: str, where: str) -> str:
    """A FashionIQ image name (`images/<name>.png`): a bare name, never a path out of the dataset."""
    name = require_text(entry, key, where)
    if "/" in name or "\\" in name or name in (".", ".."):
        raise SourceError(f"{where}: {key!r} must be an image name without a directory, got {name!r}")
    return name
