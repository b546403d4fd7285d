"""Build the WebDataset shards of every source in `data` (plus index.json), then print a one-line summary.

    python launch/build_shards.py --config configs/tiny.yaml [key.path=value ...]
    ray job submit --working-dir . -- python launch/build_shards.py --config configs/vith.yaml

`data.build_workers` 0 builds in this process. Otherwise the captions are parsed on that many parser actors and the
shards written by Ray tasks on Ray Data (`data.build_on: ray`: the job's cluster under `ray job submit`, else a
private local Ray on 127.0.0.1), or in a local process pool (`data.build_on: processes`). The bytes depend on the
config and seed only. Resumable: parsed caption chunks are cached as they finish, complete shards are kept, partial
ones rebuilt. A URL `data.shards_dir` (s3://, gs://) is built in a staging directory (`data.staging_dir`), then
uploaded, `index.json` last.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cluster.cli import CONFIG_ERROR_EXIT, ConfigError, parse_config_args  # noqa: E402

DATA_ERROR_EXIT = 1


def main(argv: list[str] | None = None) -> int:
    try:
        _, config = parse_config_args(argv, "Build WebDataset shards and index.json from the configured sources.")
    except ConfigError as error:
        print(f"config error: {error}", file=sys.stderr)
        return CONFIG_ERROR_EXIT
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    data = config.data
    executor = None
    if data.build_workers != 0 and data.build_on == "ray":
        from cluster.runtime.ray_setup import connect, relative_path_problem

        paths = {"data.shards_dir": data.shards_dir, "data.staging_dir": data.staging_dir or ""}
        for number, source in enumerate(data.sources):
            for key in ("path", "image_root", "trees"):
                paths[f"data.sources.{number}.{key}"] = getattr(source, key) or ""
        problem = relative_path_problem(config.cluster, paths)
        if problem is not None:
            print(f"config error: {problem}", file=sys.stderr)
            return CONFIG_ERROR_EXIT
        print(connect(config.cluster), flush=True)  # before anything imports ray (it reads its auth settings then)
        from cluster.jobs.shard_build import RayBuildExecutor, cluster_has_gpus

        executor = RayBuildExecutor(data.build_workers, stanza_on_gpu=cluster_has_gpus())
        print(f"building on Ray with {executor.workers} workers", flush=True)
    from shards.builder.noun_phrases import NounPhraseError
    from shards.builder.shard_set import build_shards
    from shards.builder.sources import SourceError
    from shards.storage import ShardStorageError

    try:
        report = build_shards(data, config.model.backbone, executor=executor)
    except (SourceError, NounPhraseError, ShardStorageError) as error:
        print(f"error: {error}", file=sys.stderr)
        return DATA_ERROR_EXIT
    print(f"wrote {report.index_path} ({report.rebuilt} shards written by this run, {report.parsed} captions parsed)")
    print(report.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
