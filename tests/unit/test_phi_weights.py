"""Loading phi weights in the layouts SEARLE and LinCIR save them (training/zeroshot/phi_weights.py).

Every file here is written by the test the way each project's `save_phi` / `save_checkpoint` writes it, with small
random dims (16 -> 64 -> 24); the loaded dict must load strictly into our `Phi` and give the original outputs.
"""

from __future__ import annotations

import pathlib
import pickle
import zipfile
from collections import OrderedDict

import pytest
import torch
from safetensors.torch import save_file

from training.zeroshot.phi_net import Phi
from training.zeroshot.phi_weights import PHI_KEYS, ReleasedWeightsError, load_released_phi, phi_dims

DIMS = (16, 64, 24)


class NotATensor:
    """A custom object a pickle may hold; weights_only must refuse it."""


class RunsCode:
    """Unpickling this would create a file; a weights_only load must not."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


@pytest.fixture
def original() -> Phi:
    torch.manual_seed(0)
    return Phi(*DIMS).eval()


def _outputs(state: dict[str, torch.Tensor]) -> torch.Tensor:
    phi = Phi(*DIMS).eval()
    phi.load_state_dict(state, strict=True)
    with torch.no_grad():
        return phi(torch.linspace(-1, 1, 3 * DIMS[0]).reshape(3, DIMS[0]))


def _assert_same(loaded: dict[str, torch.Tensor], original: Phi) -> None:
    assert tuple(loaded) == PHI_KEYS
    assert phi_dims(loaded) == DIMS
    assert all(tensor.device.type == "cpu" for tensor in loaded.values())
    assert torch.equal(_outputs(loaded), _outputs(original.state_dict()))


def test_searle_release_layout(tmp_path, original):
    """SEARLE's save_phi: {'epoch', 'Phi': state_dict}; hubconf.py reads ['Phi']."""
    path = tmp_path / "SEARLE_ViT-L14.pt"
    torch.save({"epoch": 7, original.__class__.__name__: original.state_dict()}, path)
    _assert_same(load_released_phi(path, "searle"), original)


def test_searle_full_checkpoint_takes_only_phi(tmp_path, original):
    """SEARLE's save_checkpoint: Phi beside optimizer, scaler and a pathlib training_path."""
    optimizer = torch.optim.AdamW(original.parameters(), lr=1e-4)
    original(torch.randn(2, DIMS[0])).sum().backward()
    optimizer.step()
    optimizer.zero_grad()
    original.eval()
    checkpoint = {
        "epoch": 3,
        "Phi": original.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scaler": {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000},
        "training_path": pathlib.Path(tmp_path) / "phi_models" / "exp",
    }
    path = tmp_path / "phi_last.pt"
    torch.save(checkpoint, path)
    _assert_same(load_released_phi(path, "searle"), original)


def test_lincir_release_layout(tmp_path, original):
    """LinCIR's save_phi (after accelerator.unwrap_model): {'epoch': step, 'Phi': state_dict}."""
    path = tmp_path / "lincir_large.pt"
    torch.save({"epoch": 20000, "Phi": original.state_dict()}, path)
    _assert_same(load_released_phi(path, "lincir"), original)


def test_ddp_prefix_and_other_nestings(tmp_path, original):
    wrapped = OrderedDict((f"module.{key}", value) for key, value in original.state_dict().items())
    layouts = {
        "ddp.pt": {"epoch": 1, "Phi": wrapped},
        "bare.pt": original.state_dict(),
        "lower.pt": {"phi": original.state_dict()},
        "state_dict.pt": {"state_dict": {f"_orig_mod.{k}": v for k, v in original.state_dict().items()}},
    }
    for name, content in layouts.items():
        torch.save(content, tmp_path / name)
        _assert_same(load_released_phi(tmp_path / name, "lincir"), original)


def test_legacy_torch_format(tmp_path, original):
    """torch.save's pre-1.6 (non-zip) format."""
    path = tmp_path / "legacy.pt"
    torch.save({"epoch": 2, "Phi": original.state_dict()}, path, _use_new_zipfile_serialization=False)
    _assert_same(load_released_phi(path, "searle"), original)


def test_half_precision_is_kept(tmp_path, original):
    path = tmp_path / "fp16.pt"
    torch.save({"Phi": {k: v.half() for k, v in original.state_dict().items()}}, path)
    loaded = load_released_phi(path, "lincir")
    assert all(tensor.dtype == torch.float16 for tensor in loaded.values())
    assert phi_dims(loaded) == DIMS


def test_safetensors(tmp_path, original):
    state = {key: value.contiguous() for key, value in original.state_dict().items()}
    save_file(state, tmp_path / "phi.safetensors")
    _assert_same(load_released_phi(tmp_path / "phi.safetensors", "searle"), original)
    save_file({f"Phi.{k}": v for k, v in state.items()}, tmp_path / "flat.safetensors")
    _assert_same(load_released_phi(tmp_path / "flat.safetensors", "lincir"), original)


def test_missing_file(tmp_path):
    with pytest.raises(ReleasedWeightsError, match="no such file") as caught:
        load_released_phi(tmp_path / "absent.pt", "searle")
    assert "absent.pt" in str(caught.value)
    with pytest.raises(ReleasedWeightsError, match="not a file"):
        load_released_phi(tmp_path, "searle")


