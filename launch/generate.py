"""Generate training triplets from image pairs with a vision-language model (the paper's good4cir pipeline).

    python launch/generate.py --config configs/generate_synthetic.yaml            # against the scene oracle
    ray job submit --working-dir . -- python launch/generate.py --config my.yaml generate.concurrency=64
    python launch/generate.py --config my.yaml generate.mine.index=indexes/photos  # pairs mined from a gallery

Pairs come from `generate.pairs` (JSONL), a `data.sources` entry (`generate.source`) or nearest neighbours in a
gallery index (`generate.mine.index`). Each pair gets three questions, answers checked against JSON schemas and
repaired when unusable; single modifications are joined into captions and filtered. Answers are cached in
`generate.cache_dir`, so rerunning (or resuming a killed run) asks nothing twice. Writes the CIRR_R layout, a JSONL
manifest, the stage answers, the failures and `summary_<split>.json` under `generate.out`. The API key comes from
`$<generate.api_key_env>` only and is written nowhere.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cluster.cli import CONFIG_ERROR_EXIT, ConfigError, parse_config_args  # noqa: E402
from cluster.jobs.generation_run import GenerateError, prepare, run  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    try:
        _, config = parse_config_args(argv, "Generate CIR triplets from image pairs with a VLM endpoint.")
        job = prepare(config)
    except ConfigError as error:
        print(f"config error: {error}", file=sys.stderr)
        return CONFIG_ERROR_EXIT
    except GenerateError as error:
        print(f"generate error: {error}", file=sys.stderr)
        return CONFIG_ERROR_EXIT
    try:
        summary = run(job)
    except GenerateError as error:
        print(f"generate error: {error}", file=sys.stderr)
        return CONFIG_ERROR_EXIT
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
