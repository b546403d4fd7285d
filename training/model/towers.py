"""The open_clip towers the ConText-CIR network is built on.

`ClipBackbone` wraps an open_clip `CLIP` model and exposes what the fusion head needs without running anything
twice: the image tower gives its token sequence (CLS first, then the patch grid; before `ln_post` unless told
otherwise, as the released code takes them) and the projected CLIP image embedding from the same pass; the text tower gives per-token states after `ln_final` for ids of any length up to
the context (the tower is causal, so trailing PAD can be cut off without changing a single state at or before
EOT) and, from those states, the projected CLIP text embedding.

`build_backbone` makes the open_clip model by name: random init, a pretrained tag found in open_clip's cache, or
a local weights file. A tag that is not cached while the hub is off (`HF_HUB_OFFLINE=1`) or unreachable fails
within seconds with a message saying how to provide the weights, instead of waiting on the hub client's retries.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import open_clip
import torch
import torch.nn.functional as F
from open_clip.transformer import VisionTransformer, text_global_pool
from torch import nn

from shards.model_inputs import model_config, normalisation, normalise_images, register_project_models
from training.model.config import ModelConfig
from training.model.fusion import trim_padding

logger = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")
# Parameters of the open_clip model that ConText-CIR training never uses (the loss has its own fixed
# temperature; the text projection only serves the text-only baseline). Frozen, so that every trainable
# parameter receives a gradient each step, which ZeRO's gradient partitioning expects.
UNUSED_PARAMETERS = ("logit_scale", "logit_bias", "text_projection")


class PretrainedWeightsUnavailable(RuntimeError):
    """A pretrained tag's weights are neither cached nor downloadable here."""


@dataclass
class ImageFeatures:
    """One pass of the image tower."""

    tokens: torch.Tensor
    """(B, prefix + gh*gw, image_width): CLS (when the tower has one) then the patch grid, before `ln_post` (or
    after it, with `model.image_tokens_after_ln_post`)."""
    embedding: torch.Tensor
    """(B, embed_dim) projected CLIP image embedding, not normalised."""
    patches_after_ln_post: torch.Tensor | None = None
    """(B, gh*gw, image_width) the patch tokens after `ln_post`, open_clip's own pooling: what the towers' phrase
    maps (`ClipBackbone.phrase_cosines`) project. The same tensor as the patch part of `tokens` with
    `model.image_tokens_after_ln_post`."""


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def _download_host(pretrained_cfg: dict) -> str:
    """The host open_clip would download the tag's weights from (it prefers the Hugging Face hub)."""
    if pretrained_cfg.get("hf_hub"):
        return urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    return urlparse(pretrained_cfg.get("url", "")).hostname or ""


