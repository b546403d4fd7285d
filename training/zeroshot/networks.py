"""Build the objective a `train.objective` of these methods trains, and load a trained network back for eval.

A checkpoint of a phi or TisCIR run is an ordinary checkpoint of this system: `model.safetensors` holds the frozen
towers with the trained heads, and `config.yaml` the sections that rebuild the network (`model`, `train.objective`,
`methods`). Loading reads only those; nothing is unpickled.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch import nn

from training.config_loader import load_section
from training.model.config import ModelConfig
from training.model.towers import with_tower_flags
from training.zeroshot.config import MethodsConfig

METHOD_OBJECTIVES = ("phi", "tiscir")
"""`train.objective` values this package trains."""


def build_method_objective(objective: str, model_config: ModelConfig, methods: MethodsConfig) -> nn.Module:
    """The module the engine wraps for `train.objective` phi or tiscir; its `.model` is what checkpoints save."""
    if objective == "phi":
        from training.zeroshot.phi_net import PhiObjective

        return PhiObjective(model_config, methods.phi)
    if objective == "tiscir":
        from training.zeroshot.tiscir_net import TisCIRObjective

        return TisCIRObjective(model_config, methods.tiscir)
    raise ValueError(f"train.objective={objective!r} is not one of {METHOD_OBJECTIVES}")


def _saved_objective(config_file: Path) -> str:
    from omegaconf import OmegaConf

    saved = OmegaConf.load(config_file)
    return str(OmegaConf.select(saved, "train.objective", default="context"))


def resolve_trained(path: str | Path) -> Path:
    """A checkpoint directory, or `<run>/checkpoints/latest` -> the run's latest complete checkpoint.

    Raises:
        FileNotFoundError: nothing complete there.
    """
    from training.checkpoint import layout

    path = Path(path)
    if path.name == layout.LATEST and path.parent.name == layout.CHECKPOINTS:
        latest = layout.latest_complete(path.parent.parent)
        if latest is None:
            raise FileNotFoundError(f"{path}: the run has no complete checkpoint yet")
        return latest[1]
    if not (path.is_dir() and layout.is_complete(path)):
        raise FileNotFoundError(f"{path} is not a complete checkpoint directory")
    return path


def load_method_network(checkpoint: str | Path, objective: str, device: torch.device) -> nn.Module:
    """The trained network of a `train.objective: <objective>` checkpoint (a directory or `<run>/checkpoints/latest`),
    in eval mode on `device`; its `backbone_name` says which tokenizer reads its texts.

    The towers are rebuilt without their pretrained source (the weights file holds them).

    Raises:
        ValueError: the checkpoint was trained with another objective, or its files do not fit.
        FileNotFoundError: a file of the checkpoint is missing.
    """
    from training.checkpoint import layout
    from training.model.weights import load_model_weights

    checkpoint = resolve_trained(checkpoint)
    config_file, weights_file = checkpoint / layout.CONFIG, checkpoint / layout.WEIGHTS
    for needed in (config_file, weights_file):
        if not needed.is_file():
            raise FileNotFoundError(f"checkpoint file missing: {needed}")
    trained = _saved_objective(config_file)
    if trained != objective:
        raise ValueError(f"{checkpoint} was trained with train.objective={trained!r}, not {objective!r}")
    model_config = dataclasses.replace(
        with_tower_flags(load_section(config_file, "model", ModelConfig)),
        pretrained=None,
        weights_file=None,
        init_from=None,
        compile=False,
        grad_checkpointing=False,
    )
    methods = load_section(config_file, "methods", MethodsConfig)
    network = build_method_objective(objective, model_config, methods).model
    load_model_weights(network, weights_file)
    network.backbone_name = model_config.backbone
    return network.to(device).eval()