def test_not_a_weights_file(tmp_path):
    text = tmp_path / "weights.pt"
    text.write_text("this is not a checkpoint\n")
    with pytest.raises(ReleasedWeightsError, match="neither a torch.save file") as caught:
        load_released_phi(text, "lincir")
    assert "weights.pt" in str(caught.value)
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(ReleasedWeightsError, match="neither a torch.save file"):
        load_released_phi(empty, "lincir")
    archive = tmp_path / "archive.pt"
    with zipfile.ZipFile(archive, "w") as out:
        out.writestr("readme.txt", "hello")
    with pytest.raises(ReleasedWeightsError, match="not a readable torch.save file"):
        load_released_phi(archive, "lincir")
    plain = tmp_path / "plain.pkl"
    plain.write_bytes(pickle.dumps({"a": 1}, protocol=2))
    with pytest.raises(ReleasedWeightsError, match="not a readable torch.save file"):
        load_released_phi(plain, "searle")
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes((20).to_bytes(8, "little") + b"{not json at all...}")
    with pytest.raises(ReleasedWeightsError, match="not a readable safetensors file"):
        load_released_phi(broken, "searle")


def test_arbitrary_object_is_refused(tmp_path, original):
    path = tmp_path / "with_object.pt"
    torch.save({"Phi": original.state_dict(), "obj": NotATensor()}, path)
    with pytest.raises(ReleasedWeightsError, match="refused on purpose") as caught:
        load_released_phi(path, "searle")
    assert "with_object.pt" in str(caught.value) and "NotATensor" in str(caught.value)


def test_refusal_runs_no_code(tmp_path, original):
    marker = tmp_path / "code_ran"
    path = tmp_path / "malicious.pt"
    torch.save({"Phi": original.state_dict(), "payload": RunsCode(str(marker))}, path)
    with pytest.raises(ReleasedWeightsError, match="refused on purpose"):
        load_released_phi(path, "lincir")
    assert not marker.exists()


def test_missing_and_unexpected_keys(tmp_path, original):
    state = original.state_dict()
    short = {key: value for key, value in state.items() if key != "layers.3.bias"}
    torch.save({"Phi": short}, tmp_path / "short.pt")
    with pytest.raises(ReleasedWeightsError, match=r"missing layers\.3\.bias") as caught:
        load_released_phi(tmp_path / "short.pt", "searle")
    assert "short.pt" in str(caught.value)
    extra = dict(state, **{"layers.9.weight": torch.zeros(2, 2), "norm.weight": torch.ones(24)})
    torch.save({"Phi": extra}, tmp_path / "extra.pt")
    with pytest.raises(ReleasedWeightsError, match=r"unexpected layers\.9\.weight, norm\.weight"):
        load_released_phi(tmp_path / "extra.pt", "lincir")
    torch.save({"epoch": 1, "weights": state}, tmp_path / "elsewhere.pt")
    with pytest.raises(ReleasedWeightsError, match="no phi weights found.*'epoch', 'weights'"):
        load_released_phi(tmp_path / "elsewhere.pt", "lincir")
    torch.save({"state_dict_img2text": {"module.fc_out.weight": torch.zeros(2, 2)}}, tmp_path / "pic2word.pt")
    with pytest.raises(ReleasedWeightsError, match="Pic2Word"):
        load_released_phi(tmp_path / "pic2word.pt", "lincir")
    torch.save([state["layers.0.weight"]], tmp_path / "list.pt")
    with pytest.raises(ReleasedWeightsError, match="holds a list"):
        load_released_phi(tmp_path / "list.pt", "searle")
    torch.save({"Phi": dict(state, **{"layers.6.bias": 3})}, tmp_path / "number.pt")
    with pytest.raises(ReleasedWeightsError, match=r"layers\.6\.bias is a int, not a tensor"):
        load_released_phi(tmp_path / "number.pt", "searle")


def test_inconsistent_shapes(tmp_path, original):
    state = dict(original.state_dict())
    state["layers.3.weight"] = torch.zeros(64, 32)
    torch.save({"Phi": state}, tmp_path / "shapes.pt")
    with pytest.raises(
        ReleasedWeightsError, match=r"inconsistent.*layers\.3\.weight \(64, 32\) \(expected \(64, 64\)\)"
    ):
        load_released_phi(tmp_path / "shapes.pt", "searle")
    state = dict(original.state_dict())
    state["layers.6.bias"] = torch.zeros(23)
    torch.save({"Phi": state}, tmp_path / "bias.pt")
    with pytest.raises(ReleasedWeightsError, match=r"layers\.6\.bias \(23,\) \(expected \(24,\)\)") as caught:
        load_released_phi(tmp_path / "bias.pt", "lincir")
    assert "bias.pt" in str(caught.value)
    with pytest.raises(ReleasedWeightsError, match="must be matrices"):
        phi_dims(dict(original.state_dict(), **{"layers.0.weight": torch.zeros(64)}))


def test_unknown_flavour(tmp_path):
    with pytest.raises(ValueError, match="flavour"):
        load_released_phi(tmp_path / "x.pt", "pic2word")
