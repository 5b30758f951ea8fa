"""Parquet shard I/O in nanochat's layout.

A shard set is a directory of `shard_00000.parquet`, `shard_00001.parquet`, ... Each file has one
string column `text` (one document per row), row groups of about 1,000 documents and zstd
compression. The last file in sorted order is the validation shard; all others are training
shards. That is exactly the layout of nanochat's ClimbMix / FineWeb-EDU shards, so the same
reader serves the embedded corpus, the offline registry corpus and the downloaded web corpora.

Distributed reading follows nanochat (spec §4.2): every rank walks the training files in order
and, inside each file, reads row groups `rank, rank + W, rank + 2W, ...`. No coordination is
needed and the ranks' row groups are disjoint and together cover every row group.
"""

from __future__ import annotations

import os
import re
import uuid
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence, Union

import pyarrow as pa
import pyarrow.parquet as pq

from chatlm.errors import ChatlmError

SHARD_RE = re.compile(r"^shard_(\d{5,})\.parquet$")
TEXT_COLUMN = "text"

PathLike = Union[str, os.PathLike]


class DataError(ChatlmError, RuntimeError):
    """A data problem the user can fix; the message names the file and what to do."""


def shard_name(index: int) -> str:
    return f"shard_{index:05d}.parquet"


# ----------------------------------------------------------------------------------------------
# writing


def write_shard(
    texts: Sequence[str], path: PathLike, docs_per_row_group: int = 1000, compression_level: int = 3
) -> Path:
    """Write one shard atomically: to a hidden temp file in the same directory, then rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    table = pa.table({TEXT_COLUMN: pa.array(list(texts), type=pa.string())})
    try:
        pq.write_table(
            table,
            tmp,
            row_group_size=max(1, docs_per_row_group),
            compression="zstd",
            compression_level=compression_level,
            use_dictionary=False,
            write_statistics=False,
        )
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def write_shards(
    docs_iter: Iterable[str],
    out_dir: PathLike,
    docs_per_row_group: int = 1000,
    row_groups_per_shard: int = 100,
    first_index: int = 0,
) -> list[Path]:
    """Write documents into consecutive shards `shard_{first_index:05d}.parquet`, ...

    Every shard holds `docs_per_row_group * row_groups_per_shard` documents except the last,
    which holds the rest. Each shard is written atomically; the caller decides which shard is
    validation (by convention the last one in sorted order, see `list_shards`).
    """
    if docs_per_row_group < 1 or row_groups_per_shard < 1:
        raise ValueError("docs_per_row_group and row_groups_per_shard must be >= 1")
    out_dir = Path(out_dir)
    per_shard = docs_per_row_group * row_groups_per_shard
    paths: list[Path] = []
    buf: list[str] = []
    for doc in docs_iter:
        buf.append(doc)
        if len(buf) == per_shard:
            paths.append(write_shard(buf, out_dir / shard_name(first_index + len(paths)), docs_per_row_group))
            buf = []
    if buf:
        paths.append(write_shard(buf, out_dir / shard_name(first_index + len(paths)), docs_per_row_group))
    return paths


# ----------------------------------------------------------------------------------------------
# listing and validation


def list_shards(directory: PathLike, how_to_build: str = "") -> tuple[list[Path], Path]:
    """(train files, val file) of a shard directory; the last shard in sorted order is val.

    Raises DataError naming the directory (and `how_to_build`, the command that makes it) when
    the directory is missing or holds fewer than two shards.
    """
    directory = Path(directory).expanduser()
    hint = f" Build it with: {how_to_build}" if how_to_build else ""
    if not directory.is_dir():
        raise DataError(f"shard directory {directory} does not exist.{hint}")
    files = sorted(p for p in directory.iterdir() if SHARD_RE.match(p.name) and p.is_file())
    if not files:
        raise DataError(f"shard directory {directory} has no shard_NNNNN.parquet files.{hint}")
    if len(files) < 2:
        raise DataError(
            f"shard directory {directory} has only {files[0].name}: at least one training "
            f"shard plus the validation shard (the last one) are needed.{hint}"
        )
    return files[:-1], files[-1]


def open_shard(path: PathLike) -> pq.ParquetFile:
    """Open a shard, turning pyarrow's errors into DataError messages that say what to do."""
    path = Path(path)
    try:
        pf = pq.ParquetFile(path)
    except FileNotFoundError:
        raise DataError(f"shard {path} is missing; rebuild or re-download the shard set") from None
    except (pa.ArrowInvalid, pa.ArrowIOError, OSError) as e:
        raise DataError(f"shard {path} is corrupt or truncated ({e}); delete it and rebuild or re-download it") from e
    if TEXT_COLUMN not in pf.schema_arrow.names:
        raise DataError(
            f"shard {path} has no '{TEXT_COLUMN}' column (columns: {pf.schema_arrow.names}); "
            f"pretraining shards need one string column named '{TEXT_COLUMN}'"
        )
    return pf


def read_row_group(pf: pq.ParquetFile, rg: int, path: PathLike = "?") -> list[str]:
    try:
        table = pf.read_row_group(rg, columns=[TEXT_COLUMN])
    except (pa.ArrowInvalid, pa.ArrowIOError, OSError) as e:
        raise DataError(
            f"shard {path}: row group {rg} cannot be read ({e}); the file is corrupt or "
            f"truncated: delete it and rebuild or re-download it"
        ) from e
    return table.column(0).to_pylist()


def validate_shards(directory: PathLike, how_to_build: str = "") -> tuple[list[Path], Path]:
    """`list_shards` plus opening every file (footer and schema): cheap, catches truncation."""
    train, val = list_shards(directory, how_to_build)
    for p in [*train, val]:
        open_shard(p)
    return train, val


def count_documents(files: Iterable[PathLike]) -> int:
    return sum(open_shard(p).metadata.num_rows for p in files)


# ----------------------------------------------------------------------------------------------
# reading


def iter_row_groups(
    files: Sequence[PathLike], rank: int = 0, world_size: int = 1, start: Optional[tuple[int, int]] = None
) -> Iterator[tuple[list[str], tuple[int, int]]]:
    """Yield (texts, (file_idx, rg_idx)) for this rank's row groups, one pass over `files`.

    Rank r reads row groups r, r+W, r+2W, ... of every file in order (nanochat §4.2). `start`
    is a position this rank already consumed, e.g. the last one it yielded before a checkpoint:
    reading resumes at the rank's next row group after it (on that file; the next file if that
    file is exhausted), so nothing is read twice and nothing is skipped.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    first_file, first_rg = 0, rank
    if start is not None:
        sf, srg = start
        first_file = sf
        first_rg = (srg // world_size + 1) * world_size + rank
    for file_idx in range(first_file, len(files)):
        path = files[file_idx]
        pf = open_shard(path)
        rg = first_rg if file_idx == first_file else rank
        while rg < pf.num_row_groups:
            yield read_row_group(pf, rg, path), (file_idx, rg)
            rg += world_size


def iter_documents(files: Sequence[PathLike], rank: int = 0, world_size: int = 1) -> Iterator[str]:
    """Every document of this rank's row groups, in order (one pass)."""
    for texts, _ in iter_row_groups(files, rank, world_size):
        yield from texts
