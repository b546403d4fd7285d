"""Watch mode: checkpoints appear over time, one stays partial; each complete one is scored exactly once, the
partial one never, and restarted watchers redo nothing."""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from eval_fixtures import write_checkpoint, write_synthetic

from cluster.root_config import load_config
from training.checkpoint import layout
from training.evaluation.runner import Evaluator, result_path
from training.evaluation.watcher import CheckpointWatcher, WatchState

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def config(tmp_path):
    write_synthetic(tmp_path / "synthetic", sets=2)
    return load_config(
        REPO / "configs" / "tiny.yaml",
        [
            f"cluster.storage_path={tmp_path / 'runs'}",
            f"eval.datasets.synthetic.root={tmp_path / 'synthetic'}",
            "eval.loader_workers=0",
            "eval.device=cpu",
            "eval.poll_seconds=0.05",
            "train.steps=30",
        ],
    )


def test_each_complete_checkpoint_scored_once_partial_never(config) -> None:
    run_dir = config.run_dir
    evaluator = Evaluator(config)
    calls: Counter[int] = Counter()

    def evaluate(path: Path) -> dict:
        calls[layout.step_of(path)] += 1
        return evaluator.evaluate(path)

    write_checkpoint(run_dir, 10, config)
    # First watcher stops at --until-step 10.
    first = CheckpointWatcher(run_dir, evaluate, poll_seconds=0.05, final_step=30, until_step=10)
    assert first.run(max_scans=50) == [10]

    # While the restarted watcher polls, a partial checkpoint (no COMPLETE) and then the final one appear.
    def train() -> None:
        time.sleep(0.2)
        write_checkpoint(run_dir, 20, config, complete=False)
        time.sleep(0.3)
        write_checkpoint(run_dir, 30, config)

    writer = threading.Thread(target=train)
    writer.start()
    second = CheckpointWatcher(run_dir, evaluate, poll_seconds=0.05, final_step=30)
    try:
        evaluated = second.run(max_scans=400)
    finally:
        writer.join()
    assert evaluated == [30], "the restarted watcher must skip step 10 and never read the partial step 20"
    assert second.finished()

    # A third start finds the final checkpoint scored and does nothing, even with the partial one still there.
    third = CheckpointWatcher(run_dir, evaluate, poll_seconds=0.05, final_step=30)
    assert third.run(max_scans=3) == []
    assert calls == Counter({10: 1, 30: 1})
    # Lost state (a crash between writing a result and recording it): existing results are adopted, not redone.
    (run_dir / "eval" / "watch_state.json").unlink()
    fourth = CheckpointWatcher(
        run_dir, evaluate, poll_seconds=0.05, final_step=30, already_scored=lambda s: result_path(run_dir, s).is_file()
    )
    assert fourth.run(max_scans=3) == [] and fourth.finished()
    assert calls == Counter({10: 1, 30: 1})
    assert result_path(run_dir, 10).is_file() and result_path(run_dir, 30).is_file()
    assert not result_path(run_dir, 20).exists()
    state = json.loads((run_dir / "eval" / "watch_state.json").read_text())
    assert sorted(state["done"]) == ["10", "30"]
    assert json.loads((run_dir / "eval" / "best.json").read_text())["step"] in (10, 30)


def test_watch_state_survives_reload_and_rejects_garbage(tmp_path) -> None:
    state = WatchState(tmp_path / "eval" / "watch_state.json")
    state.record(100, checkpoint="a")
    assert 100 in WatchState(tmp_path / "eval" / "watch_state.json")
    (tmp_path / "eval" / "watch_state.json").write_text("{not json")
    with pytest.raises(ValueError, match="watch_state.json"):
        WatchState(tmp_path / "eval" / "watch_state.json")


def _complete_checkpoint(run_dir: Path, step: int) -> None:
    """An empty checkpoint directory with its COMPLETE marker: all the watcher and pruning look at."""
    path = layout.checkpoint_dir(run_dir, step)
    path.mkdir(parents=True)
    layout.mark_complete(path)


def test_until_step_stops_at_the_first_checkpoint_past_it(tmp_path) -> None:
    run_dir = tmp_path / "run"
    for step in (5, 10, 15, 20):
        _complete_checkpoint(run_dir, step)
    seen: list[int] = []
    watcher = CheckpointWatcher(
        run_dir, lambda path: seen.append(layout.step_of(path)), poll_seconds=0.01, until_step=12
    )
    assert watcher.run(max_scans=5) == [5, 10, 15]
    assert seen == [5, 10, 15]


def test_a_slow_watcher_scores_every_checkpoint_the_trainer_would_prune(tmp_path) -> None:
    """keep=1, a checkpoint every step, the watcher slower than the trainer: its lease keeps each one until scored."""
    from training.checkpoint import watch_lease
    from training.checkpoint.pruning import prune

    run_dir = tmp_path / "run"
    trainer_step = iter(range(1, 9))

    def train_one_checkpoint() -> None:
        step = next(trainer_step, None)
        if step is not None:
            _complete_checkpoint(run_dir, step)
            prune(run_dir, keep=1)

    seen: list[int] = []

    def evaluate(path: Path) -> None:
        assert path.is_dir()
        seen.append(layout.step_of(path))
        train_one_checkpoint()  # the trainer writes and prunes two checkpoints per evaluation
        train_one_checkpoint()

    train_one_checkpoint()
    watcher = CheckpointWatcher(run_dir, evaluate, poll_seconds=0.01, final_step=8, sleep=lambda _: None)
    watcher.run(max_scans=20)
    assert seen == list(range(1, 9))
    assert not watch_lease.lease_path(run_dir).exists()  # released at the end
    prune(run_dir, keep=1)  # no watcher any more: pruning is back to checkpoint.keep
    assert [step for step, _ in layout.complete_checkpoints(run_dir)] == [8]


