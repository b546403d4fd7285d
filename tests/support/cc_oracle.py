"""The test oracle for Text-CC: the straightforward way, written independently of training/fusion.py.

For every real NP, one sample at a time: the in-context map comes from an eager pass over the caption at its full
77 tokens; the isolated map re-encodes the reference image and runs the NP (padded to 77) through the whole fusion
stack, without gradient. Attention is computed here by hand from the blocks' weights; PAD keys are the positions
after the last non-zero id. Also builds the hand-made batches the tests feed to both implementations.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

SOT, EOT = 49406, 49407
CONTEXT = 77


def _image_tokens(model, image: torch.Tensor) -> torch.Tensor:
    """(Q, W) open_clip ViT tokens, CLS first: the final states, or after ln_post when the model is built so."""
    visual = model.backbone.clip.visual
    hidden = visual.transformer(visual._embeds(image[None]))
    return (visual.ln_post(hidden) if model.backbone.tokens_after_ln_post else hidden)[0]


def _text_states(model, ids: torch.Tensor) -> torch.Tensor:
    """(77, Wt) CLIP text states after ln_final, exactly as open_clip's `CLIP.encode_text` computes them."""
    clip = model.backbone.clip
    hidden = clip.token_embedding(ids[None]) + clip.positional_embedding
    return clip.ln_final(clip.transformer(hidden, attn_mask=clip.attn_mask))[0]


def _layer_probabilities(model, tokens: torch.Tensor, ids: torch.Tensor) -> list[torch.Tensor]:
    """Per fusion block, the (heads, Q, 77) attention probabilities of image tokens over the text's keys."""
    states = _text_states(model, ids)
    nonzero = (ids != 0).nonzero()
    valid = torch.arange(CONTEXT) <= nonzero.max()
    result = []
    for block in model.fusion.blocks:
        heads, width = block.heads, tokens.shape[-1]
        head_dim = width // heads
        query = block.q_proj(block.query_norm(tokens)).view(-1, heads, head_dim).transpose(0, 1)
        text = block.text_norm(states)  # an Identity unless model.text_kv_layernorm
        key = block.k_proj(text).view(-1, heads, head_dim).transpose(0, 1)
        value = block.v_proj(text).view(-1, heads, head_dim).transpose(0, 1)
        scores = query @ key.transpose(1, 2) / head_dim**0.5
        scores = scores.masked_fill(~valid, float("-inf"))
        probabilities = scores.softmax(dim=-1)
        result.append(probabilities)
        attended = (probabilities @ value).transpose(0, 1).reshape(-1, width)
        tokens = tokens + block.out_proj(attended)
        tokens = tokens + block.ffn(block.ffn_norm(tokens))
    return result


def _span_map(probabilities: list[torch.Tensor], start: int, end: int, prefix: int) -> torch.Tensor:
    """(P,) mean over layers, heads and the span's key columns of the patch rows' probabilities."""
    per_layer = [layer[:, prefix:, start:end].mean(dim=2).mean(dim=0) for layer in probabilities]
    return torch.stack(per_layer).mean(dim=0)


def reference_cc_loss(model, batch: dict, epsilon: float) -> torch.Tensor:
    """Text-CC loss the slow, obvious way: mean over real NPs of mean over patches of ReLU(|ctx - iso| - eps)."""
    prefix = model.backbone.image_prefix_tokens
    terms = []
    for sample in range(batch["caption_ids"].shape[0]):
        if not batch["np_mask"][sample].any():
            continue
        image = batch["reference_image"][sample]
        in_context = _layer_probabilities(model, _image_tokens(model, image), batch["caption_ids"][sample])
        for slot in batch["np_mask"][sample].nonzero().flatten().tolist():
            start, end = batch["np_spans"][sample, slot].tolist()
            context_map = _span_map(in_context, start, end, prefix)
            with torch.no_grad():
                np_ids = F.pad(batch["np_ids"][sample, slot], (0, CONTEXT - batch["np_ids"].shape[2]))
                length = int((np_ids != 0).nonzero().max())  # EOT position
                isolated = _layer_probabilities(model, _image_tokens(model, image), np_ids)
                isolated_map = _span_map(isolated, 1, length, prefix)
            terms.append(F.relu((context_map - isolated_map).abs() - epsilon).mean())
    if not terms:
        return torch.zeros(())
    return torch.stack(terms).mean()


def make_batch(
    caption_lengths: list[int],
    nps_per_caption: list[int],
    image_size: int = 64,
    max_nps: int = 10,
    np_length: int = 16,
    seed: int = 0,
) -> dict:
    """A reader-shaped batch of random tokens: caption b has `caption_lengths[b]` BPE tokens (75 puts EOT at 76)
    and `nps_per_caption[b]` NPs with random spans of 1..4 tokens; the last NP of a caption ends at its EOT
    (the 77-token edge for a 75-token caption)."""
    generator = torch.Generator().manual_seed(seed)
    batch_size = len(caption_lengths)
    caption_ids = torch.zeros(batch_size, CONTEXT, dtype=torch.long)
    np_spans = torch.zeros(batch_size, max_nps, 2, dtype=torch.long)
    np_mask = torch.zeros(batch_size, max_nps, dtype=torch.bool)
    np_ids = torch.zeros(batch_size, max_nps, np_length, dtype=torch.long)
    for sample, (length, count) in enumerate(zip(caption_lengths, nps_per_caption)):
        caption_ids[sample, 0] = SOT
        caption_ids[sample, 1 : length + 1] = torch.randint(1, 49400, (length,), generator=generator)
        caption_ids[sample, length + 1] = EOT
        for slot in range(count):
            span = int(torch.randint(1, min(4, length) + 1, (1,), generator=generator))
            if slot == count - 1:
                start = length + 1 - span  # touches EOT
            else:
                start = int(torch.randint(1, length - span + 2, (1,), generator=generator))
            np_spans[sample, slot] = torch.tensor([start, start + span])
            np_mask[sample, slot] = True
            np_ids[sample, slot, 0] = SOT
            np_ids[sample, slot, 1 : span + 1] = caption_ids[sample, start : start + span]
            np_ids[sample, slot, span + 1] = EOT
    return {
        "reference_image": torch.randn(batch_size, 3, image_size, image_size, generator=generator),
        "target_image": torch.randn(batch_size, 3, image_size, image_size, generator=generator),
        "caption_ids": caption_ids,
        "np_spans": np_spans,
        "np_mask": np_mask,
        "np_ids": np_ids,
    }
