"""Batched encoding of galleries and queries for every method at once: DataLoader workers decode images, bf16
autocast on CUDA, tqdm. Methods share each batch's tower passes (`training.evaluation.methods.base`).

Every embedding comes back as float32 on the CPU, L2-normalised again after autocast so that bf16 rounding never
tilts a ranking.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from shards.model_inputs import box_in_crop
from training.evaluation.benchmarks.base import BenchmarkSplit, GroundedPhrase
from training.evaluation.grounding import PhraseGrounding, score_maps
from training.evaluation.methods.base import GalleryBatch, Method, QueryBatch
from training.evaluation.phrase_maps import PhraseInputs, PhraseTokens, phrase_inputs, phrase_maps, query_pass_states

logger = logging.getLogger(__name__)

SpanFinder = Callable[[str, Sequence[GroundedPhrase]], list[PhraseTokens | None]]
"""(caption, phrases) -> each phrase's caption span and ids alone, None when it has no span (e.g. truncated away)."""


def resolve_device(setting: str) -> torch.device:
    """`auto` -> cuda when present, else cpu; `cuda` without a GPU is a clear error."""
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if setting == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("eval.device=cuda but torch sees no CUDA device")
    return torch.device(setting)


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA; full fp32 on CPU, where bf16 is slow and buys nothing."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


class ImageFiles(Dataset):
    """Images by path, through `transform` (the eval job's: the backbone's `uint8_transform`, whose pixels the model
    normalises on the device; a float `eval_transform` also works); also returns each image's (width, height)."""

    def __init__(self, paths: Sequence[Path], transform: Callable[[Image.Image], torch.Tensor]) -> None:
        self.paths = list(paths)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        path = self.paths[index]
        try:
            with Image.open(path) as image:
                image = image.convert("RGB")
        except (OSError, ValueError) as error:
            raise RuntimeError(f"cannot decode image {path}: {error}") from error
        return self.transform(image), torch.tensor(image.size, dtype=torch.int64)


def _image_batches(
    paths: Sequence[Path], transform, batch_size: int, workers: int, desc: str, device: torch.device
) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    loader = DataLoader(
        ImageFiles(paths, transform),
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        persistent_workers=False,
        pin_memory=device.type == "cuda",  # page-locked batches let the host-to-GPU copy overlap decoding
    )
    start = 0
    for pixels, sizes in tqdm(loader, desc=desc, unit="batch", leave=False, dynamic_ncols=True):
        yield start, pixels, sizes
        start += pixels.shape[0]


def _normalised(embeddings: torch.Tensor) -> torch.Tensor:
    return F.normalize(embeddings.float(), dim=-1).cpu()


@torch.no_grad()
def encode_gallery(
    model: torch.nn.Module,
    methods: Mapping[str, Method],
    paths: Sequence[Path],
    transform,
    device: torch.device,
    batch_size: int = 128,
    workers: int = 2,
    desc: str = "images",
    names: Sequence[str] | None = None,
) -> dict[str, torch.Tensor]:
    """Encode the gallery once per distinct gallery space of `methods`, in one decoding pass.

    Args:
        model: the loaded network the methods read, in eval mode on `device`.
        methods: the methods to be scored (result name -> method).
        paths: image files, in gallery order.
        transform: the backbone's `uint8_transform` (or its float `eval_transform`: the model takes either).
        names: the gallery names of `paths` (methods that look up per-image texts read them).

    Returns:
        gallery space -> (len(paths), D) float32 CPU tensor, L2-normalised (unless the method says otherwise).
    """
    encoders: dict[str, Method] = {}
    for method in methods.values():
        encoders.setdefault(method.gallery_space(model), method)
    outputs: dict[str, list[torch.Tensor]] = {space: [] for space in encoders}
    for start, pixels, _ in _image_batches(paths, transform, batch_size, workers, desc, device):
        stop = start + pixels.shape[0]
        batch = GalleryBatch(model, pixels.to(device, non_blocking=True), list(names[start:stop]) if names else None)
        with autocast(device):
            for space, method in encoders.items():
                embedding = method.encode_gallery(batch)
                outputs[space].append(_normalised(embedding) if method.normalise_gallery else embedding.float().cpu())
    return {space: torch.cat(chunks) if chunks else torch.zeros(0) for space, chunks in outputs.items()}


