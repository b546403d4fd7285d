"""Inference bundles: a trained checkpoint as a self-contained directory that needs neither DeepSpeed nor Ray.

    <bundle>/bundle.json                  format, model section, tokenizer, preprocessing, source, weights hash
    <bundle>/model.safetensors            every parameter of the ConText-CIR network
    <bundle>/open_clip_model.safetensors  the fine-tuned CLIP towers alone, loadable by open_clip itself
    <bundle>/<model_name>.json            the towers' open_clip config: open_clip's own keys only, the activation
                                          the towers were trained with (`quick_gelu`) included

`export_bundle` writes one from a checkpoint; `load_bundle` turns one into a `Retriever`. The towers load in plain
open_clip, in an interpreter that imports nothing of this project (`<model_name>` is bundle.json's
`open_clip.model_name`, e.g. `ContextTiny` or `ViT-H-14`):

    import open_clip
    open_clip.add_model_config("<bundle>/<model_name>.json")    # registers the config under the file's stem
    model, _, preprocess = open_clip.create_model_and_transforms(
        "<model_name>", pretrained="<bundle>/open_clip_model.safetensors")
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from shards.format import file_sha256
from training.retrieval.manifest import (  # noqa: F401  (the bundle's public names)
    BUNDLE_FORMAT,
    MANIFEST,
    TOWERS,
    WEIGHTS,
    BundleError,
    BundleInfo,
    Preprocessing,
    read_bundle_info,
    towers_config_name,
    verify_bundle,
)


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
        towers_config = open_clip_config(model_config(backbone), resolved.quick_gelu)
        (staging / towers_config_name(backbone)).write_text(json.dumps(towers_config, indent=2) + "\n")
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
                "config": towers_config_name(backbone),
                "quick_gelu": towers_config["quick_gelu"],
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


def open_clip_config(architecture: dict[str, Any], quick_gelu: bool | None) -> dict[str, Any]:
    """The towers' config as open_clip itself writes one: its architecture keys and nothing of ours (open_clip passes
    every key to the model's constructor, which rejects any other), with the activation the towers were built with.

    `quick_gelu` is what the checkpoint recorded; a config that names QuickGELU itself (the `-quickgelu` models)
    keeps it, as the project's `force_quick_gelu` only ever turns it on.
    """
    return {**architecture, "quick_gelu": bool(architecture.get("quick_gelu")) or bool(quick_gelu)}


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
