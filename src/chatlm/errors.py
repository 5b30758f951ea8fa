"""The errors whose message already tells the user what to do, and how each one ends a command.

Every stage app and the `chatlm` console script print a `ChatlmError` as one line,
`chatlm <stage>: <label>: <message>` (plus the run directory when there is one), and exit with the
error's `exit_code`; run.json still records the full traceback. Any other exception is a bug and
keeps its traceback.

| class           | exit | label          | raised for                                                  |
|-----------------|------|----------------|-------------------------------------------------------------|
| ChatlmError     | 1    | error          | a missing prerequisite or bad input found while running     |
| UsageError      | 2    | error          | a command line that cannot mean anything (unknown key, ...) |
| ConfigError     | 2    | config error   | a value that parses but makes no sense (names the key)      |
| LaunchError     | 2    | launch error   | a launch that cannot work as asked (Slurm partition, GPUs)  |
| Preempted       | 1    | stopped        | a run that stopped early with a checkpoint (signal, drill)  |
| Interrupted     | 130  | interrupted    | Ctrl-C: checkpointed at the end of the step                 |

Subclasses elsewhere (CheckpointError, DataError, TokenizerMissing, RunDirError, NonFiniteLoss,
...) inherit code 1 and the label "error". Errors raised on a spawned rank reach the launching
process as data (`RankFailure`), so the edge never reads traceback text.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional


class ChatlmError(Exception):
    """Bad input or a missing prerequisite, explained in the message."""

    exit_code = 1
    label = "error"


class UsageError(ChatlmError):
    """A command line that cannot mean anything: reported before anything runs."""

    exit_code = 2


class ConfigError(UsageError, ValueError):
    """A configuration value that parses but makes no sense. The message names the key."""

    label = "config error"

    def __init__(self, key: str, message: str):
        self.key = key
        super().__init__(f"{key}: {message}")

    def __reduce__(self) -> tuple[Callable, tuple]:  # picklable although __init__ takes two arguments
        return _rebuild_config_error, (self.key, str(self))


def _rebuild_config_error(key: str, text: str) -> ConfigError:
    error = ConfigError.__new__(ConfigError)
    error.key = key
    Exception.__init__(error, text)
    return error


class LaunchError(UsageError):
    """The launch cannot work as asked (no Slurm, no such partition, too many GPUs...)."""

    label = "launch error"


class Preempted(ChatlmError):
    """A stage stopped early with a checkpoint: a signal (Slurm preemption or time limit) or
    `stop_at_step`. run.json records `preempted`.

    `requeue` is the signal handler that was installed before the stage caught the signal
    (submitit's "checkpoint and requeue" on USR2). The launcher edge calls it once the record is
    closed; it resubmits the same job into the same run directory, which then resumes.
    """

    label = "stopped"
    status = "preempted"

    def __init__(self, message: str, *, signum: Optional[int] = None, requeue: Optional[Callable] = None):
        super().__init__(message)
        self.signum = signum
        self.requeue = requeue


class Interrupted(Preempted):
    """Ctrl-C (SIGINT): the run checkpointed at the end of its step; run.json records `interrupted`."""

    exit_code = 130
    label = "interrupted"
    status = "interrupted"


@dataclass(frozen=True)
class RankFailure:
    """A ChatlmError of a spawned rank, as plain data that crosses process boundaries."""

    rank: int
    type_name: str
    message: str
    exit_code: int
    label: str

    @classmethod
    def of(cls, rank: int, error: ChatlmError) -> RankFailure:
        return cls(rank, type(error).__name__, str(error), error.exit_code, error.label)

    def as_error(self) -> ChatlmError:
        error = ChatlmError(self.message)
        error.exit_code, error.label = self.exit_code, self.label  # type: ignore[misc]
        return error


def user_message(error: BaseException) -> Optional[tuple[str, int]]:
    """(`<label>: <message>`, exit code) of a ChatlmError, else None (a bug: keep its traceback)."""
    if isinstance(error, ChatlmError):
        return f"{error.label}: {error}", error.exit_code
    return None