@dataclass
class QueryEncodings:
    """What one pass over a benchmark's queries produces."""

    embeddings: dict[str, torch.Tensor]
    """Result name of each method -> (Q, D) its query embeddings, L2-normalised."""
    grounding: list[PhraseGrounding] = field(default_factory=list)
    """Per grounded phrase with tokens, its in-context, isolated and tower maps scored against its box."""
    phrases_dropped: int = 0
    """Phrases whose tokens fell past the 77-token context (no map to score)."""


@torch.no_grad()
def encode_queries(
    model: torch.nn.Module,
    methods: Mapping[str, Method],
    benchmark: BenchmarkSplit,
    transform,
    tokenize: Callable[[list[str]], torch.Tensor],
    device: torch.device,
    batch_size: int = 128,
    workers: int = 2,
    find_spans: SpanFinder | None = None,
) -> QueryEncodings:
    """Encode every query with every method; score the model's grounding when the protocol asks.

    Args:
        model: a ConTextCIR in eval mode on `device`.
        methods: result name -> method.
        benchmark: the split whose queries to encode.
        transform: as `encode_gallery`'s.
        tokenize: the backbone's tokenizer (list of texts -> (B, 77) int64).
        find_spans: token spans of grounded phrases; required when `benchmark.protocol.grounding`.
    """
    queries = benchmark.queries
    caption_ids = tokenize([query.text for query in queries])
    tokens: list[list[PhraseTokens | None]] = []
    if benchmark.protocol.grounding:
        if find_spans is None:
            raise ValueError(f"{benchmark.name} scores grounding but no span finder was given")
        tokens = [find_spans(query.text, query.phrases) if query.phrases else [] for query in queries]
    result = QueryEncodings(embeddings={})
    chunks: dict[str, list[torch.Tensor]] = {name: [] for name in methods}
    reference_paths = [benchmark.image_paths[query.reference] for query in queries]
    batches = _image_batches(reference_paths, transform, batch_size, workers, f"{benchmark.name} queries", device)
    for start, pixels, sizes in batches:
        stop = start + pixels.shape[0]
        pixels = pixels.to(device, non_blocking=True)
        ids = caption_ids[start:stop].to(device, non_blocking=True)
        phrases, dropped = phrase_inputs(tokens[start:stop]) if tokens else (None, 0)
        result.phrases_dropped += dropped
        phrases = phrases.to(device) if phrases is not None else None
        spans, mask = (phrases.spans, phrases.mask) if phrases is not None else (None, None)
        texts = [query.text for query in queries[start:stop]]
        batch = QueryBatch(model, pixels, ids, spans, mask, texts, [query.query_id for query in queries[start:stop]])
        # The in-context maps come from the pass that encodes the queries, and its image-tower states feed the
        # isolated and tower maps: the image tower runs once per batch.
        recording = query_pass_states(model) if phrases is not None else contextlib.nullcontext()
        with autocast(device):
            with recording as states:
                for name, method in methods.items():
                    chunks[name].append(_normalised(method.encode_query(batch)))
            if phrases is not None:
                _score_grounding(queries[start:stop], phrase_maps(batch, states, phrases), phrases, sizes, result)
    result.embeddings = {name: torch.cat(parts) for name, parts in chunks.items()}
    return result


def _score_grounding(
    queries: Sequence,
    maps: Mapping[str, torch.Tensor],
    phrases: PhraseInputs,
    sizes: torch.Tensor,
    result: QueryEncodings,
) -> None:
    """Append every phrase's scored maps for one batch of queries (map kind -> (B, N, gh, gw))."""
    mask = phrases.mask.cpu()
    kinds, boxes, rows, columns = [], [], [], []
    for row, query in enumerate(queries):
        image_width, image_height = (int(value) for value in sizes[row])
        for column, phrase in enumerate(query.phrases):
            if mask[row, column]:
                kinds.append(phrase.kind)
                boxes.append(box_in_crop(phrase.box, image_width, image_height))
                rows.append(row)
                columns.append(column)
    scored = {kind: score_maps(kind_maps.float().cpu()[rows, columns], boxes) for kind, kind_maps in maps.items()}
    for index, kind in enumerate(kinds):
        result.grounding.append(PhraseGrounding(kind, {map_kind: scores[index] for map_kind, scores in scored.items()}))
