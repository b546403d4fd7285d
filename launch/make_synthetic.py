"""Write the embedded synthetic CIR benchmark in CIRR's on-disk layout.

    python launch/make_synthetic.py [--out data/synthetic] [--seed 0] [--train 6000] [--val 600] [--test 300]

`configs/tiny.yaml` reads it from data/synthetic, so `launch/build_shards.py --config configs/tiny.yaml` follows with
no overrides. The output depends only on the arguments (not on --workers): the same seed gives the same bytes.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cluster.cli import ArgumentParser  # noqa: E402
from shards.synthetic import DEFAULT_TRIPLETS, generate  # noqa: E402

USAGE_ERROR_EXIT = 2


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(description="Generate the synthetic composed-image-retrieval benchmark.")
    parser.add_argument("--out", default="data/synthetic", help="benchmark root (default: data/synthetic)")
    parser.add_argument("--seed", type=int, default=0, help="generation seed (default: 0)")
    parser.add_argument("--train", type=int, default=DEFAULT_TRIPLETS["train"], help="train caption entries")
    parser.add_argument("--val", type=int, default=DEFAULT_TRIPLETS["val"], help="val caption entries")
    parser.add_argument("--test", type=int, default=DEFAULT_TRIPLETS["test1"], help="test1 caption entries")
    parser.add_argument(
        "--workers", type=int, default=min(4, os.cpu_count() or 1), help="rendering processes (output unaffected)"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit_request:  # argparse exits on --help (0) and on bad arguments (2)
        return int(exit_request.code or 0)
    for flag in ("train", "val", "test"):
        if getattr(args, flag) < 0:
            print(f"error: --{flag} must be >= 0, got {getattr(args, flag)}", file=sys.stderr)
            return USAGE_ERROR_EXIT
    try:
        summary = generate(
            args.out, args.seed, args.train, args.val, args.test, workers=args.workers, show_progress=True
        )
    except FileExistsError as error:
        print(f"error: {error}", file=sys.stderr)
        return USAGE_ERROR_EXIT
    print(summary.line())
    return 0


if __name__ == "__main__":
    sys.exit(main())
