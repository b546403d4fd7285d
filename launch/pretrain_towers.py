"""Pretrain the open_clip towers CLIP-style (image <-> description, region <-> phrase), cached by data + config.

    python launch/build_shards.py --config configs/tiny_pretrain.yaml    # the described images as shards
    python launch/pretrain_towers.py --config configs/tiny_pretrain.yaml
    ray job submit --working-dir . -- python launch/pretrain_towers.py --config configs/tiny_pretrain.yaml

The job is the training job with `train.objective: towers`: Ray + DeepSpeed workers, checkpoints, resume. Its towers
are written to `pretrain.towers_out` as an open_clip weights file, which a ConText config starts from through
`model.weights_file` (`make demo` passes it to configs/tiny.yaml as an override). A rerun with the same shards and config reuses the cached file
(`<storage>/towers/<backbone>-<digest>.safetensors`) without starting Ray.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cluster.cli import CONFIG_ERROR_EXIT, ConfigError, parse_config_args  # noqa: E402


def add_arguments(parser) -> None:
    parser.add_argument(
        "--probe-split",
        default="val",
        help="score description -> image retrieval of the towers on this synthetic split ('' to skip)",
    )


def probe(config, towers: Path, split: str) -> str:
    """One line: the towers' zero-shot retrieval of the split's scene descriptions (synthetic benchmark only)."""
    import dataclasses
    import logging

    logging.getLogger().setLevel(logging.ERROR)  # open_clip warns that the towers start random: the weights follow
    from shards.model_inputs import eval_transform, tokenizer
    from training.evaluation.tower_probe import description_retrieval, read_descriptions
    from training.model.towers import build_backbone

    root = config.eval.dataset("synthetic").root
    model = dataclasses.replace(config.model, pretrained=None, weights_file=str(towers))
    backbone = build_backbone(model).eval()
    pairs = read_descriptions(root, split)
    return description_retrieval(backbone, eval_transform(model.backbone), tokenizer(model.backbone), pairs).line()


def main(argv: list[str] | None = None) -> int:
    try:
        args, config = parse_config_args(
            argv, "Pretrain the towers (train.objective: towers), cached by digest.", add_arguments
        )
    except ConfigError as error:
        print(f"config error: {error}", file=sys.stderr)
        return CONFIG_ERROR_EXIT
    from cluster.jobs.tower_cache import TowerCacheError, cache_path, check, pretrained_towers, towers_digest

    started = time.perf_counter()
    try:
        check(config)
        digest = towers_digest(config)
        if not cache_path(config, digest).is_file():
            from cluster.runtime.ray_setup import connect, relative_path_problem

            paths = {"cluster.storage_path": config.cluster.storage_path, "data.shards_dir": config.data.shards_dir}
            problem = relative_path_problem(config.cluster, paths)
            if problem is not None:
                raise TowerCacheError(problem)
            print(connect(config.cluster), flush=True)  # before anything imports ray
        result = pretrained_towers(config)
    except TowerCacheError as error:
        print(f"config error: {error}", file=sys.stderr)
        return CONFIG_ERROR_EXIT
    how = "reused from the cache" if result.reused else f"trained in {result.run_dir}"
    print(f"towers: {result.path}  ({how}; digest {result.digest[:12]}; {time.perf_counter() - started:.0f} s)")
    print(f"cached: {result.cached}")
    if args.probe_split:
        try:
            print(f"towers on {args.probe_split}: {probe(config, result.path, args.probe_split)}")
        except (FileNotFoundError, ValueError) as error:  # not the synthetic benchmark: the towers still stand
            print(f"towers probe skipped: {error}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
