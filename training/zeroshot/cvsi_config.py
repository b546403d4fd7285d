"""Config section `methods.cvsi`: CVSI's captioner, its caption editor (an LLM) and the weights of its fusion."""

from __future__ import annotations

from dataclasses import dataclass

CAPTIONERS = ("openai", "coca")


@dataclass
class CVSIConfig:
    """Where CVSI's captions and edited captions come from (`training.zeroshot.cvsi_texts`), and how the eval fuses
    their similarities with the phi query (`methods.phi`)."""

    captioner: str = "openai"
    """`openai`: any OpenAI-compatible vision chat endpoint (vLLM, SGLang, a hosted API, the scene oracle offline)
    writes the captions, the image sent as a data URL. `coca`: an open_clip CoCa model generates them locally."""
    captioner_endpoint: str = "http://127.0.0.1:8011/v1"
    """Base URL of the captioner's OpenAI-compatible API (`<endpoint>/chat/completions`)."""
    captioner_model: str = "scene-oracle"
    coca_model: str = "coca_ViT-L-14"
    """open_clip model name of the `coca` captioner."""
    coca_pretrained: str | None = "mscoco_finetuned_laion2b_s13b_b90k"
    """open_clip pretrained tag; its weights must already be in open_clip's cache (`coca_cache_dir`)."""
    coca_weights_file: str | None = None
    """A local open_clip CoCa checkpoint (`.safetensors`, `.pt`); when set, `coca_pretrained` is ignored."""
    coca_cache_dir: str | None = None
    """open_clip's download cache, where `coca_pretrained` is looked up (None: open_clip's default)."""
    coca_device: str = "auto"
    """Where CoCa generates: `auto` (the first GPU when there is one, else the CPU), `cpu`, `cuda`, `cuda:1`, ..."""
    coca_max_tokens: int = 30
    """Longest caption CoCa writes, in tokens (start of text included; at most CoCa's context of 76)."""
    coca_top_k: int = 20
    """CoCa's first caption is greedy; the others sample among the k likeliest tokens, seeded by the image."""
    captions_per_image: int = 3
    """Captions written per reference and gallery image (one request per image returns all of them)."""
    editor_endpoint: str = "http://127.0.0.1:8011/v1"
    """Base URL of the LLM that rewrites a reference's captions by the modification text (text only)."""
    editor_model: str = "scene-oracle"
    api_key_env: str = "OPENAI_API_KEY"
    """Environment variable holding the API key of both endpoints (never written anywhere by this project)."""
    concurrency: int = 4
    """Requests in flight at once (threads of this process)."""
    requests_per_second: float = 0.0
    """Cap on request starts per second over all threads (0: none)."""
    timeout_s: float = 120.0
    """Seconds one HTTP request may take."""
    max_retries: int = 6
    """Retries of a request after 429, 5xx, a timeout or a dropped connection, with exponential backoff."""
    backoff_s: float = 1.0
    """First backoff delay in seconds, doubled per retry (a server's `Retry-After` wins)."""
    repair_attempts: int = 1
    """Times an answer that is not valid JSON under its schema is sent back to be repaired before the item fails."""
    max_tokens: int = 1024
    """Completion tokens allowed per answer."""
    cache_dir: str = "runs/cvsi_cache"
    """Persistent response cache (captions and edits, CoCa's captions too): a rerun makes no call."""
    edited_weight: float = 0.6
    """Query: weight of the edited captions' similarity to the gallery."""
    pseudo_weight: float = 0.4
    """Query: weight of the phi pseudo-token query's similarity."""
    gallery_image_weight: float = 0.8
    """Gallery: weight of the image embedding."""
    gallery_caption_weight: float = 0.2
    """Gallery: weight of the image's captions' mean embedding."""

    def __post_init__(self) -> None:
        if self.captioner not in CAPTIONERS:
            raise ValueError(f"methods.cvsi.captioner={self.captioner!r} must be one of {CAPTIONERS}")
        for name in ("captions_per_image", "concurrency", "max_tokens", "coca_top_k"):
            if getattr(self, name) < 1:
                raise ValueError(f"methods.cvsi.{name} must be >= 1")
        for name in ("max_retries", "repair_attempts", "requests_per_second", "backoff_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"methods.cvsi.{name} must be >= 0")
        if self.timeout_s <= 0:
            raise ValueError("methods.cvsi.timeout_s must be > 0")
        if not 8 <= self.coca_max_tokens <= 76:
            raise ValueError("methods.cvsi.coca_max_tokens must be within 8..76 (CoCa's text context)")
        for name in ("edited_weight", "pseudo_weight", "gallery_image_weight", "gallery_caption_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"methods.cvsi.{name} must be >= 0")
        if self.edited_weight + self.pseudo_weight <= 0:
            raise ValueError("methods.cvsi.edited_weight and methods.cvsi.pseudo_weight must not both be 0")
        if self.gallery_image_weight + self.gallery_caption_weight <= 0:
            raise ValueError(
                "methods.cvsi.gallery_image_weight and methods.cvsi.gallery_caption_weight must not both be 0"
            )
        if not self.cache_dir:
            raise ValueError("methods.cvsi.cache_dir must name a directory")
