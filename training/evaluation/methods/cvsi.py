"""CVSI (ICDM 2025): captions and LLM edits fused with the textual-inversion query (DESIGN section 13).

- A captioner writes `methods.cvsi.captions_per_image` captions of every reference and gallery image; an LLM
  rewrites the reference's captions by the modification text and lists objects likely to be added. Both go through
  the data generator's OpenAI-compatible client and response cache (`training.zeroshot.cvsi_texts`): a rerun makes
  no call. Offline, the scene oracle answers both for synthetic images.
- The query is edited_weight x (the edited captions' mean CLIP text embedding, with "a photo of <added objects>")
  + pseudo_weight x the phi query "a photo of $ that {text}" (`methods.phi`), each part normalised.
- The gallery is gallery_image_weight x the CLIP image embedding + gallery_caption_weight x the mean embedding of
  its captions, each part normalised and the sum left unnormalised: the score of a query against an image is the
  weighted sum of the four cosine similarities, 0.6/0.4 against 0.8/0.2 by default.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from training.evaluation.methods.base import (
    GalleryBatch,
    Method,
    MethodContext,
    MethodError,
    QueryBatch,
    own_image_embedding,
    register_method,
)
from training.evaluation.methods.textual_inversion import phi_network

if TYPE_CHECKING:  # config validation reads the registry's names: keep torch out of that import
    import torch

logger = logging.getLogger(__name__)


def _mean_text_embedding(network, groups: list[list[str]], device) -> torch.Tensor:
    """(len(groups), D): each group's mean of normalised text embeddings, normalised; zeros for an empty group."""
    import torch
    import torch.nn.functional as F

    texts = [text for group in groups for text in group]
    out = torch.zeros(len(groups), network.backbone.embed_dim, device=device)
    if not texts:
        return out
    embeddings = F.normalize(network.text_embedding(texts).float(), dim=-1)
    at = 0
    for row, group in enumerate(groups):
        if group:
            out[row] = embeddings[at : at + len(group)].mean(dim=0)
            at += len(group)
    return F.normalize(out, dim=-1)


class CVSIMethod(Method):
    name = "cvsi"
    summary = "CVSI: LLM-edited captions + phi query, against image + caption (methods.cvsi, methods.phi)"
    normalise_gallery = False

    def __init__(self) -> None:
        self.network = None
        self.texts = None
        self.settings = None

    def gallery_space(self, model: torch.nn.Module) -> str:
        return self.name

    def prepare(self, context: MethodContext) -> None:
        from training.zeroshot.cvsi_texts import cvsi_texts

        self.network = phi_network(context)
        self.settings = context.config.methods.cvsi
        split = context.split
        names = set(split.gallery) | {query.reference for query in split.queries}
        images = {name: split.image_paths[name] for name in sorted(names)}
        queries = [(query.query_id, query.reference, query.text) for query in split.queries]
        try:
            self.texts = cvsi_texts(self.settings, images, queries)
            logger.info(
                "cvsi %s: captions of %d images and edits of %d queries, %d captioner/LLM calls (the rest cached in %s)",
                split.name,
                len(images),
                len(queries),
                self.texts.calls,
                self.settings.cache_dir,
            )
        except (OSError, RuntimeError, ValueError) as error:  # an endpoint that never answers, a captioner missing
            raise MethodError(f"cvsi: {error}") from error

    def encode_query(self, batch: QueryBatch) -> torch.Tensor:
        import torch.nn.functional as F

        device = batch.reference_images.device
        image = own_image_embedding(self.network, batch)
        pseudo = F.normalize(self.network.query_embedding(image, batch.texts).float(), dim=-1)
        groups = []
        for query_id in batch.query_ids:
            edit = self.texts.edits[query_id]
            added = [f"a photo of {', '.join(edit.added)}"] if edit.added else []
            groups.append(list(edit.captions) + added)
        edited = _mean_text_embedding(self.network, groups, device)
        return self.settings.edited_weight * edited + self.settings.pseudo_weight * pseudo

    def encode_gallery(self, batch: GalleryBatch) -> torch.Tensor:
        import torch.nn.functional as F

        device = batch.images.device
        image = F.normalize(own_image_embedding(self.network, batch).float(), dim=-1)
        captions = _mean_text_embedding(
            self.network, [self.texts.captions.get(name, []) for name in batch.names], device
        )
        return self.settings.gallery_image_weight * image + self.settings.gallery_caption_weight * captions


CVSI = register_method(CVSIMethod())
