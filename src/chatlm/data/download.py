"""Download nanochat's web-text shard sets (ClimbMix, FineWeb-EDU) over plain HTTP(S).

Every file is fetched the same careful way (`download_file`):

* it is streamed into `<name>.part` next to the final path, never into the final name;
* an interrupted `.part` is resumed with an HTTP `Range` request (a server that ignores Range and
  answers 200 restarts the file from byte 0);
* the size is checked against `Content-Length` / `Content-Range`, and optionally a sha256;
* only a complete, verified file is renamed (atomically) to its final name, so a kill at any
  moment leaves either nothing, a `.part` that the next run resumes, or the finished file;
* connection errors, timeouts, short bodies and 5xx/408/429 answers are retried with
  exponential backoff; other HTTP errors (404, 403, ...) fail at once with the URL and status.

`download_shards` runs that over a thread pool. Only one process should download into a
directory: `chatlm.data.sources.prepare_source` lets the main rank download and the others wait
for its done-marker.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence

from chatlm.data.shards import DataError, shard_name

CHUNK = 1 << 20
USER_AGENT = "chatlm-downloader/1"
RETRY_STATUS = {408, 425, 429, 500, 502, 503, 504}


@dataclass(frozen=True)
class RemoteShardSet:
    """A numbered shard set on the web; the last shard (total_shards - 1) is validation."""

    name: str
    url_pattern: str  # str.format pattern with {i}, e.g. ".../shard_{i:05d}.parquet"
    total_shards: int

    def url(self, i: int) -> str:
        return self.url_pattern.format(i=i)

    @property
    def val_index(self) -> int:
        return self.total_shards - 1

    def indices(self, num_train: int = -1) -> list[int]:
        """Train shards 0..num_train-1 (all when -1) plus the validation shard."""
        n_train = self.total_shards - 1
        if num_train is not None and num_train >= 0:
            n_train = min(num_train, self.total_shards - 1)
        return list(range(n_train)) + [self.val_index]


_HF = "https://huggingface.co/datasets/karpathy/{repo}/resolve/main/shard_{{i:05d}}.parquet"
REMOTE_SETS: dict[str, RemoteShardSet] = {
    "climbmix": RemoteShardSet("climbmix", _HF.format(repo="climbmix-400b-shuffle"), 6543),
    "fineweb_edu": RemoteShardSet("fineweb_edu", _HF.format(repo="fineweb-edu-100b-shuffle"), 1823),
}


def url_pattern_from(url: str) -> str:
    """A user's `url`: a pattern with `{i...}`, or a base URL to which `/shard_{i:05d}.parquet` is added."""
    if "{i" in url:
        return url
    return url.rstrip("/") + "/shard_{i:05d}.parquet"


class _Retry(Exception):
    """A failure worth another attempt."""


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)")


def _attempt(url: str, part: Path, timeout: float, expected_size: Optional[int]) -> int:
    """One HTTP request that extends `part`; returns the total size the server announced (-1 unknown)."""
    offset = part.stat().st_size if part.exists() else 0
    if expected_size is not None and offset > expected_size:
        part.unlink()
        offset = 0
    req = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    if offset:
        req.add_header("Range", f"bytes={offset}-")
    try:
        resp = urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and offset:
            # nothing left to send: the .part is complete if its size is the file's ("bytes */N")
            announced = (e.headers.get("Content-Range") or "").rpartition("/")[2].strip()
            total = int(announced) if announced.isdigit() else expected_size
            if total == offset:
                return total
            part.unlink()
            raise _Retry(f"HTTP 416 with a .part of {offset} bytes; restarting from 0") from None
        if e.code in RETRY_STATUS:
            raise _Retry(f"HTTP {e.code} {e.reason}") from None
        raise DataError(f"download failed: {url} answered HTTP {e.code} {e.reason}") from None
    except (TimeoutError, urllib.error.URLError, ConnectionError, http.client.HTTPException, OSError) as e:
        raise _Retry(f"{type(e).__name__}: {getattr(e, 'reason', e)}") from None

    with resp:
        status = resp.status
        length = resp.headers.get("Content-Length")
        if status == 206:
            m = _CONTENT_RANGE.search(resp.headers.get("Content-Range", ""))
            if not m or int(m.group(1)) != offset:
                part.unlink(missing_ok=True)
                raise _Retry(f"unexpected Content-Range {resp.headers.get('Content-Range')!r}")
            total = int(m.group(3)) if m.group(3) != "*" else (offset + int(length) if length else -1)
            mode = "ab"
        elif status == 200:
            offset = 0  # the server ignored Range (or we asked for all): start over
            total = int(length) if length is not None else -1
            mode = "wb"
        else:
            raise _Retry(f"unexpected HTTP status {status}")
        written = 0
        try:
            with open(part, mode) as f:
                while True:
                    buf = resp.read1(CHUNK)  # whatever has arrived: progress reaches the .part
                    if not buf:
                        break
                    f.write(buf)
                    written += len(buf)
                f.flush()
                os.fsync(f.fileno())
        except (TimeoutError, ConnectionError, http.client.HTTPException, OSError) as e:
            raise _Retry(f"connection lost after {offset + written} bytes ({type(e).__name__}: {e})") from None
    size = part.stat().st_size
    if total >= 0 and size < total:
        raise _Retry(f"short body: {size} of {total} bytes")
    if total >= 0 and size > total:
        part.unlink()
        raise _Retry(f"got {size} bytes, more than the announced {total}; restarting")
    return total if total >= 0 else size


