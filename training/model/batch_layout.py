"""Sizes the training forward takes from a batch's values, read on the host before the batch moves to the device.

The forward cuts caption PAD after the longest caption, keeps as many concept columns as the most NP tokens any
caption has, and runs the isolated pass over the real NPs only, cut after the longest of them. Each size comes
from tensor values: read from device tensors (`.item()`, `nonzero()`), each is a point where the host waits for the
GPU to finish all the work queued before it, five per forward. Read from the reader's host tensors before the copy,
they cost a few microseconds and the GPU's queue never drains.

The sizes are computed by the same functions the forward uses without a layout, so both paths give the same
tensors, bit for bit.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from training.model.fusion import ConceptColumns, text_length


@dataclass(frozen=True)
class BatchLayout:
    """What `ConTextCIR.forward` would otherwise read from device tensors."""

    caption_length: int
    """Tokens up to the batch's longest caption (its EOT), at least 1: the trimmed caption length."""
    concept_width: int | None
    """Concept columns of the in-context maps (the most NP tokens any caption has); None without NP spans."""
    np_rows: torch.Tensor | None
    """(M,) int64 flat indices `b * N + n` of the real NPs, None without NP ids; moved with the batch (`to`)."""
    np_count: int
    """M: the real NPs of the batch."""
    np_length: int
    """Tokens up to the longest real NP's EOT (the isolated pass's text length), at least 1."""
    isolated_width: int
    """Concept columns of the isolated maps (the most tokens one NP has between SOT and EOT)."""

    @classmethod
    def of(
        cls,
        caption_ids: torch.Tensor,
        np_spans: torch.Tensor | None = None,
        np_mask: torch.Tensor | None = None,
        np_ids: torch.Tensor | None = None,
    ) -> BatchLayout:
        """The layout of a batch's host tensors (on a GPU this would cost the syncs it exists to avoid)."""
        caption_length = text_length(caption_ids)
        concept_width = None
        if np_spans is not None and np_mask is not None and np_mask.shape[1] > 0:
            concept_width = ConceptColumns.from_spans(np_spans, np_mask, caption_length).columns.shape[1]
        np_rows, np_count, np_length, isolated_width = None, 0, 1, 1
        if np_ids is not None and np_mask is not None:
            np_rows = np_mask.reshape(-1).nonzero().squeeze(1)
            np_count = int(np_rows.numel())
            if np_count:
                ids = np_ids.reshape(-1, np_ids.shape[-1])[np_rows]
                np_length = text_length(ids)
                isolated_width = ConceptColumns.isolated(ids[:, :np_length]).columns.shape[1]
        return cls(caption_length, concept_width, np_rows, np_count, np_length, isolated_width)

    @classmethod
    def of_batch(cls, batch: Mapping[str, Any]) -> BatchLayout | None:
        """The layout of a reader batch (host tensors), None for a batch without captions."""
        if "caption_ids" not in batch:
            return None
        return cls.of(batch["caption_ids"], batch.get("np_spans"), batch.get("np_mask"), batch.get("np_ids"))

    def to(self, device: torch.device | str) -> BatchLayout:
        """The layout with its index tensor on `device` (an asynchronous copy, like the batch's)."""
        if self.np_rows is None:
            return self
        return dataclasses.replace(self, np_rows=self.np_rows.to(device, non_blocking=True))
