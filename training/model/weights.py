"""The network's weights as one safetensors file: what checkpoints publish for eval and `model.init_from` reads."""

from __future__ import annotations

from pathlib import Path

from torch import nn


def _unwrapped(model: nn.Module) -> nn.Module:
    return getattr(model, "_orig_mod", model)  # a `torch.compile(model)` wrapper


def save_model_weights(model: nn.Module, path: str | Path) -> None:
    """Write every parameter and persistent buffer of `model` to a safetensors file."""
    from safetensors.torch import save_file

    state = {name: tensor.detach().contiguous().cpu() for name, tensor in _unwrapped(model).state_dict().items()}
    save_file(state, str(path))


def load_model_weights(model: nn.Module, path: str | Path) -> None:
    """Load a `save_model_weights` file into `model` strictly; errors name the file and the mismatching keys."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model weights not found: {path}")
    target = _unwrapped(model)
    state = load_file(str(path), device="cpu")
    expected = target.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = sorted(name for name in set(state) & set(expected) if state[name].shape != expected[name].shape)
    if missing or unexpected or wrong_shape:
        raise ValueError(
            f"{path} does not fit this model (is model.backbone / fusion_layers the same?): missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}, wrong shape {wrong_shape[:5]}"
        )
    target.load_state_dict(state, strict=True)