def _unreachable(host: str, timeout: float = 5.0) -> str | None:
    """Why `host` cannot be reached on port 443, or None. Skipped behind a proxy (the proxy decides)."""
    if any(os.environ.get(name) for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
    except OSError as error:
        return f"{host} unreachable: {error}"
    return None


def _cached_weights(pretrained_cfg: dict, cache_dir: str | None) -> str | None:
    """The local file holding a tag's weights when open_clip's cache already has it, else None."""
    if pretrained_cfg.get("file"):
        return pretrained_cfg["file"] if Path(pretrained_cfg["file"]).is_file() else None
    hub = pretrained_cfg.get("hf_hub", "")
    if hub:
        from huggingface_hub import try_to_load_from_cache

        repo_id, filename = os.path.split(hub)
        candidates = [filename] if filename else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
        if filename.endswith((".bin", ".pth")):
            candidates.insert(0, filename[:-4] + ".safetensors")
        for candidate in candidates:
            found = try_to_load_from_cache(repo_id, candidate, cache_dir=cache_dir)
            if isinstance(found, str):
                return found
        return None
    url = pretrained_cfg.get("url", "")
    if url:
        path = Path(cache_dir or Path.home() / ".cache" / "clip") / os.path.basename(url)
        return str(path) if path.is_file() else None
    return None


def _missing_weights_message(name: str, tag: str, detail: str) -> str:
    return (
        f"pretrained weights for open_clip model {name!r} tag {tag!r} are not available ({detail}). Either run "
        f"once where the hub is reachable so open_clip caches them (model.cache_dir), or download the open_clip "
        f"checkpoint yourself and set model.weights_file=/path/to/open_clip_model.safetensors (model.pretrained "
        f"is then ignored)"
    )


def load_open_clip_weights(clip_model: nn.Module, path: str | Path) -> None:
    """Load a local open_clip checkpoint into `clip_model`, strictly.

    Args:
        clip_model: the open_clip model the checkpoint was saved from (same architecture).
        path: `.safetensors` (read with safetensors) or a `.pt/.pth/.bin` state dict (torch.load, weights_only).

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: unsupported suffix, or keys/shapes that do not match the architecture.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model.weights_file: no such file {path}")
    if path.suffix not in WEIGHT_SUFFIXES:
        raise ValueError(f"model.weights_file={path}: expected one of {WEIGHT_SUFFIXES}")
    try:
        # open_clip's loader reads safetensors with safetensors and everything else with torch.load(weights_only=True),
        # and converts the known third-party layouts (OpenAI, `module.` prefixes) before a strict load.
        open_clip.load_checkpoint(clip_model, str(path), strict=True, weights_only=True)
    except RuntimeError as error:
        raise ValueError(f"model.weights_file={path} does not fit this open_clip model: {error}") from error


def tag_quick_gelu(name: str, pretrained: str | None) -> bool:
    """Whether open_clip model `name` with pretrained tag `pretrained` uses QuickGELU.

    Some tags (OpenAI's, a few others) were trained with QuickGELU while the plain model name builds GELU; the
    weights decide. Reads open_clip's tables only: nothing is downloaded.
    """
    register_project_models()
    if model_config(name).get("quick_gelu", False):
        return True
    if not pretrained:
        return False
    return bool((open_clip.get_pretrained_cfg(name, pretrained) or {}).get("quick_gelu", False))


def with_tower_flags(config: ModelConfig) -> ModelConfig:
    """`config` with every flag needed to rebuild the towers resolved (`quick_gelu`), as checkpoints record it.

    A checkpoint's weights file replaces the pretrained tag when it is evaluated or exported, so the activation the
    tag implied must be written down explicitly.
    """
    if config.quick_gelu is not None:
        return config
    return dataclasses.replace(config, quick_gelu=tag_quick_gelu(config.backbone, config.pretrained))


class _NoRandomInitNotice(logging.Filter):
    """Drops open_clip's "No pretrained weights loaded ... initialized randomly" warning: it is printed whenever no
    tag is given, also when `weights_file` or a checkpoint supplies the weights right after, so it misleads."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "No pretrained weights loaded" not in record.getMessage()


def create_open_clip(
    name: str,
    pretrained: str | None = None,
    weights_file: str | None = None,
    cache_dir: str | None = None,
    device: str | torch.device = "cpu",
    quick_gelu: bool | None = None,
) -> nn.Module:
    """The open_clip model `name`: random init, a pretrained tag, or a local weights file (which wins).

    Args:
        name: any open_clip model name, or `ContextTiny`.
        pretrained: open_clip pretrained tag; looked up in open_clip's cache before any download.
        weights_file: local open_clip checkpoint; when set, `pretrained` is ignored.
        cache_dir: open_clip's download cache.
        device: where to build; `meta` builds the architecture without allocating weights.
        quick_gelu: QuickGELU activations; None follows the model and the pretrained tag (`tag_quick_gelu`).

    Raises:
        ValueError: unknown model or tag, or a weights file that does not fit.
        PretrainedWeightsUnavailable: the tag's weights are not cached and cannot be fetched.
    """
    register_project_models()
    model_config(name)  # a clear error naming the known models for an unknown name
    device = torch.device(device)
    use_quick_gelu = tag_quick_gelu(name, pretrained) if quick_gelu is None else quick_gelu
    kwargs: dict = {"device": device, "force_quick_gelu": use_quick_gelu}
    tag = None if weights_file else pretrained
    if tag:
        pretrained_cfg = open_clip.get_pretrained_cfg(name, tag)
        if not pretrained_cfg:
            raise ValueError(
                f"model.pretrained={tag!r} is not an open_clip tag of {name!r}; known tags: "
                f"{open_clip.list_pretrained_tags_by_model(name)}"
            )
        cached = _cached_weights(pretrained_cfg, cache_dir)
        if cached is None:
            # Fail in seconds rather than after the hub client's minute of retries.
            if _hub_offline():
                raise PretrainedWeightsUnavailable(_missing_weights_message(name, tag, "not cached, HF_HUB_OFFLINE=1"))
            reason = _unreachable(_download_host(pretrained_cfg))
            if reason:
                raise PretrainedWeightsUnavailable(_missing_weights_message(name, tag, f"not cached, {reason}"))
        # A cached file is loaded straight from disk: no request to the hub at all.
        kwargs.update(pretrained=cached or tag, cache_dir=cache_dir)
    quiet = _NoRandomInitNotice()
    logging.getLogger().addFilter(quiet)
    try:
        if device.type == "meta":
            with torch.device("meta"):
                clip_model = open_clip.create_model(name, **kwargs)
        else:
            clip_model = open_clip.create_model(name, **kwargs)
    except RuntimeError as error:
        if tag and "download" in str(error).lower():
            raise PretrainedWeightsUnavailable(_missing_weights_message(name, tag, str(error))) from error
        raise
    finally:
        logging.getLogger().removeFilter(quiet)
    if weights_file:
        load_open_clip_weights(clip_model, weights_file)
        logger.info("loaded open_clip weights for %s from %s", name, weights_file)
    return clip_model


class ClipBackbone(nn.Module):
    """An open_clip `CLIP` model seen as an image tower (tokens + embedding) and a text tower (token states)."""

    lr_group = "tower"
    """The optimizer's parameter group of every parameter in here (`optim.tower_lr_mult` scales its lr)."""

    def __init__(
        self,
        clip_model: nn.Module,
        tokens_after_ln_post: bool = False,
        image_normalisation: tuple[Sequence[float], Sequence[float]] | None = None,
    ) -> None:
        """Wrap `clip_model`.

        Args:
            clip_model: an open_clip CLIP model with a ViT image tower.
            tokens_after_ln_post: `model.image_tokens_after_ln_post`.
            image_normalisation: (mean, std) that uint8 pixels are normalised with, the loaders' own
                (`shards.model_inputs.normalisation(backbone)`); by default the statistics open_clip gave the tower.
        """
        super().__init__()
        if not isinstance(getattr(clip_model, "visual", None), VisionTransformer):
            raise ValueError(
                f"ConText-CIR needs an open_clip ViT image tower with patch tokens; got "
                f"{type(getattr(clip_model, 'visual', None)).__name__}"
            )
        if clip_model.visual.attn_pool is not None:
            raise ValueError("ConText-CIR needs the ViT's patch grid; attention-pooled towers (CoCa) are not supported")
        text = getattr(clip_model, "text", clip_model)  # CustomTextCLIP keeps its tower in `.text`
        if not hasattr(text, "token_embedding") or getattr(text, "cls_emb", None) is not None:
            raise ValueError("ConText-CIR needs a CLIP-style causal text transformer (no HF text tower, no CLS token)")
        self.clip = clip_model
        self.tokens_after_ln_post = tokens_after_ln_post
        if image_normalisation is None:
            visual = clip_model.visual
            image_normalisation = (
                getattr(visual, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN,
                getattr(visual, "image_std", None) or open_clip.OPENAI_DATASET_STD,
            )
        mean, std = (torch.tensor(values, dtype=torch.float32).reshape(1, 3, 1, 1) for values in image_normalisation)
        # Buffers, so they move with the module and normalising costs no host-to-device copy; not persistent, so
        # checkpoints and weights files hold exactly what they held before.
        self.register_buffer("pixel_mean", mean, persistent=False)
        self.register_buffer("pixel_std", std, persistent=False)
        for name, parameter in clip_model.named_parameters():
            if name.split(".")[-1] in UNUSED_PARAMETERS:
                parameter.requires_grad_(False)

    def freeze(self, towers: str) -> None:
        """Fix the parameters of `towers` (`model.freeze`: none, image, text or both): requires_grad False.

        The image tower is open_clip's `visual`; everything else of the CLIP model is the text tower.
        """
        for name, parameter in self.clip.named_parameters():
            tower = "image" if name.startswith("visual.") else "text"
            if towers in (tower, "both"):
                parameter.requires_grad_(False)

    def token_embedding(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, T, text_width) the text tower's input embedding of `ids` (before positions)."""
        return self._text.token_embedding(ids)

    @property
    def _text(self) -> nn.Module:
        return getattr(self.clip, "text", self.clip)

    @property
    def image_width(self) -> int:
        return self.clip.visual.transformer.width

    @property
    def text_width(self) -> int:
        return self._text.transformer.width

    @property
    def embed_dim(self) -> int:
        return self.clip.visual.output_dim

    @property
    def image_prefix_tokens(self) -> int:
        """Tokens before the patch grid in `ImageFeatures.tokens` (the CLS token)."""
        return 1 if self.clip.visual.pool_type == "tok" else 0

    @property
    def patch_grid(self) -> tuple[int, int]:
        grid = self.clip.visual.grid_size
        return int(grid[0]), int(grid[1])

    @property
    def context_length(self) -> int:
        return int(self._text.positional_embedding.shape[0])

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Activation checkpointing of every residual block in both towers."""
        self.clip.set_grad_checkpointing(enable)

    def image_inputs(self, images: torch.Tensor) -> torch.Tensor:
        """The image tower's input (B,3,H,W) in its weights' dtype, on the images' device.

        uint8 `images` are pixels (the loaders' `uint8_transform`): they are normalised here, in float32 as
        open_clip's eval transform does, then cast. Any float dtype means images already normalised on the host
        (`eval_transform`: serving, image files), which pass unchanged but for the cast.
        """
        dtype = self.clip.visual.conv1.weight.dtype
        if images.dtype == torch.uint8:
            return normalise_images(images, self.pixel_mean.float(), self.pixel_std.float()).to(dtype)
        return images.to(dtype)

    def encode_image(self, images: torch.Tensor) -> ImageFeatures:
        """Tokens and projected embedding of `images` (B,3,H,W, uint8 pixels or normalised floats: `image_inputs`)
        from one pass of the image tower."""
        visual = self.clip.visual
        hidden = visual._embeds(self.image_inputs(images))
        hidden = visual.transformer(hidden)
        pooled, patches = visual._pool(hidden)  # open_clip's own pooling: ln_post, then CLS (or mean) and patches
        embedding = pooled @ visual.proj if visual.proj is not None else pooled
        after_ln_post = patches
        if not self.tokens_after_ln_post:
            pooled, patches = visual._global_pool(hidden)  # the same split of the states before ln_post
        tokens = torch.cat([pooled.unsqueeze(1), patches], dim=1) if self.image_prefix_tokens else patches
        return ImageFeatures(tokens=tokens, embedding=embedding, patches_after_ln_post=after_ln_post)

    def encode_text(self, ids: torch.Tensor, token_embeddings: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T, text_width) token states after `ln_final` for ids (B, T), any T up to the context length.

        `token_embeddings` (B, T, text_width) replaces the tower's embedding of `ids` (pseudo-words written into
        some positions: `training.zeroshot.pseudo_words`); `ids` still place the end-of-text token for pooling.
        """
        text = self._text
        length = ids.shape[1]
        if length > self.context_length:
            raise ValueError(f"text ids of length {length} exceed the tower's context {self.context_length}")
        cast_dtype = text.transformer.get_cast_dtype()
        tokens = text.token_embedding(ids) if token_embeddings is None else token_embeddings
        hidden = tokens.to(cast_dtype) + text.positional_embedding[:length].to(cast_dtype)
        causal = text.attn_mask[:length, :length] if text.attn_mask is not None else None
        hidden = text.transformer(hidden, attn_mask=causal)
        return text.ln_final(hidden)

    def text_embedding(self, states: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """(B, embed_dim) projected CLIP text embedding from `encode_text` states, not normalised."""
        text = self._text
        pool_type = getattr(text, "text_pool_type", getattr(text, "pool_type", "argmax"))
        eos_id = getattr(text, "text_eos_id", getattr(text, "eos_id", None))
        pooled = text_global_pool(states, ids, pool_type, eos_token_id=eos_id)
        projection = text.text_projection
        if projection is None:
            return pooled
        return projection(pooled) if isinstance(projection, nn.Linear) else pooled @ projection

    def phrase_cosines(
        self,
        patches: torch.Tensor,
        np_ids: torch.Tensor,
        np_mask: torch.Tensor,
        rows: torch.Tensor | None = None,
        length: int | None = None,
    ) -> torch.Tensor:
        """(B, N, P) float32 cosines between each projected patch token and each phrase's CLIP text embedding.

        The towers' own phrase map before its softmax over patches: the eval's `tower` map
        (`training.evaluation.phrase_maps.tower_maps`) and the `towers` Text-CC target read it. Gradients flow into
        both towers unless the caller disables them.

        Args:
            patches: (B, P, image_width) reference patch tokens after `ln_post` (`ImageFeatures.patches_after_ln_post`).
            np_ids: (B, N, L) each phrase's ids encoded alone (start token, its BPE ids, end token), zero padded.
            np_mask: (B, N) which phrases are real; other rows get cosine 0 (a uniform map after a softmax).
            rows: (M,) flat indices `b * N + n` of the real phrases when already known (`BatchLayout.np_rows`:
                no host sync); read from `np_mask` otherwise.
            length: tokens up to the longest real phrase's end token (`BatchLayout.np_length`), read if None.
        """
        batch, count, _ = np_ids.shape
        phrases = torch.zeros(batch * count, self.embed_dim, dtype=torch.float32, device=patches.device)
        rows = np_mask.reshape(-1).nonzero().squeeze(1) if rows is None else rows
        if rows.numel():
            ids = trim_padding(np_ids.reshape(batch * count, -1)[rows], length)
            embedded = F.normalize(self.text_embedding(self.encode_text(ids), ids).float(), dim=-1)
            phrases = phrases.index_copy(0, rows, embedded)
        projection = self.clip.visual.proj
        with torch.autocast(patches.device.type, enabled=False):  # bf16 cosines would tie patches that differ
            patches = patches.float()
            dense = F.normalize(patches @ projection.float() if projection is not None else patches, dim=-1)
            return torch.einsum("bpd,bnd->bnp", dense, phrases.reshape(batch, count, -1))


def build_backbone(config: ModelConfig, device: str | torch.device = "cpu") -> ClipBackbone:
    """`ClipBackbone` over `create_open_clip(...)` for the `model` section, its towers frozen per `model.freeze`;
    see `create_open_clip` for the errors."""
    clip_model = create_open_clip(
        config.backbone, config.pretrained, config.weights_file, config.cache_dir, device, config.quick_gelu
    )
    backbone = ClipBackbone(clip_model, config.image_tokens_after_ln_post, normalisation(config.backbone))
    backbone.freeze(config.freeze)
    return backbone
