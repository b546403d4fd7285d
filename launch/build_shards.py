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


def add_arguments(parser) -> None:
    parser.add_argument(
        "--report", help="also write the build's figures (phases, stage seconds, driver peak RSS) to this JSON file"
    )


def _write_report(path: str, report, started: float) -> None:
    import dataclasses
    import json
    import resource
    import time

    figures = dataclasses.asdict(report) | {
        "index_path": str(report.index_path),
        "wall_s": time.perf_counter() - started,
        # Linux reports kilobytes: the driver's own peak, not its workers'.
        "driver_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
    Path(path).write_text(json.dumps(figures, indent=1, sort_keys=True))


def main(argv: list[str] | None = None) -> int:
    import time

    started = time.perf_counter()
    try:
        args, config = parse_config_args(
            argv, "Build WebDataset shards and index.json from the configured sources.", add_arguments
        )
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
        from cluster.jobs.shard_build import RayBuildExecutor
        from cluster.runtime.ray_setup import cluster_has_gpus

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
    if args.report:
        _write_report(args.report, report, started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
