"""Load textual-inversion phi weights as SEARLE (ICCV 2023) and LinCIR (CVPR 2024) release them.

How the two projects save and release phi (read from their sources):

- Both define the same `Phi` (LinCIR's `models.py` says it is copied from SEARLE's `src/phi.py`): `layers` =
  Linear, GELU, Dropout, Linear, GELU, Dropout, Linear, so the state dict keys are `layers.{0,3,6}.{weight,bias}`,
  exactly ours (`training.zeroshot.phi_net.Phi`). No LayerNorm; dropout 0.5 in training.
- Both save with `torch.save({'epoch': n, 'Phi': phi.state_dict()}, '<name>.pt')` (`save_phi` in SEARLE's
  `src/train_phi.py` and LinCIR's `train_phi.py`; the key is `phi.__class__.__name__`), and load with
  `torch.load(path)['Phi']` (SEARLE `hubconf.py`, LinCIR `validate.py` / `demo.py`). LinCIR saves
  `accelerator.unwrap_model(phi)`, so no `module.` prefix. SEARLE's `save_checkpoint` adds `optimizer`, `scaler`
  and `training_path` (a `pathlib.Path`) beside `Phi`.
- SEARLE releases `SEARLE_ViT-B32.pt` (512 -> 2048 -> 512) and `SEARLE_ViT-L14.pt` (768 -> 3072 -> 768) as GitHub
  release assets loaded through torch.hub; LinCIR links `lincir_large.pt` (768 -> 3072 -> 768, fp32) on the Hugging
  Face repo navervision/zeroshot-cir-models. LinCIR's dims are (projection_dim, 4 * projection_dim, text width):
  768/3072/768 for `large`, 1024/4096/1024 for `huge`, 1280/5120/1280 for `giga`.
- At query time both fill "a photo of $ that {caption}" and put phi's output at the `$` token (id 259 of CLIP's BPE).

Files are read with `torch.load(weights_only=True)`: tensors, containers and numbers only, never arbitrary objects
(the one addition is `pathlib` paths, for SEARLE's `training_path`). `.safetensors` files are read too.
"""

from __future__ import annotations

import pathlib
import pickle
import re
import struct
from collections.abc import Mapping
from pathlib import Path

import torch

FLAVOURS = ("searle", "lincir")

RELEASED_DIMS: dict[str, dict[str, tuple[int, int, int]]] = {
    "searle": {"ViT-B/32": (512, 2048, 512), "ViT-L/14": (768, 3072, 768)},
    "lincir": {"large": (768, 3072, 768), "huge": (1024, 4096, 1024), "giga": (1280, 5120, 1280)},
}
"""(input_dim, hidden_dim, output_dim) of each backbone's phi, by project (hubconf.py / train_phi.py of each)."""

PHI_KEYS = tuple(f"layers.{index}.{kind}" for index in (0, 3, 6) for kind in ("weight", "bias"))
"""The six tensors of our `Phi`."""

_WRAPPER_KEYS = ("Phi", "phi", "state_dict", "model", "module")
"""Keys a checkpoint may nest phi's state dict under; `Phi` (the class name) is what both projects write."""

_PREFIXES = ("module.", "_orig_mod.", "Phi.", "phi.")
"""Key prefixes stripped when every key carries them: DDP, torch.compile, a flattened `Phi` nesting."""

_SAFE_PATHS = [pathlib.PosixPath, pathlib.PurePosixPath, pathlib.PureWindowsPath]
"""Globals allowed beyond weights_only's defaults: building a path runs no code and touches no file."""

_REFUSED_GLOBAL = re.compile(r"Unsupported global: GLOBAL (\S+)")


class ReleasedWeightsError(ValueError):
    """A phi weights file that cannot be used; the message names the file and what is wrong."""


def load_released_phi(path: str | Path, flavour: str) -> dict[str, torch.Tensor]:
    """A phi state dict in our `Phi` layout from a file as `flavour` ("searle" or "lincir") releases it.

    Read with torch.load(weights_only=True, map_location="cpu"), never unpickling arbitrary objects; .safetensors
    files are read as well (by content, whatever the suffix). The release's nesting (`{"epoch", "Phi", ...}`) and
    key prefixes (`module.`) are removed; anything stored beside phi (epoch, optimizer, scaler) is left out. The
    result holds exactly the six tensors of the 3-layer MLP, with consistent shapes, on the CPU.
    """
    if flavour not in FLAVOURS:
        raise ValueError(f"flavour must be one of {FLAVOURS}, not {flavour!r}")
    path = Path(path)
    if not path.exists():
        raise ReleasedWeightsError(f"{path}: no such file ({flavour} phi weights)")
    if not path.is_file():
        raise ReleasedWeightsError(f"{path}: not a file ({flavour} phi weights)")
    kind = _sniff(path)
    content = _read_safetensors(path) if kind == "safetensors" else _read_torch(path)
    state = _strip_prefixes(_find_phi(content, path, flavour), path)
    _check_keys(state, path)
    _check_shapes(state, f"{path} ({flavour})")
    return {key: state[key].detach() for key in PHI_KEYS}


def phi_dims(state: Mapping[str, torch.Tensor]) -> tuple[int, int, int]:
    """(input_dim, hidden_dim, output_dim) of a loaded phi state dict (its shapes checked on the way)."""
    _check_keys(state, "state dict")
    return _check_shapes(state, "state dict")


