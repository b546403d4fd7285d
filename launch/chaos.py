"""The chaos benchmark (not a CI test): train once undisturbed and once with a random worker SIGKILLed every few
minutes, then check that the final weights are bitwise equal and every sample was seen exactly once.

    python launch/chaos.py --config configs/tiny.yaml --steps 1600 --kill-every 120 [key.path=value ...]

Needs the config's shards (`make demo` builds the tiny ones). Writes `<storage>/chaos-<stamp>.json` and prints the
restarts, the time each one lost, the samples seen and the verdict; exits 1 when the weights or the data differ.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cluster.cli import CONFIG_ERROR_EXIT, ConfigError, parse_config_args  # noqa: E402


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", type=int, default=1600, help="training steps of each run")
    parser.add_argument("--every-steps", type=int, default=100, help="checkpoint interval (steps)")
    parser.add_argument("--kill-every", type=float, default=120.0, help="mean seconds between kills")
    parser.add_argument("--seed", type=int, default=0, help="seeds which worker dies and when")
    parser.add_argument("--reference", help="run directory of a finished undisturbed run to compare against")


def main(argv: list[str] | None = None) -> int:
    try:
        args, config = parse_config_args(
            argv, "Chaos benchmark: random worker kills vs an undisturbed run.", add_arguments
        )
    except ConfigError as error:
        print(f"config error: {error}", file=sys.stderr)
        return CONFIG_ERROR_EXIT
    from tqdm import tqdm

    from cluster.bench.chaos_bench import RunOutcome, final_state, report, run

    stamp = time.strftime("%Y%m%d-%H%M%S")
    storage = Path(config.cluster.storage_path).resolve()
    storage.mkdir(parents=True, exist_ok=True)
    overrides = list(args.overrides) + [
        f"train.steps={args.steps}",
        f"checkpoint.every_steps={args.every_steps}",
        f"cluster.storage_path={storage}",
    ]

    def command(name: str, *extra: str) -> list[str]:
        train = Path(__file__).resolve().parent / "train.py"
        return [sys.executable, str(train), "--config", args.config, *overrides, f"cluster.run_name={name}", *extra]

    def bar(label: str):
        progress = tqdm(total=args.steps, desc=label, unit="step")
        progress.postfix_restarts = 0

        def update(step: int, restarts: int) -> None:
            if (step, restarts) == (progress.n, progress.postfix_restarts):
                return
            progress.n, progress.postfix_restarts = step, restarts
            progress.set_postfix(restarts=restarts, refresh=False)
            progress.refresh()

        return progress, update

    if args.reference:
        reference = final_state(RunOutcome(args.reference, 0.0, 0), Path(args.reference))
    else:
        name = f"chaos-reference-{stamp}"
        progress, update = bar("undisturbed")
        reference = run(command(name), storage / name, storage / f"{name}.log", progress=update)
        progress.close()
    name = f"chaos-{stamp}"
    progress, update = bar("with kills")
    chaos = run(
        command(name, "cluster.max_failures=-1"),
        storage / name,
        storage / f"{name}.log",
        kill_every=args.kill_every,
        seed=args.seed,
        progress=update,
    )
    progress.close()
    verdict = report(reference, chaos)
    out = storage / f"chaos-{stamp}.json"
    out.write_text(json.dumps(verdict, indent=2))
    for restart in chaos.restarts:
        print(
            f"killed pid {restart.killed_pid} at {restart.killed_at_s:.0f} s (step {restart.step_at_kill}): "
            f"resumed from step {restart.resumed_from}, {restart.lost_s:.0f} s lost"
        )
    print(
        f"undisturbed {reference.wall_s:.0f} s, with kills {chaos.wall_s:.0f} s; {verdict['restarts']} restarts, "
        f"{verdict['time_lost_s']['total']:.0f} s lost; samples {chaos.samples_seen} (undisturbed "
        f"{reference.samples_seen}), each once in order: {verdict['samples_each_once_in_order']}; "
        f"final weights bitwise equal: {verdict['weights_bitwise_equal']}"
    )
    print(f"report: {out}")
    return 0 if verdict["weights_bitwise_equal"] and verdict["samples_each_once_in_order"] else 1


if __name__ == "__main__":
    sys.exit(main())
