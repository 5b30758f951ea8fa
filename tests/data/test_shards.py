"""Parquet shard I/O: layout, rank-sharded reading, resume, and the errors users see."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from chatlm.data.shards import (
    DataError,
    iter_documents,
    iter_row_groups,
    list_shards,
    open_shard,
    validate_shards,
    write_shards,
)


def docs(n: int, prefix: str = "doc") -> list[str]:
    return [f"{prefix} {i} " + "word " * (i % 7) for i in range(n)]


@pytest.fixture
def shard_dir(tmp_path):
    # 3 train shards of 5 row groups x 10 docs, then a val shard of 2 row groups
    out = tmp_path / "shards"
    train = write_shards(docs(150), out, docs_per_row_group=10, row_groups_per_shard=5)
    write_shards(docs(20, "val"), out, docs_per_row_group=10, row_groups_per_shard=100, first_index=len(train))
    return out


def test_layout(shard_dir):
    train, val = list_shards(shard_dir)
    assert [p.name for p in train] == ["shard_00000.parquet", "shard_00001.parquet", "shard_00002.parquet"]
    assert val.name == "shard_00003.parquet"
    for p in train:
        md = pq.ParquetFile(p).metadata
        assert md.num_row_groups == 5
        assert [md.row_group(i).num_rows for i in range(5)] == [10] * 5
        assert md.row_group(0).column(0).compression == "ZSTD"
        assert pq.ParquetFile(p).schema_arrow.names == ["text"]
    assert pq.read_table(val).column("text").to_pylist() == docs(20, "val")
    # no temp files left behind
    assert sorted(p.name for p in shard_dir.iterdir()) == [f"shard_0000{i}.parquet" for i in range(4)]


def test_last_shard_holds_the_remainder(tmp_path):
    files = write_shards(docs(25), tmp_path, docs_per_row_group=4, row_groups_per_shard=2)
    assert [pq.ParquetFile(f).metadata.num_rows for f in files] == [8, 8, 8, 1]


def test_one_rank_reads_everything_in_order(shard_dir):
    train, _ = list_shards(shard_dir)
    assert list(iter_documents(train)) == docs(150)


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_are_disjoint_and_cover_all(shard_dir, world):
    train, _ = list_shards(shard_dir)
    seen = [list(iter_row_groups(train, rank, world)) for rank in range(world)]
    positions = [pos for per_rank in seen for _, pos in per_rank]
    assert len(positions) == len(set(positions)) == 15
    for rank, per_rank in enumerate(seen):
        assert all(rg % world == rank for _, (_, rg) in per_rank)
    texts = sorted(t for per_rank in seen for texts, _ in per_rank for t in texts)
    assert texts == sorted(docs(150))


@pytest.mark.parametrize("world,rank,cut", [(1, 0, 3), (2, 0, 2), (2, 1, 4), (2, 1, 6), (3, 2, 1)])
def test_resume_continues_exactly_after_the_recorded_position(shard_dir, world, rank, cut):
    train, _ = list_shards(shard_dir)
    full = list(iter_row_groups(train, rank, world))
    _, last = full[cut - 1]  # consumed up to and including this position, then "crashed"
    resumed = list(iter_row_groups(train, rank, world, start=last))
    assert [p for _, p in resumed] == [p for _, p in full[cut:]]
    assert [t for t, _ in resumed] == [t for t, _ in full[cut:]]


def test_resume_at_the_end_of_a_file_moves_to_the_next(shard_dir):
    train, _ = list_shards(shard_dir)
    resumed = list(iter_row_groups(train, 0, 2, start=(0, 4)))
    assert resumed[0][1] == (1, 0)


def test_bad_rank():
    with pytest.raises(ValueError):
        list(iter_row_groups([], 2, 2))


def test_missing_directory_names_the_build_command(tmp_path):
    with pytest.raises(DataError) as e:
        list_shards(tmp_path / "nope", how_to_build="python launch/fetch_offline_corpus.py")
    assert str(tmp_path / "nope") in str(e.value)
    assert "does not exist" in str(e.value)
    assert "python launch/fetch_offline_corpus.py" in str(e.value)


def test_empty_directory(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(DataError, match="no shard_NNNNN.parquet files.*Build it with: make-it"):
        list_shards(tmp_path, how_to_build="make-it")


def test_a_single_shard_is_not_enough(tmp_path):
    write_shards(docs(5), tmp_path, 5, 1)
    with pytest.raises(DataError, match="only shard_00000.parquet"):
        list_shards(tmp_path)


def test_truncated_shard_is_reported_with_its_path(shard_dir):
    train, _ = list_shards(shard_dir)
    victim = train[1]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError) as e:
        list(iter_documents(train))
    msg = str(e.value)
    assert str(victim) in msg and "corrupt or truncated" in msg and "delete it" in msg
    with pytest.raises(DataError, match="shard_00001.parquet"):
        validate_shards(shard_dir)


def test_garbage_shard(tmp_path):
    bad = tmp_path / "shard_00000.parquet"
    bad.write_bytes(b"not parquet at all" * 10)
    with pytest.raises(DataError, match="corrupt or truncated"):
        open_shard(bad)


def test_shard_without_text_column(tmp_path):
    bad = tmp_path / "shard_00000.parquet"
    pq.write_table(pa.table({"content": ["a", "b"]}), bad)
    with pytest.raises(DataError) as e:
        open_shard(bad)
    assert "no 'text' column" in str(e.value) and "content" in str(e.value) and str(bad) in str(e.value)