def _sniff(path: Path) -> str:
    """'torch' (a zip or legacy torch.save file) or 'safetensors', from the first bytes of the file."""
    try:
        with path.open("rb") as stream:
            head = stream.read(9)
            size = path.stat().st_size
    except OSError as error:
        raise ReleasedWeightsError(f"{path}: cannot be read ({error})") from error
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":
        return "torch"
    if len(head) == 9 and head[8:9] == b"{" and 8 + struct.unpack("<Q", head[:8])[0] <= size:
        return "safetensors"
    raise ReleasedWeightsError(
        f"{path}: neither a torch.save file (zip or pickle) nor a safetensors file ({size} bytes, starts {head[:8]!r})"
    )


def _read_torch(path: Path) -> object:
    try:
        with torch.serialization.safe_globals(_SAFE_PATHS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        refused = _REFUSED_GLOBAL.search(str(error))
        if refused:
            raise ReleasedWeightsError(
                f"{path}: holds a pickled {refused.group(1)} object; such files are refused on purpose "
                "(loading uses torch.load(weights_only=True), which never runs pickled code). "
                "Save only tensors (a state dict), or convert the file to .safetensors"
            ) from None
        raise ReleasedWeightsError(f"{path}: not a readable torch.save file ({_first_line(error)})") from None
    except (RuntimeError, EOFError, ValueError, OSError, TypeError) as error:
        raise ReleasedWeightsError(f"{path}: not a readable torch.save file ({_first_line(error)})") from None


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as error:
        raise ReleasedWeightsError(f"{path}: not a readable safetensors file ({_first_line(error)})") from None


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def _is_phi_dict(content: Mapping) -> bool:
    return any(isinstance(key, str) and key.endswith("layers.0.weight") for key in content)


def _find_phi(content: object, path: Path, flavour: str, depth: int = 0) -> Mapping:
    """The mapping that holds phi's tensors: the file itself (a bare state dict) or what it nests phi under."""
    if not isinstance(content, Mapping):
        raise ReleasedWeightsError(f"{path}: holds a {type(content).__name__}, not a dict of phi weights")
    if _is_phi_dict(content):
        return content
    if depth < 3:
        for key in _WRAPPER_KEYS:
            if isinstance(content.get(key), Mapping):
                return _find_phi(content[key], path, flavour, depth + 1)
    if "state_dict_img2text" in content:
        raise ReleasedWeightsError(
            f"{path}: a Pic2Word img2text checkpoint ('state_dict_img2text'), not a {flavour} phi (another network)"
        )
    keys = ", ".join(repr(key) for key in list(content)[:12])
    raise ReleasedWeightsError(
        f"{path}: no phi weights found: expected a state dict with layers.0.weight ... or one nested under "
        f"'Phi' (as {flavour} saves it); the file's keys are {keys or 'none'}"
    )


def _strip_prefixes(state: Mapping, path: Path) -> dict[str, object]:
    """`state` with the prefixes every key carries (module., _orig_mod., Phi.) removed."""
    if not all(isinstance(key, str) for key in state):
        raise ReleasedWeightsError(f"{path}: phi state dict has non-string keys")
    state = dict(state)
    stripped = True
    while stripped and state:
        stripped = False
        for prefix in _PREFIXES:
            if all(key.startswith(prefix) for key in state):
                state = {key[len(prefix) :]: value for key, value in state.items()}
                stripped = True
    return state


def _check_keys(state: Mapping, source: object) -> None:
    missing = [key for key in PHI_KEYS if key not in state]
    unexpected = sorted(str(key) for key in state if key not in PHI_KEYS)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing)}")
        if unexpected:
            more = f" and {len(unexpected) - 8} more" if len(unexpected) > 8 else ""
            parts.append(f"unexpected {', '.join(unexpected[:8])}{more}")
        raise ReleasedWeightsError(
            f"{source}: not the 3-layer phi MLP (layers.0/3/6 weight and bias): {'; '.join(parts)}"
        )
    for key in PHI_KEYS:
        value = state[key]
        if not isinstance(value, torch.Tensor):
            raise ReleasedWeightsError(f"{source}: {key} is a {type(value).__name__}, not a tensor")
        if not value.is_floating_point():
            raise ReleasedWeightsError(f"{source}: {key} has dtype {value.dtype}, not a floating point one")


def _check_shapes(state: Mapping[str, torch.Tensor], source: str) -> tuple[int, int, int]:
    """(input_dim, hidden_dim, output_dim), after checking that the six shapes fit one another."""
    first, last = state["layers.0.weight"], state["layers.6.weight"]
    if first.dim() != 2 or last.dim() != 2:
        raise ReleasedWeightsError(
            f"{source}: layers.0.weight and layers.6.weight must be matrices, "
            f"got shapes {tuple(first.shape)} and {tuple(last.shape)}"
        )
    hidden, input_dim = first.shape
    output_dim = last.shape[0]
    expected = {
        "layers.0.weight": (hidden, input_dim),
        "layers.0.bias": (hidden,),
        "layers.3.weight": (hidden, hidden),
        "layers.3.bias": (hidden,),
        "layers.6.weight": (output_dim, hidden),
        "layers.6.bias": (output_dim,),
    }
    wrong = [
        f"{key} {tuple(state[key].shape)} (expected {shape})"
        for key, shape in expected.items()
        if tuple(state[key].shape) != shape
    ]
    if wrong:
        raise ReleasedWeightsError(
            f"{source}: inconsistent phi shapes for {input_dim} -> {hidden} -> {output_dim}: {'; '.join(wrong)}"
        )
    return int(input_dim), int(hidden), int(output_dim)
