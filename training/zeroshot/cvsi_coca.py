"""CVSI's local captioner (`methods.cvsi.captioner: coca`): an open_clip CoCa model writing several captions of an
image, the same ones on every run.

open_clip's `CoCa.generate` needs the `transformers` package, which this project does not depend on, and samples
from torch's global random state. This decoder runs the model's own forward pass instead: the first caption is
greedy, each other one samples among the `coca_top_k` likeliest tokens with a generator seeded by the image's
content hash and the caption's index, so an image gets the same captions in any order, batch or process.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import threading
from pathlib import Path

import torch
from PIL import Image

from shards.generate.cache import ResponseCache, request_key
from shards.model_inputs import eval_transform, tokenizer
from training.model.towers import PretrainedWeightsUnavailable, create_open_clip
from training.zeroshot.cvsi_config import CVSIConfig

logger = logging.getLogger(__name__)

MIN_TOKENS = 5
"""Shortest caption in tokens, start of text included (open_clip's `min_seq_len`)."""
DECODER_VERSION = "coca-decode-v1"
"""Part of every cache key; bump it when the decoding below changes."""
RANDOM_INIT_SEED = 0
"""Seed of a CoCa built without weights (tests), so that its captions, like a trained one's, never change."""


def weights_identity(config: CVSIConfig) -> str:
    """What decides the CoCa weights, for the cache key: the weights file's sha256, the pretrained tag, or
    `random` (no weights: random init with a fixed seed)."""
    if config.coca_weights_file:
        path = Path(config.coca_weights_file)
        if not path.is_file():
            raise FileNotFoundError(f"methods.cvsi.coca_weights_file: no such file {path}")
        digest = hashlib.sha256()
        with path.open("rb") as weights:
            for block in iter(lambda: weights.read(1 << 24), b""):
                digest.update(block)
        return f"file-sha256:{digest.hexdigest()}"
    return f"tag:{config.coca_pretrained}" if config.coca_pretrained else "random"


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _initialise_decoder_projection(model: torch.nn.Module) -> None:
    """Random-init the caption decoder's output projection, which open_clip leaves as `torch.empty` (its
    `MultimodalTransformer.init_parameters` is never called): uninitialised memory, zeros one run and NaN the next.
    Loaded weights overwrite it; only a CoCa without weights needs this."""
    projection = getattr(getattr(model, "text_decoder", None), "text_projection", None)
    if isinstance(projection, torch.nn.Parameter):
        generator = torch.Generator().manual_seed(RANDOM_INIT_SEED)
        values = torch.randn(projection.shape, generator=generator) * projection.shape[0] ** -0.5
        with torch.no_grad():
            projection.copy_(values.to(projection.device, projection.dtype))


class CocaCaptioner:
    """One CoCa model, loaded once; `captions(...)` per image."""

    def __init__(self, config: CVSIConfig) -> None:
        self.device = _device(config.coca_device)
        self.max_tokens, self.top_k = config.coca_max_tokens, config.coca_top_k
        weights_file, tag = config.coca_weights_file, None if config.coca_weights_file else config.coca_pretrained
        try:
            with torch.random.fork_rng(devices=[]):  # random init is reproducible, the caller's RNG untouched
                torch.manual_seed(RANDOM_INIT_SEED)
                model = create_open_clip(config.coca_model, tag, weights_file, config.coca_cache_dir, self.device)
            if not tag and not weights_file:
                _initialise_decoder_projection(model)
        except PretrainedWeightsUnavailable as error:
            raise PretrainedWeightsUnavailable(
                f"methods.cvsi: no weights for the CoCa captioner {config.coca_model!r} tag {tag!r} here. Set "
                f"methods.cvsi.coca_weights_file=/path/to/open_clip_model.safetensors, or methods.cvsi.coca_cache_dir "
                f"to an open_clip cache that holds the tag, or use methods.cvsi.captioner=openai. Detail: {error}"
            ) from error
        except ValueError as error:
            raise ValueError(f"methods.cvsi.coca_model / coca_pretrained / coca_weights_file: {error}") from error
        if not hasattr(model, "text_decoder"):
            raise ValueError(f"methods.cvsi.coca_model={config.coca_model!r} is not a CoCa model (no text decoder)")
        if not tag and not weights_file:
            logger.warning(
                "cvsi: CoCa %s has random weights (no coca_pretrained or coca_weights_file)", config.coca_model
            )
        self.model = model.eval()
        self.transform = eval_transform(config.coca_model)
        self.tokenizer = tokenizer(config.coca_model)
        self.start, self.end = self.tokenizer.sot_token_id, self.tokenizer.eot_token_id
        self.pad = int(getattr(model, "pad_id", 0))

    @torch.no_grad()
    def captions(self, image_bytes: bytes, image_hash: str, count: int) -> list[str]:
        """`count` captions of one image: greedy first, then seeded top-k samples."""
        image = Image.open(io.BytesIO(image_bytes)).convert("RGB")
        pixels = self.transform(image).unsqueeze(0).to(self.device)
        latent, tokens = self.model._encode_image(pixels)
        written = []
        for index in range(count):
            generator = None
            if index:
                seed = int.from_bytes(hashlib.sha256(f"{image_hash}:{index}".encode()).digest()[:8], "big")
                generator = torch.Generator().manual_seed(seed)
            written.append(self._decode(pixels, latent, tokens, generator))
        return written

    def _decode(
        self, pixels: torch.Tensor, latent: torch.Tensor, tokens: torch.Tensor, generator: torch.Generator | None
    ) -> str:
        ids = [self.start]
        while len(ids) < self.max_tokens:
            text = torch.tensor([ids], device=self.device)
            out = self.model(pixels, text, image_latent=latent, image_embs=tokens, output_labels=False)
            logits = out["logits"][0, -1].float().cpu()  # sampled on the CPU: the same draws on any device
            logits[self.start] = float("-inf")
            if len(ids) < MIN_TOKENS:
                logits[[self.end, self.pad]] = float("-inf")
            if generator is None:
                token = int(logits.argmax())
            else:
                best = logits.topk(min(self.top_k, logits.numel()))
                choice = torch.multinomial(torch.softmax(best.values, dim=0), 1, generator=generator)
                token = int(best.indices[choice])
            if token in (self.end, self.pad):  # open_clip's generate also ends a caption at the pad token
                break
            ids.append(token)
        return " ".join(self.tokenizer.decode(ids[1:]).split())


class CachedCoca:
    """CoCa's captions of an image by content hash, through the response cache: the model is loaded on the first
    miss only, so a rerun loads nothing. One generation at a time (thread-safe)."""

    def __init__(self, config: CVSIConfig, cache: ResponseCache) -> None:
        self.config, self.cache = config, cache
        self.settings = {
            "weights": weights_identity(config),  # before any image: a missing weights file is no per-image failure
            "count": config.captions_per_image,
            "max_tokens": config.coca_max_tokens,
            "top_k": config.coca_top_k,
        }
        self.generations = 0
        """Images captioned by the model in this run (cache hits excluded)."""
        self._captioner: CocaCaptioner | None = None
        self._lock = threading.Lock()

    def __call__(self, path: Path, image_hash: str) -> list[str]:
        """The image's captions; raises OSError when the file cannot be read."""
        key = request_key(DECODER_VERSION, self.config.coca_model, "coca_captions", [image_hash], [], self.settings)
        cached = self.cache.get(key)
        if cached is not None:
            return json.loads(cached["text"])["captions"]
        image_bytes = Path(path).read_bytes()
        with self._lock:
            if self._captioner is None:
                self._captioner = CocaCaptioner(self.config)
            captions = self._captioner.captions(image_bytes, image_hash, self.settings["count"])
            self.generations += 1
        self.cache.put(key, {"text": json.dumps({"captions": captions}), "prompt_tokens": 0, "completion_tokens": 0})
        return captions
