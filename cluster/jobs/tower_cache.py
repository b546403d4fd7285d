"""Pretrained towers, cached by what made them: the pretraining job's data and config (DESIGN section 14).

`pretrained_towers(config)` returns the open_clip weights file of a `train.objective: towers` config:

1. The digest covers the shard set's `index.json` (every shard's sha256) and the resolved config without what does
   not change the weights (the cluster section but its worker count and GPU use, eval, index, serve, the output
   path, and where the data lives: the shards' and sources' paths).
2. A cached file for that digest under `<storage>/towers/` is reused as it is.
3. Otherwise the run `<run_name>-<digest[:12]>` trains on Ray + DeepSpeed (resuming if it was interrupted), and the
   towers of its final checkpoint are written as open_clip's own state dict to the cache, by atomic rename.

Either way the file is copied to `pretrain.towers_out`, where a ConText config points `model.weights_file`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from cluster.root_config import RootConfig
from shards.format import INDEX_NAME
from shards.stream.reader import shard_store
from training.config_loader import to_yaml

IRRELEVANT_SECTIONS = ("cluster", "eval", "index", "serve")


class TowerCacheError(RuntimeError):
    """The pretraining job cannot run as configured (wrong objective, no shards, no output path)."""


@dataclass
class TowersResult:
    path: Path
    """`pretrain.towers_out`."""
    cached: Path
    """The cache entry it was copied from."""
    digest: str
    reused: bool
    """True when the cache already held the towers (nothing was trained)."""
    run_dir: Path | None = None


def towers_digest(config: RootConfig) -> str:
    """sha256 over the shard index and the weight-relevant config."""
    store = shard_store(config.data)
    try:
        index_bytes = store.read_bytes(INDEX_NAME)
    except FileNotFoundError:
        raise TowerCacheError(
            f"no shard index at {store.where(INDEX_NAME)}: run launch/build_shards.py --config <this config> first"
        ) from None
    # Where the data lives is no part of it: the shard index above covers what the sources and shards hold, so a
    # moved checkout or another copy of the same shards finds the same towers.
    relevant = dataclasses.replace(
        config,
        pretrain=dataclasses.replace(config.pretrain, towers_out=None),
        data=dataclasses.replace(
            config.data, shards_dir="", sources=[], storage_options={}, read_retries=0, staging_dir=None
        ),
    )
    text = to_yaml(relevant)
    kept = "\n".join(block for block in _top_level_blocks(text) if block.split(":", 1)[0] not in IRRELEVANT_SECTIONS)
    placement = f"\nworkers: {config.cluster.num_workers}, gpu: {config.cluster.use_gpu}"  # negatives, precision
    digest = hashlib.sha256()
    digest.update(index_bytes)
    digest.update((kept + placement).encode())
    return digest.hexdigest()


def _top_level_blocks(text: str) -> list[str]:
    """A YAML mapping's text split into one block per top-level key."""
    blocks: list[list[str]] = []
    for line in text.splitlines():
        if line and not line[0].isspace() and not line.startswith("#"):
            blocks.append([])
        if blocks:
            blocks[-1].append(line)
    return ["\n".join(block) for block in blocks]


def cache_path(config: RootConfig, digest: str) -> Path:
    return Path(config.cluster.storage_path) / "towers" / f"{config.model.backbone}-{digest[:16]}.safetensors"


def check(config: RootConfig) -> None:
    """Refuse a config that is not a towers pretraining job with an output path."""
    if config.train.objective != "towers":
        raise TowerCacheError(f"train.objective is {config.train.objective!r}; pretraining needs 'towers'")
    if not config.pretrain.towers_out:
        raise TowerCacheError("pretrain.towers_out is not set: where should the towers go?")


def export_towers(checkpoint: Path, out: Path) -> None:
    """The open_clip towers of a checkpoint as open_clip's own state dict, written by atomic rename."""
    import torch

    from training.evaluation.runner import load_checkpoint_model
    from training.retrieval.bundle import save_open_clip_towers

    model, _ = load_checkpoint_model(checkpoint, torch.device("cpu"))
    out.parent.mkdir(parents=True, exist_ok=True)
    temporary = out.with_name(out.name + f".tmp{os.getpid()}")
    save_open_clip_towers(model.backbone.clip, temporary)
    os.replace(temporary, out)


def pretrained_towers(config: RootConfig) -> TowersResult:
    """The towers of this pretraining config: from the cache, or trained now (Ray must be connectable)."""
    check(config)
    digest = towers_digest(config)
    cached = cache_path(config, digest)
    out = Path(config.pretrain.towers_out)
    run_dir = None
    reused = cached.is_file()
    if not reused:
        from cluster.jobs.trainer import run_training
        from training.checkpoint import layout

        run_name = f"{config.cluster.run_name}-{digest[:12]}"
        config = dataclasses.replace(config, cluster=dataclasses.replace(config.cluster, run_name=run_name))
        run_dir = run_training(config)
        latest = layout.latest_complete(run_dir)
        if latest is None:
            raise TowerCacheError(f"the pretraining run {run_dir} finished without a complete checkpoint")
        export_towers(Path(latest[1]), cached)
        (cached.with_suffix(".json")).write_text(
            json.dumps({"digest": digest, "run_dir": str(run_dir), "checkpoint": str(latest[1])}, indent=2) + "\n"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    temporary = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.copyfile(cached, temporary)
    os.replace(temporary, out)
    return TowersResult(out, cached, digest, reused, run_dir)
