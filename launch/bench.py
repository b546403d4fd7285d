"""Timing benchmarks, one module each under `training/perf/`, printed as one JSON line at the end.

    python launch/bench.py loader --config configs/tiny.yaml   # streaming reader throughput
    python launch/bench.py step   --config configs/tiny.yaml   # training step: efficient vs reference Text-CC, fused vs eager
    python launch/bench.py eval   --config configs/tiny.yaml   # eval query encoding with vs without grounding
    python launch/bench.py gpu    [--out runs/bench_gpu.json]  # every GPU figure in one run (--dry-run on a CPU)
    python launch/bench.py index  [--vectors 100000]           # flat vs IVF vs HNSW: build, query time, recall
    python launch/bench.py build  [--triplets 200000]          # shard build: in process, Ray 1 vs 2 workers, 2 nodes

Every ratio is measured side by side in one run; absolute figures only mean something on a GPU.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cluster.bench.gpu_preflight import PREFLIGHT_EXIT, PreflightFailed  # noqa: E402
from cluster.cli import CONFIG_ERROR_EXIT, ArgumentParser, ConfigError, parse_config_args  # noqa: E402

BENCHMARKS = {
    "loader": "training.perf.loader",
    "step": "training.perf.step",
    "eval": "training.perf.eval_queries",
    "gpu": "cluster.bench.gpu_bench",
    "index": "training.perf.index_search",
    "build": "cluster.bench.build_bench",
}
"""Benchmark name -> module with `add_arguments(parser)` and `run(config, args) -> dict`."""
OWN_CONFIGS = {"gpu": "tiny", "index": "tiny", "build": "tiny"}
"""Benchmarks that read the shipped configs themselves: `--config` is optional for them."""
SAYS_PROGRESS = {"gpu", "build"}
"""Benchmarks that print a line per part as they go (to stderr; stdout keeps the one JSON line)."""


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="bench.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("benchmark", choices=list(BENCHMARKS), help="which benchmark (`bench.py NAME --help`)")
    parser.add_argument("arguments", nargs=argparse.REMAINDER, help="--config FILE, its flags and key.path=value")
    chosen = parser.parse_args(sys.argv[1:] if argv is None else argv)
    benchmark = importlib.import_module(BENCHMARKS[chosen.benchmark])
    try:
        args, config = parse_config_args(
            chosen.arguments,
            f"benchmark: {chosen.benchmark}",
            benchmark.add_arguments,
            OWN_CONFIGS.get(chosen.benchmark),
        )
    except ConfigError as error:
        print(f"config error: {error}", file=sys.stderr)
        return CONFIG_ERROR_EXIT
    try:
        if chosen.benchmark in SAYS_PROGRESS:
            result = benchmark.run(config, args, say=_say)
        else:
            result = benchmark.run(config, args)
    except PreflightFailed as failure:  # the GPU bench's checks: one line, before anything started
        print(f"preflight: {failure}", file=sys.stderr)
        return PREFLIGHT_EXIT
    print(json.dumps(result, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
