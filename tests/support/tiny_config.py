"""configs/tiny.yaml, and the overrides that shrink it for tests."""

from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
TINY = REPO_ROOT / "configs" / "tiny.yaml"


def tiny_overrides(tmp_path: Path, shards_dir: Path, **extra: object) -> list[str]:
    """configs/tiny.yaml shrunk for tests: 2 ranks x micro-batch 4 x accumulation 2, one fusion layer."""
    values = {
        "data.shards_dir": str(shards_dir),
        "data.loader_workers": 0,
        "data.shuffle_buffer": 16,
        "model.fusion_layers": 1,
        "train.micro_batch": 4,
        "train.global_batch": 16,
        "cluster.num_workers": 2,
        "cluster.storage_path": str(tmp_path / "runs"),
        "cluster.run_name": "test",
        "optim.warmup_steps": 2,
        "logging.every": 1,
        "logging.image_every": 1000,
    } | extra
    return [f"{key}={value}" for key, value in values.items()]
