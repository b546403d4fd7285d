"""The separate evaluation job: benchmark readers, metrics, encoding, submissions, the runner and the watcher.

`launch/eval.py` is the entry point; `runner.Evaluator` scores one checkpoint and `watcher.CheckpointWatcher`
scores each checkpoint of a run as it lands (DESIGN section 8).
"""
