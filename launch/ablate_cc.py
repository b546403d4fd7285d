"""The Text-CC ablation on the embedded default: lambda x 3 seeds, from random and from pretrained towers.

    python launch/ablate_cc.py --config configs/tiny.yaml --towers runs/towers/ContextTiny.safetensors
    python launch/ablate_cc.py --config configs/tiny.yaml --inits pretrained --lambdas 0,0.08 --seeds 0 --steps 200
    python launch/ablate_cc.py --config configs/tiny.yaml --towers runs/towers/ContextTiny.safetensors \
        --inits pretrained --variants lambda0,paper,towers-spatial

Each cell trains `<config>` with `loss.lambda_cc` (or, with `--variants`, the named variant's `loss` overrides:
`cluster.bench.ablation.VARIANTS`), `train.seed` and (pretrained) `model.weights_file` set, as the run
`ablation-<init>-lambda<l>-seed<s>` (`ablation-<init>-<variant>-seed<s>`) on one local Ray, then scores its final
checkpoint with the eval job. Cells already in `<storage>/ablation/results.jsonl` are skipped, so a rerun resumes;
`--rescore` scores every recorded cell's final checkpoint again (after the eval gained a measure) and rewrites its
line. It ends by printing the markdown tables that docs/results.md quotes (mean +- std over seeds, paired differences
against lambda 0, and the training logs' `cc/*` figures at each cell's start and end), and writes them to
`<storage>/ablation/table.md`.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cluster.cli import CONFIG_ERROR_EXIT, ConfigError, parse_config_args  # noqa: E402


def add_arguments(parser) -> None:
    parser.add_argument("--towers", help="open_clip weights of the pretrained towers (launch/pretrain_towers.py)")
    parser.add_argument("--inits", default="random,pretrained", help="comma list of random, pretrained")
    parser.add_argument("--lambdas", default="0,0.08,0.3", help="comma list of loss.lambda_cc values")
    parser.add_argument(
        "--variants",
        help="comma list of named concept-consistency variants (cluster.bench.ablation.VARIANTS) instead of --lambdas",
    )
    parser.add_argument(
        "--rescore", action="store_true", help="score the recorded cells' final checkpoints again, then print"
    )
    parser.add_argument("--seeds", default="0,1,2", help="comma list of train.seed values")
    parser.add_argument("--steps", type=int, default=1000, help="training steps of every cell")


def main(argv: list[str] | None = None) -> int:
    try:
        args, base = parse_config_args(argv, "Sweep loss.lambda_cc x seeds x tower init.", add_arguments)
        from cluster.bench.ablation import sweep_cells

        sweep = sweep_cells(args.inits, args.lambdas, args.variants, args.seeds)
        if any(cell.init == "pretrained" for cell in sweep) and not (args.towers and Path(args.towers).is_file()):
            raise ConfigError(f"--towers {args.towers!r} is not a file (run launch/pretrain_towers.py first)")
        from cluster.bench.ablation import RESULTS, read_results, report, run_cells
        from cluster.root_config import load_config

        results_path = Path(base.cluster.storage_path) / "ablation" / RESULTS
        done = read_results(results_path)
        other = sorted({line["steps"] for line in done.values()} - {args.steps})
        if other:
            raise ConfigError(
                f"{results_path} holds a sweep of {other} steps, not --steps {args.steps}: move it away or pass "
                "another cluster.storage_path"
            )
        pending = [cell for cell in sweep if cell.run_name not in done]
        if args.rescore:
            pending = [cell for cell in sweep if cell.run_name in done]
        # Every cell's config is checked before anything starts.
        configs = [
            load_config(args.config, [*args.overrides, *cell.overrides(args.steps, args.towers)]) for cell in pending
        ]
    except (ConfigError, ValueError) as error:
        print(f"config error: {error}", file=sys.stderr)
        return CONFIG_ERROR_EXIT
    print(f"ablation: {len(sweep)} cells, {len(sweep) - len(pending)} already done; results in {results_path}")
    if pending:
        from cluster.runtime.ray_setup import connect

        print(connect(base.cluster), flush=True)  # one local Ray for every cell
        run_cells(pending, configs, results_path, args.steps, args.rescore)
    print(report(results_path, Path(base.cluster.storage_path)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
