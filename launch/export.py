"""Export a trained checkpoint as a self-contained inference bundle (no DeepSpeed, no Ray needed to load it).

    python launch/export.py --checkpoint runs/demo/checkpoints/latest --out bundles/demo
    python launch/export.py --checkpoint /shared/runs/vith/checkpoints/step_00040000 --out bundles/vith --overwrite

The bundle holds `model.safetensors`, `bundle.json` (model config with its tower flags, tokenizer, preprocessing,
the weights' sha256) and the fine-tuned CLIP towers as `open_clip_model.safetensors` with their open_clip config
`<model_name>.json`, which plain open_clip loads itself:
`open_clip.add_model_config("bundles/demo/ContextTiny.json")`, then
`open_clip.create_model_and_transforms("ContextTiny", pretrained="bundles/demo/open_clip_model.safetensors")`.
In Python: `training.retrieval.bundle.load_bundle("bundles/demo")` returns a `Retriever`.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cluster.cli import ArgumentParser  # noqa: E402

USAGE_ERROR_EXIT = 2


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(description="Write an inference bundle from a complete checkpoint.")
    parser.add_argument("--checkpoint", required=True, help="a checkpoint directory, or <run>/checkpoints/latest")
    parser.add_argument("--out", required=True, help="the bundle directory to write")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing bundle directory")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)  # open_clip warns that the towers start random: the weights follow
    from training.evaluation.runner import CheckpointError
    from training.retrieval.bundle import export_bundle, towers_config_name

    try:
        info = export_bundle(args.checkpoint, args.out, overwrite=args.overwrite)
    except (CheckpointError, FileExistsError, ValueError) as error:
        print(f"export error: {error}", file=sys.stderr)
        return USAGE_ERROR_EXIT
    print(
        f"bundle: {args.out}  ({info.backbone}, step {info.source['step']}, weights sha256 {info.weights_sha256[:12]})"
    )
    print(f"index a gallery: python launch/index.py --bundle {args.out} --images <folder or list> --out <index>")
    print(
        f'plain open_clip: open_clip.add_model_config("{args.out}/{towers_config_name(info.backbone)}"), then '
        f'open_clip.create_model_and_transforms("{info.backbone}", pretrained="{args.out}/open_clip_model.safetensors")'
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
