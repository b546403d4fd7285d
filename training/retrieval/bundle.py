"""Inference bundles: a trained checkpoint as a self-contained directory that needs neither DeepSpeed nor Ray.

    <bundle>/bundle.json                  format, model section, tokenizer, preprocessing, source, weights hash
    <bundle>/model.safetensors            every parameter of the ConText-CIR network
    <bundle>/open_clip_model.safetensors  the fine-tuned CLIP towers alone, loadable by open_clip itself
    <bundle>/open_clip_config.json        the towers' open_clip architecture (needed for names open_clip lacks)

`export_bundle` writes one from a checkpoint; `load_bundle` turns one into a `Retriever`. The towers file serves
other tools too:

    open_clip.add_model_config("<bundle>/open_clip_config.json")        # only for project models (ContextTiny)
    model, _, preprocess = open_clip.create_model_and_transforms(
        name, pretrained="<bundle>/open_clip_model.safetensors", force_quick_gelu=<bundle.json open_clip.quick_gelu>)
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from shards.format import file_sha256

BUNDLE_FORMAT = 1
MANIFEST = "bundle.json"
WEIGHTS = "model.safetensors"
TOWERS = "open_clip_model.safetensors"
TOWERS_CONFIG = "open_clip_config.json"


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


def export_bundle(checkpoint: str | Path, out: str | Path, overwrite: bool = False) -> BundleInfo:
    """Write the inference bundle of a complete checkpoint (a step directory or `<run>/checkpoints/latest`).

    The bundle is assembled in a temporary directory beside `out` and renamed into place, so `out` is either
    absent or complete.

    Raises:
        training.evaluation.runner.CheckpointError: not a complete checkpoint.
        FileExistsError: `out` exists and `overwrite` is False.
    """
    import open_clip

    from shards.model_inputs import image_size as backbone_image_size
    from shards.model_inputs import model_config, normalisation, tokenizer_name
    from training.evaluation.runner import load_checkpoint_model, resolve_checkpoint
    from training.model.towers import with_tower_flags
    from training.model.weights import save_model_weights

    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; pass --overwrite to replace it")
    if out.exists() and not (out / MANIFEST).is_file():  # --overwrite replaces a bundle, never another folder
        raise FileExistsError(f"{out} exists and is not an inference bundle; choose another --out")
    step, checkpoint_dir = resolve_checkpoint(checkpoint)
    model, saved = load_checkpoint_model(checkpoint_dir, _cpu())
    resolved = replace(with_tower_flags(saved), **model.switches)  # as rebuilt (a pre-switch checkpoint's too)
    backbone = resolved.backbone
    mean, std = normalisation(backbone)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        save_model_weights(model, staging / WEIGHTS)
        save_open_clip_towers(model.backbone.clip, staging / TOWERS)
        architecture = {"model_name": backbone, **model_config(backbone)}
        (staging / TOWERS_CONFIG).write_text(json.dumps(architecture, indent=2) + "\n")
        info = BundleInfo(
            model=_plain(asdict(resolved)),
            tokenizer={"backbone": backbone, "name": tokenizer_name(backbone)},
            preprocessing=Preprocessing(image_size=backbone_image_size(backbone), mean=mean, std=std),
            embed_dim=int(model.backbone.embed_dim),
            weights_sha256=file_sha256(staging / WEIGHTS),
            source={"checkpoint": str(checkpoint_dir.resolve()), "step": step, "open_clip": open_clip.__version__},
        )
        manifest = {
            "format": info.format,
            "model": info.model,
            "tokenizer": info.tokenizer,
            "preprocessing": asdict(info.preprocessing),
            "embed_dim": info.embed_dim,
            "open_clip": {
                "model_name": backbone,
                "file": TOWERS,
                "config": TOWERS_CONFIG,
                "quick_gelu": info.quick_gelu,
            },
            "weights_sha256": info.weights_sha256,
            "source": info.source,
        }
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return info


def _cpu():
    import torch

    return torch.device("cpu")


def _plain(value: Any) -> Any:
    """Tuples to lists, so the JSON reads back equal."""
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value


def save_open_clip_towers(clip_model, path: Path) -> None:
    """The open_clip model's own state dict (its parameter names), as open_clip's loader expects."""
    from safetensors.torch import save_file

    state = {name: tensor.detach().contiguous().cpu() for name, tensor in clip_model.state_dict().items()}
    save_file(state, str(path))


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


def load_bundle(directory: str | Path, device: str = "auto", verify: bool = True):
    """The `Retriever` of an inference bundle; imports neither DeepSpeed nor Ray.

    Args:
        directory: a directory `launch/export.py` wrote.
        device: `auto` (CUDA when present), `cuda` or `cpu`. On CUDA the encoders run under bf16 autocast.
        verify: check the weights file against the manifest's sha256 (reads the file once).

    Raises:
        BundleError: a missing or damaged bundle, or a tokenizer that differs from the one it was trained with.
    """
    from training.retrieval.retriever import Retriever

    directory = Path(directory)
    info = verify_bundle(directory) if verify else read_bundle_info(directory)
    return Retriever.from_bundle(directory, info, device)
