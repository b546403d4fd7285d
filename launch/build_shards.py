"""Build the WebDataset shards of every source in `data` (plus index.json), then print a one-line summary.

    python launch/build_shards.py --config configs/tiny.yaml [key.path=value ...]

Parallel over `data.build_workers` processes (0: one per core), deterministic for `data.seed`, and resumable:
shards that are complete already are kept, partial ones rebuilt. A URL `data.shards_dir` (s3://, gs://) is built in
a local staging directory (`data.staging_dir`), then uploaded, `index.json` last.
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
    from shards.builder.noun_phrases import NounPhraseError
    from shards.builder.shard_set import build_shards
    from shards.builder.sources import SourceError
    from shards.storage import ShardStorageError

    try:
        report = build_shards(config.data, config.model.backbone)
    except (SourceError, NounPhraseError, ShardStorageError) as error:
        print(f"error: {error}", file=sys.stderr)
        return DATA_ERROR_EXIT
    print(f"wrote {report.index_path} ({report.rebuilt} shards written by this run)")
    print(report.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
