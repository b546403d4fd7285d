"""What a retrieval method is: how it turns (reference image, text) into a query embedding and a gallery image into
a gallery embedding. The benchmarks and metrics stay the same for every method.

A method is one module in this package that calls `register_method`. Methods read the towers through shared
per-batch views, so scoring ConText-CIR beside the zero-shot baselines runs each tower once per batch.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any

from training.registry import Registry

if TYPE_CHECKING:  # config validation reads the registry's names: keep torch out of that import
    import torch


CLIP_IMAGE_SPACE = "clip_image"
"""The gallery space of CLIP's own image embedding, shared by every method that ranks against it."""


class QueryBatch:
    """One batch of composed queries on the device; the towers run at most once for all methods.

    With `np_spans` and `np_mask` (a benchmark that scores grounding) the same pass also yields the concept maps.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        reference_images: torch.Tensor,
        caption_ids: torch.Tensor,
        np_spans: torch.Tensor | None = None,
        np_mask: torch.Tensor | None = None,
        texts: list[str] | None = None,
        query_ids: list[str] | None = None,
    ) -> None:
        self.model = model
        self.reference_images = reference_images
        self.caption_ids = caption_ids
        self.np_spans = np_spans
        self.np_mask = np_mask
        self.texts = texts or []
        """The query texts as read (methods that build their own sentences from them)."""
        self.query_ids = query_ids or []
        self.shared: dict = {}
        """Per-batch results methods with their own networks share (`own_image_embedding`)."""

    @cached_property
    def views(self) -> dict[str, torch.Tensor]:
        """`fused/query`, `img/reference`, `txt/caption` (and `fused/np_maps`) from one pass of each tower."""
        return self.model.encode_query_views(self.reference_images, self.caption_ids, self.np_spans, self.np_mask)


class GalleryBatch:
    """One batch of gallery images on the device; the image tower runs at most once for all methods."""

    def __init__(self, model: torch.nn.Module, images: torch.Tensor, names: list[str] | None = None) -> None:
        self.model = model
        self.images = images
        self.names = names or []
        """The gallery names of the images (methods that look up per-image texts)."""
        self.shared: dict = {}
        """Per-batch results methods with their own networks share (`own_image_embedding`)."""

    @cached_property
    def features(self):
        """The image tower's tokens and CLIP embedding (`training.model.towers.ImageFeatures`)."""
        return self.model.backbone.encode_image(self.images)


def own_image_embedding(network: torch.nn.Module, batch: QueryBatch | GalleryBatch) -> torch.Tensor:
    """The CLIP image embedding of the batch's reference (query) or gallery images by `network`'s own towers, once
    per batch however many methods share that network (phi and cvsi)."""
    key = ("image_embedding", id(network))
    if key not in batch.shared:
        images = batch.reference_images if isinstance(batch, QueryBatch) else batch.images
        batch.shared[key] = network.backbone.encode_image(images).embedding
    return batch.shared[key]


class MethodError(ValueError):
    """A method cannot run as configured (no trained checkpoint, an unreachable endpoint); the message says what to
    set or start."""


@dataclass
class MethodContext:
    """What a method may read before a split is encoded: the eval job's config, the device, the split."""

    config: Any
    """The root config of the eval job (`methods`, `model`, `eval` sections)."""
    device: torch.device
    split: Any
    """The `BenchmarkSplit` about to be encoded."""
    backbone: str | None = None
    """The backbone whose eval transform decodes the images every method reads (the checkpoint's)."""

    def check_inputs(self, method: str, backbone: str) -> None:
        """Raise `MethodError` when `backbone` (a method's own towers) needs other image inputs than the decoded ones
        (another size or normalisation): every method reads the same decoded pixels."""
        from shards import model_inputs

        if self.backbone is None or backbone == self.backbone:
            return
        ours, theirs = (model_inputs.image_size(name) for name in (backbone, self.backbone))
        norms = (model_inputs.normalisation(name) for name in (backbone, self.backbone))
        if ours != theirs or len(set(map(str, norms))) != 1:
            raise MethodError(
                f"{method}: its towers ({backbone}, {ours} px) read other image inputs than the checkpoint's "
                f"({self.backbone}, {theirs} px); score it beside a checkpoint of the same image size and normalisation"
            )


class Method(ABC):
    """A retrieval method scored by the eval job. Embeddings need not be normalised: the encoder normalises (the
    gallery's only where `normalise_gallery`)."""

    normalise_gallery: bool = True
    """False for a method whose gallery embedding is a weighted sum of unit parts that must keep its length."""

    name: str
    """Its name in `eval.baselines`, results and the docs."""
    summary: str
    """One line for the docs table."""

    def gallery_space(self, model: torch.nn.Module) -> str:
        """Methods that return the same gallery embedding name the same space, so the gallery is encoded once."""
        return self.name

    def prepare(self, context: MethodContext) -> None:
        """Load what the method needs beyond the checkpoint (its own network, texts of the split's images) before
        the split is encoded; called once per split. Most methods need nothing."""
        return None

    @abstractmethod
    def encode_query(self, batch: QueryBatch) -> torch.Tensor:
        """(B, D) query embeddings of a batch."""

    @abstractmethod
    def encode_gallery(self, batch: GalleryBatch) -> torch.Tensor:
        """(B, D) gallery embeddings of a batch."""


METHODS: Registry[Method] = Registry("method", "training.evaluation.methods")

METHOD_ALIASES = {"sum": "image_text_sum"}
"""Short names accepted wherever methods are named (`--methods`, `eval.baselines`)."""


def method_name(name: str) -> str:
    """The registered name of `name` or its alias."""
    return METHOD_ALIASES.get(name, name)


def register_method(method: Method) -> Method:
    """Make `method` known to the eval job, the config validation (`eval.baselines`) and the docs."""
    return METHODS.register(method.name, method)
