"""The separate evaluation job: score one checkpoint, or watch a run and score each checkpoint as it lands.

    python launch/eval.py --config configs/tiny.yaml --checkpoint runs/demo/checkpoints/latest
    python launch/eval.py --config vith --watch [--until-step N] [--benchmarks cirr,circo]
    ray job submit --working-dir . --entrypoint-num-gpus 1 -- python launch/eval.py --config configs/vith.yaml --watch
    python launch/eval.py --config configs/tiny.yaml --checkpoint runs/demo/checkpoints/latest \
        --methods context,image_only,text_only,sum,phi,cvsi,tiscir   # one side-by-side table of every method
    python launch/eval.py --list                      # the registered benchmarks and methods

Loads only `model.safetensors` plus the checkpoint's saved config; writes `<run>/eval/step_XXXXXXXX.json`,
TensorBoard `eval/<benchmark>/<metric>` (and `eval/<benchmark>/<method>/<metric>` per method), and
`<run>/eval/best.json`, and prints the model beside the other methods. phi, cvsi and tiscir read their trained
checkpoints from `methods.<name>.checkpoint` (docs/methods.md).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cluster.cli import CONFIG_ERROR_EXIT, ConfigError, parse_config_args  # noqa: E402


def add_arguments(parser) -> None:
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--checkpoint", help="a checkpoint directory, or <run>/checkpoints/latest")
    target.add_argument("--watch", action="store_true", help="poll the run's checkpoints and score each once")
    parser.add_argument("--benchmarks", help="comma-separated registered benchmarks (default: eval.benchmarks)")
    parser.add_argument("--until-step", type=int, help="watch: stop once a checkpoint at or past this step is scored")
    parser.add_argument("--methods", help="comma-separated methods to score (default: context + eval.baselines)")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--list" in argv:
        from training.evaluation.catalog import benchmark_table, method_table

        print(benchmark_table(), method_table(), sep="\n\n")
        return 0
    try:
        args, config = parse_config_args(argv, "ConText-CIR evaluation job", add_arguments)
        from training.evaluation.benchmarks import BENCHMARKS

        benchmarks = [name.strip() for name in args.benchmarks.split(",")] if args.benchmarks else None
        unknown = [name for name in benchmarks or () if name not in BENCHMARKS]
        if unknown:
            raise ConfigError(f"--benchmarks has unknown {unknown}; registered: {', '.join(BENCHMARKS.names())}")
        from training.evaluation.methods import METHODS, method_name

        methods = [name.strip() for name in args.methods.split(",") if name.strip()] if args.methods else None
        unknown = [name for name in methods or () if method_name(name) not in METHODS]
        if unknown:
            raise ConfigError(f"--methods has unknown {unknown}; registered: {', '.join(METHODS.names())} (sum)")
        missing = config.eval.unset_roots(benchmarks or config.eval.benchmarks)
        if missing:
            raise ConfigError(f"{args.config}: {', '.join(missing)} must be set to evaluate those benchmarks")
    except ConfigError as error:
        print(f"config error: {error}", file=sys.stderr)
        return CONFIG_ERROR_EXIT
    # Our own progress at INFO; libraries (open_clip logs model creation on the root logger) only from WARNING.
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("training").setLevel(logging.INFO)
    from training.evaluation.benchmarks import BenchmarkError
    from training.evaluation.methods import MethodError
    from training.evaluation.runner import CheckpointError, Evaluator, format_table, result_path
    from training.evaluation.watcher import CheckpointWatcher

    evaluator = Evaluator(config, benchmarks, methods)
    try:
        evaluator.load_benchmarks()
        if args.checkpoint:
            print(format_table(evaluator.evaluate(args.checkpoint)), flush=True)
            return 0
        watcher = CheckpointWatcher(
            config.run_dir,
            evaluator.evaluate,
            config.eval.poll_seconds,
            final_step=config.train.steps,
            until_step=args.until_step,
            on_result=lambda step, result: print(format_table(result), flush=True),
            already_scored=lambda step: result_path(config.run_dir, step).is_file(),
        )
        print(f"watching {config.run_dir / 'checkpoints'} every {config.eval.poll_seconds:g} s", flush=True)
        watcher.run()
    except (BenchmarkError, CheckpointError, MethodError) as error:  # always recurs: one line, exit 2, no traceback
        print(f"eval error: {' '.join(str(error).split())}", file=sys.stderr)
        return CONFIG_ERROR_EXIT
    return 0


if __name__ == "__main__":
    sys.exit(main())