def download_file(
    url: str,
    dest: Path,
    *,
    expected_size: Optional[int] = None,
    sha256: Optional[str] = None,
    retries: int = 5,
    backoff: float = 2.0,
    timeout: float = 30.0,
    sleep: Callable[[float], None] = time.sleep,
) -> Path:
    """Fetch url into dest (resumable, retried, verified, atomic). An existing dest is kept."""
    dest = Path(dest)
    if dest.exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    last = ""
    for attempt in range(retries):
        try:
            total = _attempt(url, part, timeout, expected_size)
            size = part.stat().st_size
            if expected_size is not None and size != expected_size:
                part.unlink()
                raise _Retry(f"size {size} != expected {expected_size}")
            if total >= 0 and size != total:
                raise _Retry(f"size {size} != Content-Length {total}")
            if sha256 is not None:
                digest = sha256_file(part)
                if digest != sha256.lower():
                    part.unlink()
                    raise _Retry(f"sha256 {digest} != expected {sha256}")
            os.replace(part, dest)
            return dest
        except _Retry as e:
            last = str(e)
            if attempt + 1 < retries:
                sleep(backoff**attempt if backoff > 0 else 0)
    kept = f"; the partial file {part} is kept and the next run resumes it" if part.exists() else ""
    raise DataError(f"download failed after {retries} attempts: {url} ({last}){kept}")


def load_sha256_manifest(path: Optional[str]) -> dict[str, str]:
    """`sha256sum`-style lines (`<hex>  <file name>`) -> {file name: hex}."""
    if not path:
        return {}
    out: dict[str, str] = {}
    for line in Path(path).expanduser().read_text().splitlines():
        parts = line.strip().split()
        if len(parts) >= 2 and not line.lstrip().startswith("#"):
            out[parts[-1].lstrip("*")] = parts[0].lower()
    return out


def download_shards(
    shard_set: RemoteShardSet,
    indices: Sequence[int],
    out_dir: Path,
    *,
    workers: int = 4,
    checksums: Optional[Mapping[str, str]] = None,
    retries: int = 5,
    backoff: float = 2.0,
    timeout: float = 30.0,
    log: Optional[Callable[[str], None]] = None,
) -> list[Path]:
    """Download the given shard indices into out_dir in parallel; existing finished files are kept."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    checksums = checksums or {}
    todo = [i for i in indices if not (out_dir / shard_name(i)).exists()]
    if log and todo:
        log(f"downloading {len(todo)} of {len(indices)} {shard_set.name} shards into {out_dir} with {workers} threads")

    def one(i: int) -> Path:
        name = shard_name(i)
        return download_file(
            shard_set.url(i),
            out_dir / name,
            sha256=checksums.get(name),
            retries=retries,
            backoff=backoff,
            timeout=timeout,
        )

    errors: list[str] = []
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        futures = [pool.submit(one, i) for i in todo]
        for fut in futures:
            try:
                fut.result()
            except DataError as e:
                errors.append(str(e))
    if errors:
        more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
        raise DataError(f"{len(errors)} of {len(todo)} shard downloads failed:\n  " + "\n  ".join(errors[:3]) + more)
    return [out_dir / shard_name(i) for i in indices]
