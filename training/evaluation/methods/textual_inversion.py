"""Textual inversion (SEARLE / LinCIR family): "a photo of $ that {text}", `$` being phi of the reference image.

phi comes from a phi run of this system (`methods.phi.checkpoint`, scored on that run's frozen towers) or from a
file as SEARLE or LinCIR release it (`methods.phi.released_weights`, scored on the towers of the `model` section).
The gallery is the same towers' CLIP image embedding.
"""

from __future__ import annotations

import dataclasses
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

if TYPE_CHECKING:  # config validation reads the registry's names: keep torch out of that import
    import torch


_LOADED: dict = {}
"""The one phi network loaded in this process (phi and cvsi share it), by what it was loaded from."""


def phi_network(context: MethodContext) -> torch.nn.Module:
    """The `PhiNetwork` that `methods.phi` names, loaded once per source, settings and device and shared.

    Raises:
        MethodError: neither a checkpoint nor released weights are set, they cannot be loaded, or its towers need
            other image inputs than the checkpoint's.
    """
    from safetensors import SafetensorError

    from training.zeroshot.networks import resolve_trained

    settings = context.config.methods.phi
    source = settings.checkpoint or settings.released_weights
    if not source:
        raise MethodError(
            "set methods.phi.checkpoint (a phi run, e.g. runs/phi_tiny/checkpoints/latest after `python "
            "launch/train.py --config configs/phi_tiny.yaml`) or methods.phi.released_weights to score phi"
        )
    try:
        resolved = str(resolve_trained(settings.checkpoint)) if settings.checkpoint else source
        key = (resolved, repr(settings), repr(context.config.model), str(context.device))
        if key not in _LOADED:
            _LOADED.clear()
            _LOADED[key] = _load(context, settings)
    except (OSError, ValueError, RuntimeError, SafetensorError) as error:
        raise MethodError(f"phi: cannot load {source}: {error}") from error
    network = _LOADED[key]
    context.check_inputs("phi", network.backbone_name)
    return network


def _load(context: MethodContext, settings) -> torch.nn.Module:
    from training.zeroshot.networks import load_method_network

    if settings.checkpoint:
        return load_method_network(settings.checkpoint, "phi", context.device)
    from training.zeroshot.phi_net import PhiNetwork
    from training.zeroshot.phi_weights import load_released_phi, phi_dims

    state = load_released_phi(settings.released_weights, settings.released_format)
    _, hidden, _ = phi_dims(state)
    released = dataclasses.replace(settings, hidden_dim=hidden, dropout=0.0, normalise_input=False)
    network = PhiNetwork(context.config.model, released)
    network.phi.load_state_dict(state, strict=True)
    network.backbone_name = context.config.model.backbone
    return network.to(context.device).eval()


class TextualInversion(Method):
    name = "phi"
    summary = "textual inversion: 'a photo of $ that {text}', $ = phi(reference image) (methods.phi)"

    def __init__(self) -> None:
        self.network = None

    def gallery_space(self, model: torch.nn.Module) -> str:
        return "phi_towers"

    def prepare(self, context: MethodContext) -> None:
        self.network = phi_network(context)

    def encode_query(self, batch: QueryBatch) -> torch.Tensor:
        image = own_image_embedding(self.network, batch)
        return self.network.query_embedding(image, batch.texts)

    def encode_gallery(self, batch: GalleryBatch) -> torch.Tensor:
        return own_image_embedding(self.network, batch)


PHI = register_method(TextualInversion())
