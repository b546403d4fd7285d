"""The manifest of an inference bundle (`bundle.json`): its fields, how it is read, and the check of the weights
against the sha256 it records. Both the exporter (`bundle.py`) and the loader (`retriever.py`) read it."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shards.format import file_sha256

BUNDLE_FORMAT = 1
MANIFEST = "bundle.json"
WEIGHTS = "model.safetensors"
TOWERS = "open_clip_model.safetensors"


def towers_config_name(model_name: str) -> str:
    """`<model_name>.json`: open_clip's `add_model_config(file)` registers a config under the file's stem, so the file
    must carry the model's name for `create_model_and_transforms(model_name, ...)` to find it. (Bundles written
    before this held `open_clip_config.json` with an extra `model_name` key that plain open_clip rejects; nothing
    in this project reads that file, so those bundles still load with `load_bundle`.)"""
    return f"{model_name}.json"


class BundleError(ValueError):
    """A directory that is not a usable inference bundle; the message names the file."""


@dataclass(frozen=True)
class Preprocessing:
    """open_clip's inference transform, recorded so that other code can rebuild it without this package."""

    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    resize: str = "shortest side, bicubic"
    crop: str = "centre square"

    def transform(self):
        """The torchvision transform: resize the shortest side, centre-crop, to tensor, normalise."""
        import open_clip

        return open_clip.image_transform(self.image_size, is_train=False, mean=self.mean, std=self.std)


@dataclass(frozen=True)
class BundleInfo:
    """What `bundle.json` holds."""

    model: dict[str, Any]
    """The checkpoint's `model` section with its tower flags resolved (quick_gelu recorded)."""
    tokenizer: dict[str, str]
    """`backbone` (open_clip's tokenizer for that model) and `name` (its vocabulary, checked at load)."""
    preprocessing: Preprocessing
    embed_dim: int
    """Width of the query and gallery embeddings."""
    weights_sha256: str
    """The bundle's identity: indexes record it and refuse queries from any other bundle."""
    source: dict[str, Any]
    """The checkpoint it came from and its training step."""
    format: int = BUNDLE_FORMAT

    @property
    def backbone(self) -> str:
        return str(self.model["backbone"])

    @property
    def quick_gelu(self) -> bool:
        return bool(self.model.get("quick_gelu"))


def read_bundle_info(directory: str | Path) -> BundleInfo:
    """Parse `<directory>/bundle.json`.

    Raises:
        BundleError: missing, malformed, or of a newer format.
    """
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise BundleError(f"not an inference bundle: {path} is missing (write one with launch/export.py)")
    try:
        raw = json.loads(path.read_text())
        if raw.get("format") != BUNDLE_FORMAT:
            raise BundleError(f"{path}: bundle format {raw.get('format')!r}, this code reads {BUNDLE_FORMAT}")
        preprocessing = raw["preprocessing"]
        return BundleInfo(
            model=dict(raw["model"]),
            tokenizer={key: str(value) for key, value in raw["tokenizer"].items()},
            preprocessing=Preprocessing(
                image_size=int(preprocessing["image_size"]),
                mean=tuple(float(value) for value in preprocessing["mean"]),
                std=tuple(float(value) for value in preprocessing["std"]),
                resize=str(preprocessing.get("resize", Preprocessing.resize)),
                crop=str(preprocessing.get("crop", Preprocessing.crop)),
            ),
            embed_dim=int(raw["embed_dim"]),
            weights_sha256=str(raw["weights_sha256"]),
            source=dict(raw.get("source", {})),
        )
    except BundleError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise BundleError(f"{path} is not a valid bundle manifest: {error!r}") from error


def verify_bundle(directory: str | Path) -> BundleInfo:
    """The manifest of a bundle whose weights match the sha256 it records (reads the weights file once).

    Raises:
        BundleError: a missing or malformed manifest, missing weights, or weights that do not match.
    """
    directory = Path(directory)
    info = read_bundle_info(directory)
    weights = directory / WEIGHTS
    if not weights.is_file():
        raise BundleError(f"bundle weights missing: {weights}")
    if file_sha256(weights) != info.weights_sha256:
        raise BundleError(f"{weights} does not match the sha256 in {directory / MANIFEST}: the bundle is damaged")
    return info
