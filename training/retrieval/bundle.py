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
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from shards.format import file_sha256
from training.retrieval.manifest import (  # noqa: F401  (the bundle's public names)
    BUNDLE_FORMAT,
    MANIFEST,
    TOWERS,
    TOWERS_CONFIG,
    WEIGHTS,
    BundleError,
    BundleInfo,
    Preprocessing,
    read_bundle_info,
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
