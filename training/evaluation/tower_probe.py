"""Zero-shot text -> image retrieval of scene descriptions: does a pair of towers read what an image shows?

Each image of a synthetic split is described in `<root>/pretrain/<split>.jsonl` (DESIGN section 14). Every
description is a query over all images of the split; its own image is the only hit. Chance recall@1 is one over
the number of distinct images the descriptions could match, so the towers that pretraining produced should beat it
by far (the acceptance asks >= 10x); random towers sit at chance.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm


@dataclass
class DescriptionRetrieval:
    images: int
    recall: dict[int, float]
    """k -> share of descriptions whose image is in the top k (percent)."""

    @property
    def chance_at_1(self) -> float:
        """Percent recall@1 of a random ranking."""
        return 100.0 / self.images

    def line(self) -> str:
        recalls = "  ".join(f"R@{k} {value:.2f}" for k, value in self.recall.items())
        return f"description -> image over {self.images} images: {recalls}  (chance R@1 {self.chance_at_1:.3f})"


def read_descriptions(root: str | Path, split: str) -> list[tuple[Path, str]]:
    """(image file, description) of every image of a split."""
    manifest = Path(root) / "pretrain" / f"{split}.jsonl"
    if not manifest.is_file():
        raise FileNotFoundError(f"{manifest} not found: regenerate the benchmark with launch/make_synthetic.py")
    pairs = []
    for line in manifest.read_text().splitlines():
        if line.strip():
            entry = json.loads(line)
            pairs.append(((manifest.parent / entry["reference"]).resolve(), entry["caption"]))
    return pairs


@torch.no_grad()
def description_retrieval(
    backbone, transform, tokenize, pairs: list[tuple[Path, str]], ks=(1, 5, 10), batch_size: int = 128
) -> DescriptionRetrieval:
    """Recall@k of each description retrieving its own image among all images of `pairs` (eval mode, CPU or GPU)."""
    device = next(backbone.parameters()).device
    images, texts = [], []
    for start in tqdm(range(0, len(pairs), batch_size), desc="description retrieval", unit="batch", leave=False):
        chunk = pairs[start : start + batch_size]
        pixels = torch.stack([transform(Image.open(path).convert("RGB")) for path, _ in chunk]).to(device)
        images.append(F.normalize(backbone.encode_image(pixels).embedding.float(), dim=-1))
        ids = tokenize([text for _, text in chunk]).to(device)
        texts.append(F.normalize(backbone.text_embedding(backbone.encode_text(ids), ids).float(), dim=-1))
    similarity = torch.cat(texts) @ torch.cat(images).T
    own = similarity.diagonal()
    rank = (similarity > own[:, None]).sum(dim=1)  # images scored strictly above the description's own
    recall = {k: float((rank < k).float().mean() * 100) for k in ks}
    return DescriptionRetrieval(images=len(pairs), recall=recall)
