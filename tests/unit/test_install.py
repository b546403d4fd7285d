"""The environment `make test` builds: the registry's torch (never the local +cpu file) and a working open_clip."""

from __future__ import annotations


def test_torch_is_the_registry_build_and_open_clip_imports() -> None:
    import open_clip
    import torch
    import torchvision

    assert "+cpu" not in torch.__version__, f"the local torch {torch.__version__} cannot run torchvision"
    assert torchvision.ops.nms is not None  # the compiled torchvision extension loaded
    model = open_clip.create_model("ViT-B-32", pretrained=None)
    assert sum(p.numel() for p in model.parameters()) > 1_000_000
