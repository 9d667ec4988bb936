"""User-facing error types.

Every problem a user can cause (a bad config, a missing dataset, an unknown model, a
run folder in the way) is raised as an :class:`OpcdError` subclass whose message is one
paragraph naming the problem and the fix. The CLI prints that message and exits with
status 2 instead of showing a traceback; Python callers can catch ``OpcdError``.
"""

from __future__ import annotations


class OpcdError(Exception):
    """Base class: a problem the user can fix; the message says what and how."""


class ConfigError(OpcdError):
    """A config file or a command-line override is invalid."""


class DataError(OpcdError):
    """A dataset is missing, empty or has malformed rows."""


class ModelError(OpcdError):
    """A model reference cannot be resolved, verified or loaded."""


class IntegrityError(ModelError):
    """A downloaded file does not match its pinned sha256 digest."""


class RunFolderError(OpcdError):
    """The run folder cannot be used (holds another run, is unwritable, ...)."""


class HubError(OpcdError):
    """Pushing a model to the Hugging Face hub failed (no token, no network, ...)."""


class CheckpointError(OpcdError):
    """A checkpoint is damaged (bad hash, truncated file) or does not match the run."""


class NothingToDistil(OpcdError):
    """The context does not raise the task's score above the model's own: no training."""


class NumericalError(OpcdError):
    """Training stopped: too many consecutive steps had a non-finite loss or gradient norm."""


class TrainingInterrupted(OpcdError):
    """A run stopped on SIGINT / SIGTERM after saving a checkpoint; ``exit_code`` is 128 + signal."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + signum


class CollapseError(OpcdError):
    """Training stopped: the collapse guard saw the student breaking. The last good state was
    saved as the final model first; ``exit_code`` is 3, ``result`` the run's TrainResult."""

    exit_code = 3

    def __init__(self, message: str, result: object = None) -> None:
        super().__init__(message)
        self.result = result
