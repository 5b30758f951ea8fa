"""Reading a task file: one JSON record per line, each with the fields its task needs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from chatlm.data.shards import DataError


def read_records(path: Path, required: Sequence[str], what: str) -> list[dict]:
    """The records of a JSONL file; a line that is not JSON or lacks a required field is a
    DataError naming the file and line (`what` names a record in the message, e.g. "a gsm8k row")."""
    records = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{n}: not JSON ({e.msg})") from e
        missing = [k for k in required if k not in record]
        if missing:
            raise DataError(f"{path}:{n}: {what} needs {', '.join(missing)}")
        records.append(record)
    if not records:
        raise DataError(f"{path}: no records")
    return records
