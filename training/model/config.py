"""Config section `model`: the open_clip towers and the fusion head built on them."""

from __future__ import annotations

from dataclasses import dataclass

TARGET_ENCODINGS = ("clip", "fused_empty")
ATTENTION_IMPLS = ("fused", "eager")
FREEZE_CHOICES = ("none", "image", "text", "both")


@dataclass
class ModelConfig:
    """The ConText-CIR network: open_clip towers plus the cross-attention fusion head."""

    backbone: str = "ViT-B-32"
    """open_clip model name (`ViT-B-32`, `ViT-B-16`, `ViT-L-14`, `ViT-H-14`, any open_clip model, or `ContextTiny`)."""
    pretrained: str | None = None
    """open_clip pretrained tag (e.g. `laion2b_s32b_b79k`), fetched into `cache_dir` by open_clip; None: random init."""
    weights_file: str | None = None
    """Local open_clip weights (`.safetensors`, or a state dict loaded with weights_only=True); wins over `pretrained`."""
    cache_dir: str | None = None
    """open_clip's download cache for `pretrained`."""
    quick_gelu: bool | None = None
    """QuickGELU activations in the towers; None follows the model and the pretrained tag (OpenAI's weights use
    it). Checkpoints record the resolved value, so eval and export rebuild the same activation."""
    fusion_layers: int = 4
    """Cross-attention + FFN blocks in the fusion head."""
    fusion_heads: int = 8
    """Attention heads of each fusion block."""
    ffn_mult: int = 4
    """FFN hidden width as a multiple of the model width."""
    target_encoding: str = "clip"
    """Gallery/target encoder: `clip` (CLIP image embedding) or `fused_empty` (the fusion model with empty text)."""
    attention: str = "fused"
    """Fusion attention kernels: `fused` (scaled_dot_product_attention) or `eager` (reference, for tests)."""
    grad_checkpointing: bool = False
    """Activation checkpointing in the image and text towers."""
    compile: bool = False
    """Wrap the model in torch.compile."""
    init_from: str | None = None
    """A `model.safetensors` to initialise all weights from (weights only: no optimizer, step or data state)."""
    freeze: str = "none"
    """Towers kept fixed during training: `none`, `image`, `text` or `both`. Their parameters get
    requires_grad False and stay out of the optimizer; the fusion head, pooler and projection always train."""
    text_kv_layernorm: bool = False
    """An extra LayerNorm (one per fusion block) on the text tower's final states before the fusion keys and
    values. False feeds the states to the key/value projections as they are, as the released code does."""
    image_tokens_after_ln_post: bool = False
    """Take the image tokens the fusion head attends from after the image tower's final LayerNorm (`ln_post`).
    False takes them before it, as the released code does; the CLIP image embedding uses `ln_post` either way."""

    def __post_init__(self) -> None:
        if self.target_encoding not in TARGET_ENCODINGS:
            raise ValueError(f"model.target_encoding={self.target_encoding!r} must be one of {TARGET_ENCODINGS}")
        if self.attention not in ATTENTION_IMPLS:
            raise ValueError(f"model.attention={self.attention!r} must be one of {ATTENTION_IMPLS}")
        if self.fusion_layers < 1 or self.fusion_heads < 1 or self.ffn_mult < 1:
            raise ValueError("model.fusion_layers, model.fusion_heads and model.ffn_mult must be >= 1")
        if self.freeze not in FREEZE_CHOICES:
            raise ValueError(f"model.freeze={self.freeze!r} must be one of {FREEZE_CHOICES}")
