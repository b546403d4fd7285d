"""Config section `pretrain`: the CLIP-style pretraining objective of the towers (`train.objective: towers`)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class PretrainConfig:
    """Image <-> description, region <-> phrase and phrase-map terms that pretrain the open_clip towers.

    Each sample is an image with its scene description as the caption and the description's noun phrases with their
    boxes (`np_boxes`). The fusion head is frozen and unused: only the towers learn.
    """

    temperature: float = 0.07
    """Softmax temperature of the image <-> description and region <-> phrase contrastive terms."""
    region_weight: float = 1.0
    """Weight of the region <-> phrase term: the mean of a box's projected patch tokens against phrase embeddings."""
    map_weight: float = 1.0
    """Weight of the phrase-map term: each phrase's similarity map over the patches, as a softmax, should put its
    mass inside the phrase's box (cross-entropy against a uniform in-box target)."""
    phrase_image_weight: float = 1.0
    """Weight of the phrase -> image term: a phrase alone should retrieve the images of the micro-batch that contain
    it (every image with the same phrase is a positive). It gives single concepts a global embedding, which the
    zero-shot image + text baseline and the methods built on CLIP's joint space rely on."""
    map_temperature: float = 0.1
    """Softmax temperature of the phrase-map term."""
    towers_out: str | None = None
    """Where `launch/pretrain_towers.py` writes the open_clip weights file (`.safetensors`) of the final checkpoint."""

    def __post_init__(self) -> None:
        if self.temperature <= 0 or self.map_temperature <= 0:
            raise ValueError("pretrain.temperature and pretrain.map_temperature must be positive")
        if min(self.region_weight, self.map_weight, self.phrase_image_weight) < 0:
            raise ValueError(
                "pretrain.region_weight, pretrain.map_weight and pretrain.phrase_image_weight must be >= 0"
            )
