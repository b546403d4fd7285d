"""The named pieces a checkpoint holds. Saving iterates them; resuming loads each one back.

Two kinds:

- `Stateful`: `state_dict()` / `load_state_dict()` with JSON-ready state, stored in `trainer_state.json`, either
  once per run (the train state) or once per rank (reader position, RNG streams);
- `FilePiece`: owns files in the checkpoint directory: the DeepSpeed engine (model, AdamW moments and LR schedule,
  in DeepSpeed's own per-rank files), the consolidated `model.safetensors` and the resolved `config.yaml`.
"""

from __future__ import annotations

import base64
import random
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from training.checkpoint import layout
from training.errors import PermanentError


class CheckpointLoadError(PermanentError, ValueError):
    """The latest complete checkpoint cannot be resumed from (unreadable, or written by another job shape).

    Every restart would pick the same checkpoint again; the message says which one and what to do.
    """


class Stateful(Protocol):
    """A piece whose state is JSON-ready (plain dicts, lists, numbers and strings)."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class FilePiece(Protocol):
    """A piece that writes its own files into a checkpoint directory (every rank calls both methods)."""

    def save(self, directory: Path, rank: int) -> None: ...

    def load(self, directory: Path) -> None: ...


class RngState:
    """This process's python, numpy and torch (and CUDA) RNG streams."""

    def state_dict(self) -> dict[str, Any]:
        version, internal, gauss = random.getstate()
        name, keys, position, has_gauss, cached = np.random.get_state(legacy=True)
        state = {
            "python": [version, list(internal), gauss],
            "numpy": [name, keys.tolist(), int(position), int(has_gauss), float(cached)],
            "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(),
        }
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = base64.b64encode(torch.cuda.get_rng_state().numpy().tobytes()).decode()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
        name, keys, position, has_gauss, cached = state["numpy"]
        np.random.set_state((name, np.asarray(keys, dtype=np.uint32), position, has_gauss, cached))
        torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["torch"])), dtype=torch.uint8))
        if "cuda" in state and torch.cuda.is_available():
            cuda = torch.frombuffer(bytearray(base64.b64decode(state["cuda"])), dtype=torch.uint8)
            torch.cuda.set_rng_state(cuda)


class EngineState:
    """Model, optimizer and LR schedule through DeepSpeed's own files under `deepspeed/` (one set per rank).

    Loading goes through the engine's checkpoint engine, which `training.engine.deepspeed_engine` makes read with
    `torch.load(weights_only=True)`: nothing is unpickled.
    """

    def __init__(self, engine) -> None:
        self.engine = engine

    def save(self, directory: Path, rank: int) -> None:
        self.engine.save_checkpoint(str(directory), tag=layout.DEEPSPEED, save_latest=False)

    def load(self, directory: Path) -> None:
        engine_dir = directory / layout.DEEPSPEED
        try:
            loaded, _ = self.engine.load_checkpoint(str(directory), tag=layout.DEEPSPEED)
        except OSError:
            raise  # storage trouble (a lost mount, a timeout) may pass: a restart reads it again
        except Exception as error:  # a truncated or foreign file: torch and DeepSpeed raise many kinds
            problem = (str(error).strip().splitlines() or [""])[0].split(". ")[0]  # torch adds a paragraph of advice
            raise CheckpointLoadError(
                f"{engine_dir}: the DeepSpeed engine state is unreadable ({type(error).__name__}: {problem}); "
                f"move {directory.name} out of {directory.parent} to resume from the checkpoint before it"
            ) from error
        if loaded is None:
            raise CheckpointLoadError(
                f"DeepSpeed found no engine state under {engine_dir}; move {directory.name} out of "
                f"{directory.parent} to resume from the checkpoint before it"
            )


class ConsolidatedWeights:
    """`model.safetensors`: every weight of the network in one file, for the eval job and `model.init_from`.

    Written for readers outside training; a resume restores the weights from the engine state instead.
    """

    def __init__(self, engine, model: torch.nn.Module) -> None:
        self.engine = engine
        self.model = model

    def save(self, directory: Path, rank: int) -> None:
        from training.model.weights import save_model_weights

        path = directory / layout.WEIGHTS
        if self.engine.zero_optimization_stage() != 3:
            if rank == 0:
                save_model_weights(self.model, path)
            return
        import deepspeed
        from safetensors.torch import save_file

        # Gather one parameter at a time (bounded memory); modifier_rank=None: nothing is written back, which also
        # avoids DeepSpeed's re-broadcast that cannot handle 0-d parameters such as open_clip's logit_scale.
        weights: dict[str, torch.Tensor] = {}
        parameters = dict(self.model.named_parameters())
        for name, tensor in self.model.state_dict(keep_vars=True).items():
            if name in parameters:
                with deepspeed.zero.GatheredParameters([tensor], modifier_rank=None):
                    if rank == 0:
                        weights[name] = tensor.detach().clone().cpu()
            elif rank == 0:
                weights[name] = tensor.detach().contiguous().cpu()  # buffers are never partitioned
        if rank == 0:
            save_file(weights, str(path))

    def load(self, directory: Path) -> None:
        """Nothing: the engine state already holds these weights."""


class ResolvedConfig:
    """`config.yaml`: the resolved config the checkpoint was trained with (eval rebuilds the network from it)."""

    def __init__(self, text: str) -> None:
        self.text = text

    def save(self, directory: Path, rank: int) -> None:
        if rank == 0:
            (directory / layout.CONFIG).write_text(self.text)

    def load(self, directory: Path) -> None:
        """Nothing: a resumed job runs with the config it was submitted with."""
