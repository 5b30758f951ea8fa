"""The shard downloader against a real HTTP server on localhost (no network needed)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from chatlm.config import DataKind, DataSourceConfig, PathsConfig
from chatlm.data import download
from chatlm.data.shards import DataError, list_shards, shard_name, write_shard
from chatlm.data.sources import prepare_source


class Server:
    """Serves `files` (path -> bytes) with Range support; behaviour switches per test:

    mode "ok"       plain files, 206 for Range requests, 416 past the end
    mode "drop"     the first GET of each path sends half the body and closes the connection
    mode "stall"    sends half the body, then hangs (until the test releases it)
    mode "norange"  ignores Range and always answers 200 with the whole file
    """

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.mode = "ok"
        self.requests: list[tuple[str, str | None]] = []  # (path, Range header)
        self.dropped: set[str] = set()
        self.release = threading.Event()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                rng = self.headers.get("Range")
                outer.requests.append((self.path, rng))
                body = outer.files.get(self.path)
                if body is None:
                    self.send_response(404, "Not Found")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                start = 0
                if rng and outer.mode != "norange":
                    start = int(rng.split("=")[1].split("-")[0])
                    if start >= len(body):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(body)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                else:
                    self.send_response(200)
                chunk = body[start:]
                self.send_header("Content-Length", str(len(chunk)))
                self.end_headers()
                if outer.mode == "drop" and self.path not in outer.dropped:
                    outer.dropped.add(self.path)
                    self.wfile.write(chunk[: len(chunk) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                if outer.mode == "stall":
                    self.wfile.write(chunk[: len(chunk) // 2])
                    self.wfile.flush()
                    outer.release.wait(30)
                    self.close_connection = True
                    return
                self.wfile.write(chunk)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def url(self, path: str) -> str:
        return self.base + path

    def close(self):
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = Server()
    yield s
    s.close()


def payload(n: int = 300_000, seed: int = 1) -> bytes:
    out = bytearray()
    h = hashlib.sha256(str(seed).encode()).digest()
    while len(out) < n:
        h = hashlib.sha256(h).digest()
        out += h
    return bytes(out[:n])


def test_plain_download(server, tmp_path):
    server.files["/a.bin"] = data = payload()
    dest = download.download_file(server.url("/a.bin"), tmp_path / "a.bin", retries=1)
    assert dest.read_bytes() == data
    assert not (tmp_path / "a.bin.part").exists()
    # an existing finished file is not fetched again
    n = len(server.requests)
    download.download_file(server.url("/a.bin"), tmp_path / "a.bin")
    assert len(server.requests) == n


def test_resumes_a_part_file_with_a_range_request(server, tmp_path):
    server.files["/a.bin"] = data = payload()
    (tmp_path / "a.bin.part").write_bytes(data[:12345])
    download.download_file(server.url("/a.bin"), tmp_path / "a.bin", retries=1)
    assert (tmp_path / "a.bin").read_bytes() == data
    assert server.requests == [("/a.bin", "bytes=12345-")]


def test_complete_part_file_gets_416_and_is_finished(server, tmp_path):
    server.files["/a.bin"] = data = payload()
    (tmp_path / "a.bin.part").write_bytes(data)
    download.download_file(server.url("/a.bin"), tmp_path / "a.bin", retries=1)
    assert (tmp_path / "a.bin").read_bytes() == data


def test_server_ignoring_range_restarts_from_zero(server, tmp_path):
    server.mode = "norange"
    server.files["/a.bin"] = data = payload()
    (tmp_path / "a.bin.part").write_bytes(b"junk" * 100)
    download.download_file(server.url("/a.bin"), tmp_path / "a.bin", retries=1)
    assert (tmp_path / "a.bin").read_bytes() == data


def test_dropped_connection_is_retried_and_resumed(server, tmp_path):
    server.mode = "drop"
    server.files["/a.bin"] = data = payload()
    sleeps = []
    download.download_file(server.url("/a.bin"), tmp_path / "a.bin", retries=3, backoff=2.0, sleep=sleeps.append)
    assert (tmp_path / "a.bin").read_bytes() == data
    assert len(server.requests) == 2
    assert server.requests[0][1] is None
    resumed_at = int(server.requests[1][1].split("=")[1].rstrip("-"))
    assert 0 < resumed_at < len(data)
    assert sleeps == [1.0]  # backoff ** attempt


def test_404_names_the_url_and_status_without_retrying(server, tmp_path):
    url = server.url("/missing.parquet")
    with pytest.raises(DataError) as e:
        download.download_file(url, tmp_path / "m.parquet", retries=5, sleep=lambda s: None)
    assert url in str(e.value) and "404" in str(e.value)
    assert len(server.requests) == 1
    assert not list(tmp_path.iterdir())


def test_retries_exhausted_keep_the_part_and_say_so(server, tmp_path):
    server.mode = "drop"
    server.files["/a.bin"] = payload()
    server.dropped = set()

    class AlwaysDrop(set):
        def __contains__(self, item):
            return False

    server.dropped = AlwaysDrop()
    with pytest.raises(DataError) as e:
        download.download_file(server.url("/a.bin"), tmp_path / "a.bin", retries=2, sleep=lambda s: None)
    assert "after 2 attempts" in str(e.value) and server.url("/a.bin") in str(e.value)
    assert "resumes" in str(e.value)
    assert not (tmp_path / "a.bin").exists() and (tmp_path / "a.bin.part").exists()


def test_checksum_mismatch_is_never_renamed(server, tmp_path):
    server.files["/a.bin"] = data = payload()
    with pytest.raises(DataError, match="sha256"):
        download.download_file(
            server.url("/a.bin"), tmp_path / "a.bin", sha256="0" * 64, retries=2, sleep=lambda s: None
        )
    assert not (tmp_path / "a.bin").exists()
    good = hashlib.sha256(data).hexdigest()
    download.download_file(server.url("/a.bin"), tmp_path / "a.bin", sha256=good, retries=1)
    assert (tmp_path / "a.bin").read_bytes() == data


def test_size_mismatch(server, tmp_path):
    server.files["/a.bin"] = payload(1000)
    with pytest.raises(DataError, match="expected 999"):
        download.download_file(server.url("/a.bin"), tmp_path / "a.bin", expected_size=999, retries=1)
    assert not (tmp_path / "a.bin").exists()


def test_killed_download_leaves_only_a_part_that_is_resumed(server, tmp_path):
    server.mode = "stall"
    server.files["/big.bin"] = data = payload(2_000_000)
    dest = tmp_path / "big.bin"
    part = tmp_path / "big.bin.part"
    code = (
        "import sys; from chatlm.data.download import download_file; "
        "download_file(sys.argv[1], sys.argv[2], retries=1, timeout=60)"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, server.url("/big.bin"), str(dest)],
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "src")},
    )
    try:
        deadline = time.monotonic() + 30
        while not (part.exists() and part.stat().st_size > 0):
            assert time.monotonic() < deadline, "the download never started writing"
            assert proc.poll() is None
            time.sleep(0.02)
        proc.kill()
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not dest.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["big.bin.part"]
    have = part.stat().st_size
    assert 0 < have < len(data)
    server.mode = "ok"
    server.requests.clear()
    download.download_file(server.url("/big.bin"), dest, retries=1)
    assert dest.read_bytes() == data and not part.exists()
    assert server.requests == [("/big.bin", f"bytes={have}-")]


def make_shard_bytes(tmp_path: Path, i: int) -> bytes:
    p = write_shard([f"document {i}-{j}" for j in range(30)], tmp_path / "src" / shard_name(i), 10)
    return p.read_bytes()


def test_prepare_source_downloads_train_and_val_shards(server, tmp_path):
    for i in (0, 1, 2, 6542):
        server.files[f"/mirror/{shard_name(i)}"] = make_shard_bytes(tmp_path, i)
    sums = tmp_path / "SHA256SUMS"
    sums.write_text(
        "".join(f"{hashlib.sha256(b).hexdigest()}  {p.rsplit('/', 1)[1]}\n" for p, b in server.files.items())
    )
    cfg = DataSourceConfig(
        kind=DataKind.climbmix,
        url=server.url("/mirror"),
        num_shards=2,
        sha256_manifest=str(sums),
        download_workers=3,
        wait_timeout_s=30,
    )
    paths = PathsConfig(data_dir=str(tmp_path / "data"))
    got = {}
    follower = threading.Thread(target=lambda: got.update(d=prepare_source(cfg, paths, rank_is_main=False)))
    follower.start()
    out = prepare_source(cfg, paths, rank_is_main=True)
    follower.join(30)
    assert got["d"] == out == (tmp_path / "data" / "climbmix").resolve()
    train, val = list_shards(out)
    assert [p.name for p in train] == [shard_name(0), shard_name(1)] and val.name == shard_name(6542)
    assert pq.read_table(val).column("text").to_pylist()[0] == "document 6542-0"
    assert sorted(p for p, _ in server.requests) == [f"/mirror/{shard_name(i)}" for i in (0, 1, 6542)]
    assert not list(out.glob("*.part"))
    # again: nothing is downloaded
    n = len(server.requests)
    prepare_source(cfg, paths, rank_is_main=True)
    assert len(server.requests) == n


def test_prepare_source_reports_a_missing_shard(server, tmp_path):
    server.files[f"/m/{shard_name(0)}"] = make_shard_bytes(tmp_path, 0)
    cfg = DataSourceConfig(kind=DataKind.fineweb_edu, url=server.url("/m/shard_{i:05d}.parquet"), num_shards=1)
    with pytest.raises(DataError) as e:
        prepare_source(cfg, PathsConfig(data_dir=str(tmp_path / "data")), rank_is_main=True)
    assert "404" in str(e.value) and server.url(f"/m/{shard_name(1822)}") in str(e.value)


def test_default_urls_are_nanochats():
    cm, fw = download.REMOTE_SETS["climbmix"], download.REMOTE_SETS["fineweb_edu"]
    assert cm.url(7) == (
        "https://huggingface.co/datasets/karpathy/climbmix-400b-shuffle/resolve/main/shard_00007.parquet"
    )
    assert cm.total_shards == 6543 and cm.indices(2) == [0, 1, 6542] and len(cm.indices(-1)) == 6543
    assert fw.url(0).endswith("karpathy/fineweb-edu-100b-shuffle/resolve/main/shard_00000.parquet")
    assert fw.indices(3) == [0, 1, 2, 1822]
    assert download.url_pattern_from("http://x/y/").format(i=3) == "http://x/y/shard_00003.parquet"
