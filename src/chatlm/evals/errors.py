"""The error every evaluator raises for task data that is not there."""

from __future__ import annotations

from chatlm.data.shards import DataError


class EvalDataMissing(DataError):
    """Task data that was never fetched (or was deleted): the message names the command that
    fetches it, `chatlm fetch evals`."""
