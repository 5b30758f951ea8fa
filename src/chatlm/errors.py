"""The base class of errors whose message already tells the user what to do.

Stage apps print these as one line (`chatlm <stage>: error: ...`) instead of a traceback; the
run's run.json still records the full traceback. Everything else is a bug and keeps its traceback.
"""


class ChatlmError(Exception):
    """Bad input or a missing prerequisite, explained in the message."""
