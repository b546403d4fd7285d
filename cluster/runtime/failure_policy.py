"""Which worker failures Ray Train retries: not the ones that would recur (`training.errors.PermanentError`).

Ray Train 2.60 (Train v2) asks a `FailurePolicy` what to do with each failure: its controller polls the worker
group, wraps every rank's exception in one `WorkerGroupError` (`worker_failures`: rank -> the exception the worker
raised), and the policy answers RETRY (restart the group from the latest checkpoint) or RAISE (end the run;
`fit()` raises the error on the driver). Ray's `DefaultFailurePolicy` retries every worker-group error up to
`FailureConfig.max_failures` times, so a full disk or an unreadable checkpoint cost `max_failures` restarts before
the same error ended the job in a long traceback.

`PermanentFirst` answers RAISE at once when any failed rank raised a `PermanentError`, and leaves every other
failure (a killed worker, a lost node, a preemption, a controller error) to Ray's default policy. "Any" rather than
"all": when one rank fails the others routinely fail with collateral errors (a broken collective), and the
permanent cause is what a restart would meet again. Ray has no public hook for the policy: `fit()` builds the
default one and passes it to the controller as `failure_policy`, so `PermanentFirstTorchTrainer` swaps it there;
`tests/e2e/test_failure_policy.py` fails if Ray changes that route.
"""

from __future__ import annotations

import logging
import sys

from ray.train import TrainingFailedError, WorkerGroupError
from ray.train.torch import TorchTrainer
from ray.train.v2._internal.execution.failure_handling import DefaultFailurePolicy, FailureDecision

from training.errors import PermanentError

logger = logging.getLogger(__name__)

# Ray's worker logs every error of the training function with its traceback from this logger.
RAY_WORKER_ERROR_LOGGER = "ray.train.v2._internal.util"


def is_permanent(error: BaseException) -> bool:
    """A `PermanentError`, or an error that says so itself (`shards.storage.ShardStorageError.permanent`: a shard
    that is gone or forbidden, which the data layer below `training` reports without knowing the class)."""
    return isinstance(error, PermanentError) or getattr(error, "permanent", False) is True


def permanent_error(failure: BaseException) -> BaseException | None:
    """The lowest rank's permanent error in a failed run, or None when a restart could help."""
    if not isinstance(failure, WorkerGroupError):
        return None
    for _, error in sorted(failure.worker_failures.items()):
        if is_permanent(error):
            return error
    return None


class PermanentFirst(DefaultFailurePolicy):
    """Ray's default failure policy, except that a permanent worker error ends the run without a retry."""

    def make_decision(self, training_failed_error: TrainingFailedError) -> FailureDecision:
        error = permanent_error(training_failed_error)
        if error is None:
            return super().make_decision(training_failed_error)
        logger.info("not restarting the worker group: %s", error)
        return FailureDecision.RAISE


class PermanentFirstTorchTrainer(TorchTrainer):
    """`TorchTrainer` whose controller decides with `PermanentFirst` instead of Ray's default policy."""

    def _initialize_and_run_controller(self, **controller_init_kwargs):
        controller_init_kwargs["failure_policy"] = PermanentFirst(self.run_config.failure_config)
        return super()._initialize_and_run_controller(**controller_init_kwargs)


class _PermanentErrorsInOneLine(logging.Filter):
    """Rewrites Ray's "Error in training function" record of a permanent error to its one-line message.

    Ray logs the record inside the `except` block that caught the error, so the error being handled is the one the
    record is about. Other errors keep their traceback: they are bugs or crashes, and the traceback is the help.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        error = sys.exc_info()[1]
        if error is not None and is_permanent(error) and record.levelno >= logging.ERROR:
            record.msg, record.args = "%s: %s", (type(error).__name__, error)
        return True


def log_permanent_errors_in_one_line() -> None:
    """Install the filter in this worker process (idempotent)."""
    ray_logger = logging.getLogger(RAY_WORKER_ERROR_LOGGER)
    if not any(isinstance(existing, _PermanentErrorsInOneLine) for existing in ray_logger.filters):
        ray_logger.addFilter(_PermanentErrorsInOneLine())
