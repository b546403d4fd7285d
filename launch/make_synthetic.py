"""Write the embedded synthetic CIR benchmark in CIRR's on-disk layout.

    python launch/make_synthetic.py [--out data/synthetic] [--seed 0] [--train 6000] [--val 1000] [--test 300]
        [--binding 400]
    python launch/make_synthetic.py --add-binding [--out data/synthetic] [--binding 400]

`configs/tiny.yaml` reads it from data/synthetic, so `launch/build_shards.py --config configs/tiny.yaml` follows with
no overrides. The output depends only on the arguments (not on --workers): the same seed gives the same bytes.
`--binding` sets the queries of the `binding` split (shards/synthetic/binding.py), written into files of its own:
the other splits' bytes do not depend on it. `--add-binding` writes only that split into a benchmark generated
before it existed, with the seed, scenes and canvas its synthetic.json records, and leaves every other file as it is.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cluster.cli import ArgumentParser  # noqa: E402
from shards.synthetic import DEFAULT_BINDING_TRIPLETS, DEFAULT_TRIPLETS, add_binding, generate  # noqa: E402

USAGE_ERROR_EXIT = 2


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(description="Generate the synthetic composed-image-retrieval benchmark.")
    parser.add_argument("--out", default="data/synthetic", help="benchmark root (default: data/synthetic)")
    parser.add_argument("--seed", type=int, help="generation seed (default: 0; --add-binding: the benchmark's)")
    parser.add_argument("--train", type=int, default=DEFAULT_TRIPLETS["train"], help="train caption entries")
    parser.add_argument("--val", type=int, default=DEFAULT_TRIPLETS["val"], help="val caption entries")
    parser.add_argument("--test", type=int, default=DEFAULT_TRIPLETS["test1"], help="test1 caption entries")
    parser.add_argument("--binding", type=int, default=DEFAULT_BINDING_TRIPLETS, help="binding split queries (0: none)")
    parser.add_argument(
        "--add-binding",
        action="store_true",
        help="write only the binding split into the existing benchmark at --out; its other files are kept",
    )
    parser.add_argument(
        "--workers", type=int, default=min(4, os.cpu_count() or 1), help="rendering processes (output unaffected)"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit_request:  # argparse exits on --help (0) and on bad arguments (2)
        return int(exit_request.code or 0)
    for flag in ("train", "val", "test", "binding"):
        if getattr(args, flag) < 0:
            print(f"error: --{flag} must be >= 0, got {getattr(args, flag)}", file=sys.stderr)
            return USAGE_ERROR_EXIT
    if args.add_binding:
        try:
            binding = add_binding(args.out, args.binding, args.seed, workers=args.workers, show_progress=True)
        except (FileNotFoundError, ValueError) as error:
            print(f"error: {error}", file=sys.stderr)
            return USAGE_ERROR_EXIT
        content = binding.content
        print(
            f"binding split in {args.out}: {len(content.triplets)} triplets / {content.image_sets} sets / "
            f"{len(content.images)} images; other files unchanged"
        )
        return 0
    try:
        summary = generate(
            args.out,
            0 if args.seed is None else args.seed,
            args.train,
            args.val,
            args.test,
            n_binding=args.binding,
            workers=args.workers,
            show_progress=True,
        )
    except FileExistsError as error:
        print(f"error: {error}", file=sys.stderr)
        return USAGE_ERROR_EXIT
    print(summary.line())
    return 0


if __name__ == "__main__":
    sys.exit(main())
