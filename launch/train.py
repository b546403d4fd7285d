"""Train ConText-CIR with Ray + DeepSpeed.

    ray job submit --working-dir . -- python launch/train.py --config configs/vith.yaml [key.path=value ...]
    python launch/train.py --config configs/tiny.yaml            # no cluster: a local Ray on 127.0.0.1
    python launch/train.py --config vith --dry-run               # a bare name finds configs/vith.yaml; check only

Resubmitting the same `cluster.run_name` resumes from its latest complete checkpoint.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cluster.cli import CONFIG_ERROR_EXIT, ConfigError, parse_config_args  # noqa: E402


def add_arguments(parser) -> None:
    parser.add_argument("--dry-run", action="store_true", help="validate the config, print it resolved, start nothing")


def main(argv: list[str] | None = None) -> int:
    try:
        args, config = parse_config_args(argv, "Train ConText-CIR on a Ray cluster (DeepSpeed workers).", add_arguments)
    except ConfigError as error:
        print(f"config error: {error}", file=sys.stderr)
        return CONFIG_ERROR_EXIT
    if args.dry_run:
        from training.config_loader import to_yaml

        print(to_yaml(config), end="")
        print(
            f"# {args.config}: valid; {config.world_size} worker(s) x micro-batch {config.train.micro_batch} x "
            f"accumulation {config.accumulation_steps} = global batch {config.train.global_batch}; run {config.run_dir}"
        )
        return 0
    from cluster.runtime.preflight import startup_problems

    problems = startup_problems(config)  # what would fail every retry of the workers, found before Ray starts
    if problems:
        print("\n".join(f"config error: {problem}" for problem in problems), file=sys.stderr)
        return CONFIG_ERROR_EXIT

    from cluster.runtime.ray_setup import connect, relative_path_problem

    problem = relative_path_problem(
        config.cluster, {"cluster.storage_path": config.cluster.storage_path, "data.shards_dir": config.data.shards_dir}
    )
    if problem is not None:
        print(f"config error: {problem}", file=sys.stderr)
        return CONFIG_ERROR_EXIT

    print(connect(config.cluster), flush=True)  # before anything imports ray (it reads its auth settings then)
    from cluster.jobs.trainer import WORKER_LOGS, run_training
    from training.checkpoint import layout

    latest = layout.latest_complete(config.run_dir)
    start = f"resuming from {latest[1]} (step {latest[0]})" if latest else "starting from scratch"
    print(f"run {config.run_dir}: {start}", flush=True)
    from cluster.runtime.resources import RESOURCE_WAIT_EXIT, ResourceWaitExpired
    from shards.storage import ShardStorageError
    from training.errors import PermanentError

    try:
        run_dir = run_training(config)
    except ResourceWaitExpired as error:
        print(f"cluster error: {error}", file=sys.stderr)
        return RESOURCE_WAIT_EXIT
    except (PermanentError, ShardStorageError) as error:  # not retried: a restart would fail the same way
        print(f"train error: {error}", file=sys.stderr)
        return CONFIG_ERROR_EXIT
    print(f"run directory: {run_dir}")
    print(f"checkpoints:   {run_dir / 'checkpoints'}")
    print(f"worker logs:   {run_dir / WORKER_LOGS}")
    print(f"tensorboard --logdir {run_dir / 'tensorboard'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