def test_prune_honours_only_a_fresh_lease(tmp_path) -> None:
    from training.checkpoint import watch_lease
    from training.checkpoint.pruning import prune

    run_dir = tmp_path / "run"
    for step in (5, 10, 15, 20):
        _complete_checkpoint(run_dir, step)
    watch_lease.write_lease(run_dir, through=5)
    prune(run_dir, keep=1)
    assert [step for step, _ in layout.complete_checkpoints(run_dir)] == [10, 15, 20]  # 5 is scored, the rest not
    lease = json.loads(watch_lease.lease_path(run_dir).read_text())
    assert watch_lease.claimed_after(run_dir, now=lease["heartbeat"] + lease["lease_seconds"] + 1) is None
    watch_lease.write_lease(run_dir, through=5, lease_seconds=0.0)  # a watcher that stopped renewing
    prune(run_dir, keep=1)
    assert [step for step, _ in layout.complete_checkpoints(run_dir)] == [20]
    watch_lease.lease_path(run_dir).write_text("{garbage")
    assert watch_lease.claimed_after(run_dir) is None


def test_a_bad_checkpoint_is_recorded_failed_and_the_watch_goes_on(config, caplog) -> None:
    """A COMPLETE checkpoint with truncated weights: recorded as failed in watch_state.json and the log, skipped;
    the next checkpoints are scored, and a restarted watcher neither stops at it nor tries it again."""
    run_dir = config.run_dir
    evaluator = Evaluator(config)
    calls: Counter[int] = Counter()

    def evaluate(path: Path) -> dict:
        calls[layout.step_of(path)] += 1
        return evaluator.evaluate(path)

    weights = write_checkpoint(run_dir, 10, config) / layout.WEIGHTS
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    write_checkpoint(run_dir, 20, config)
    first = CheckpointWatcher(run_dir, evaluate, poll_seconds=0.05, final_step=30, until_step=20)
    with caplog.at_level("ERROR", logger="training.evaluation.watcher"):
        assert first.run(max_scans=5) == [20]
    assert (
        f"checkpoint {weights.parent} failed and is skipped" in caplog.text and "cannot load the weights" in caplog.text
    )
    state = json.loads((run_dir / "eval" / "watch_state.json").read_text())["done"]
    assert "cannot load the weights" in state["10"]["failed"] and "failed" not in state["20"]
    assert not result_path(run_dir, 10).exists() and result_path(run_dir, 20).is_file()

    write_checkpoint(run_dir, 30, config)
    restarted = CheckpointWatcher(run_dir, evaluate, poll_seconds=0.05, final_step=30)
    assert restarted.run(max_scans=5) == [30] and restarted.finished()
    assert calls == Counter({10: 1, 20: 1, 30: 1})


def test_checkpoints_the_watcher_protected_are_pruned_when_it_releases_them(tmp_path) -> None:
    """A keep=1 run saves 8 checkpoints while a watcher that has scored nothing holds its lease, so the trainer keeps
    all 8; as the watcher scores each one it is pruned, and once the run's last one is scored only it is left."""
    from training.checkpoint import watch_lease
    from training.checkpoint.pruning import prune
    from training.config_loader import to_yaml

    keep_one = load_config(REPO / "configs" / "tiny.yaml", [f"cluster.storage_path={tmp_path}", "checkpoint.keep=1"])
    run_dir = keep_one.run_dir
    watch_lease.write_lease(run_dir, through=-1)  # a watcher slower than the trainer
    for step in range(1, 9):
        path = layout.checkpoint_dir(run_dir, step)
        path.mkdir(parents=True)
        (path / layout.CONFIG).write_text(to_yaml(keep_one))
        layout.mark_complete(path)
        prune(run_dir, keep_one.checkpoint.keep)  # as Checkpointer.save does
    assert len(layout.complete_checkpoints(run_dir)) == 8

    on_disk_while_scoring = {}

    def evaluate(path: Path) -> dict:
        on_disk_while_scoring[layout.step_of(path)] = [step for step, _ in layout.complete_checkpoints(run_dir)]
        return {}

    watcher = CheckpointWatcher(run_dir, evaluate, poll_seconds=0.01, final_step=8, sleep=lambda _: None)
    assert watcher.run(max_scans=3) == list(range(1, 9))
    assert on_disk_while_scoring[5] == [5, 6, 7, 8]  # 1..4 went as each was scored
    assert [step for step, _ in layout.complete_checkpoints(run_dir)] == [8]


def test_pruning_on_release_keeps_what_the_run_recorded_not_the_readers_keep(tmp_path) -> None:
    """The watcher prunes by the run's own checkpoint.keep (from the newest checkpoint's config.yaml), and not at all
    when that cannot be read."""
    from training.checkpoint.pruning import prune_released
    from training.config_loader import to_yaml

    keep_three = load_config(REPO / "configs" / "tiny.yaml", [f"cluster.storage_path={tmp_path}", "checkpoint.keep=3"])
    run_dir = keep_three.run_dir
    for step in range(1, 6):
        _complete_checkpoint(run_dir, step)
    assert prune_released(run_dir) == []  # hand-made checkpoints without a config: nothing is deleted
    (layout.checkpoint_dir(run_dir, 5) / layout.CONFIG).write_text(to_yaml(keep_three))
    assert prune_released(run_dir) == [1, 2]
    assert [step for step, _ in layout.complete_checkpoints(run_dir)] == [3, 4, 5]
