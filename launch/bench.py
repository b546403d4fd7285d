"""Benchmarks, printed as one JSON line at the end.

    python launch/bench.py loader --config configs/tiny.yaml   # streaming reader throughput
    python launch/bench.py step   --config configs/tiny.yaml   # training step: efficient vs reference Text-CC, fused vs eager

Every ratio is measured side by side in one run; absolute figures only mean something on a GPU.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cluster.cli import CONFIG_ERROR_EXIT, ConfigError, parse_config_args  # noqa: E402

KINDS = ("loader", "step")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in KINDS:
        print(f"usage: bench.py {{{','.join(KINDS)}}} --config FILE [key.path=value ...]", file=sys.stderr)
        return CONFIG_ERROR_EXIT
    kind, rest = argv[0], argv[1:]

    def add_arguments(parser):
        parser.add_argument("--seconds", type=float, default=20.0, help="loader: how long to stream")
        parser.add_argument("--repeats", type=int, default=3, help="step: timed repetitions of each variant")
        parser.add_argument("--nps", type=int, default=10, help="step: noun phrases per caption")

    try:
        args, config = parse_config_args(rest, f"benchmark: {kind}", add_arguments)
    except ConfigError as error:
        print(f"config error: {error}", file=sys.stderr)
        return CONFIG_ERROR_EXIT
    if kind == "loader":
        from training.perf.loader import loader_benchmark

        result = loader_benchmark(config, seconds=args.seconds)
    else:
        from training.perf.step import step_benchmark

        result = step_benchmark(config, repeats=args.repeats, nps=args.nps)
    print(json.dumps(result, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
