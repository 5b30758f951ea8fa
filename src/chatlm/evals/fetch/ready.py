"""Where the evaluation data lives, and READY.json: telling a complete directory from a missing or damaged one.

READY.json is written last, so a directory without it is incomplete. `load_ready` reads it,
`check_file` checks one file against it (size, and with deep=True the sha256) and `verify` checks
every file of some groups; each raises EvalDataMissing naming `chatlm fetch evals`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Optional, Sequence

from chatlm.data.download import sha256_file
from chatlm.errors import UsageError
from chatlm.evals.errors import EvalDataMissing

FORMAT_VERSION = 1
GROUPS = ("core", "chat")
FETCH_HINT = "run `chatlm fetch evals`"


def default_dest(cache_dir: Optional[str | Path] = None) -> Path:
    """`<cache_dir>/evals`; cache_dir defaults to $CHATLM_CACHE_DIR, else ~/.cache/chatlm (paths.cache_dir)."""
    base = cache_dir if cache_dir is not None else (os.environ.get("CHATLM_CACHE_DIR") or "~/.cache/chatlm")
    return Path(base).expanduser() / "evals"


def parse_groups(text: Optional[str | Sequence[str]]) -> tuple[str, ...]:
    """`core,chat` -> ("core", "chat"), in GROUPS order; raises UsageError on anything else."""
    if text is None:
        return GROUPS
    names = [t.strip() for t in (text.split(",") if isinstance(text, str) else text) if t.strip()]
    unknown = [n for n in names if n not in GROUPS]
    if unknown or not names:
        raise UsageError(f"--tasks {','.join(names) or '(empty)'}: choose from {','.join(GROUPS)}")
    return tuple(g for g in GROUPS if g in names)


def load_ready(dest: Optional[str | Path] = None) -> dict:
    """READY.json of a complete evaluation directory; EvalDataMissing if there is none."""
    dest = Path(dest).expanduser() if dest is not None else default_dest()
    path = dest / "READY.json"
    if not path.is_file():
        raise EvalDataMissing(f"no evaluation data in {dest} ({path.name} missing): {FETCH_HINT}")
    try:
        ready = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise EvalDataMissing(f"{path} is unreadable ({e}): {FETCH_HINT}") from e
    if not isinstance(ready, dict) or ready.get("format_version") != FORMAT_VERSION or "files" not in ready:
        raise EvalDataMissing(f"{path} is from another chatlm version: {FETCH_HINT}")
    return ready


def check_file(path: str | Path, ready: Optional[dict] = None, deep: bool = False) -> int:
    """Records in `path` (a file under an evaluation directory), after checking it against READY.json:
    present, the size it was written with and, with deep=True, the same sha256. Raises EvalDataMissing
    naming the file and `chatlm fetch evals` otherwise."""
    path = Path(path).expanduser()
    root = _root_of(path)
    ready = ready if ready is not None else load_ready(root)
    rel = path.resolve().relative_to(root.resolve()).as_posix()
    entry = ready["files"].get(rel)
    if entry is None:
        raise EvalDataMissing(f"{path} is not listed in {root / 'READY.json'}: {FETCH_HINT}")
    if not path.is_file():
        raise EvalDataMissing(f"{path} is missing (READY.json lists it): {FETCH_HINT}")
    size = path.stat().st_size
    if size != entry["bytes"] or (deep and sha256_file(path) != entry["sha256"]):
        raise EvalDataMissing(
            f"{path} differs from what was written ({size:,} bytes, READY.json says {entry['bytes']:,}"
            f"{' or a different sha256' if deep else ''}): {FETCH_HINT}"
        )
    return int(entry["records"])


def verify(dest: Optional[str | Path] = None, groups: Iterable[str] = GROUPS, deep: bool = False) -> dict:
    """READY.json after checking every file of `groups` with check_file."""
    dest = Path(dest).expanduser() if dest is not None else default_dest()
    ready = load_ready(dest)
    for group in groups:
        if group not in ready.get("groups", []):
            raise EvalDataMissing(f"{dest} has no {group} evaluation data: {FETCH_HINT} --tasks {group}")
        for rel in ready["files"]:
            if rel.startswith(group + "/"):
                check_file(dest / rel, ready, deep)
    return ready


def _root_of(path: Path) -> Path:
    for parent in path.parents:
        if (parent / "READY.json").is_file():
            return parent
    raise EvalDataMissing(f"{path} is not inside an evaluation directory (no READY.json above it): {FETCH_HINT}")
