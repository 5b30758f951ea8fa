"""Put tiktoken's `r50k_base` (GPT-2) and `cl100k_base` (GPT-4) vocab files into a tiktoken cache
directory, from PyPI packages that ship them (no access to openaipublic.blob.core.windows.net).

    python launch/fetch_reference_vocabs.py [--cache-dir ~/.cache/chatlm/tiktoken] [--pip "python -m pip"]
    export TIKTOKEN_CACHE_DIR=~/.cache/chatlm/tiktoken     # the line the script prints

| encoding | package (PyPI) | file in the archive |
|---|---|---|
| `cl100k_base` | `litellm==1.109.1` (wheel, 41 MB) | `litellm/litellm_core_utils/tokenizers/9b5ad71b2ce5302211f9c61530b329a4922fc6a4` |
| `r50k_base` | `openai-whisper==20250625` (sdist, 0.8 MB) | `whisper/assets/gpt2.tiktoken` |

Each package is fetched with `pip download --no-deps` into a temporary directory (nothing is
installed), the file is read straight out of the wheel or sdist, its sha256 is checked against the
hash `chatlm.tokenizer.bpe.reference_encoding` (and tiktoken) expect, and it is written atomically
under the name tiktoken's cache uses: sha1 of the encoding's URL. Files already in the cache with the
right hash are kept and their package is not downloaded. With TIKTOKEN_CACHE_DIR exported,
`tiktoken.get_encoding("r50k_base")` / `("cl100k_base")` and `reference_encoding(...)` work offline.
See docs/data.md and /work/shared/reference/data_sources.md §4.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shlex
import subprocess
import sys
import tarfile
import tempfile
import uuid
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

from chatlm.tokenizer.bpe import _REFERENCE_FILES  # noqa: E402

DEFAULT_CACHE = "~/.cache/chatlm/tiktoken"


@dataclass(frozen=True)
class VocabSource:
    encoding: str  # tiktoken's name, a key of _REFERENCE_FILES
    requirement: str  # what `pip download` gets
    member: str  # path of the file inside the package (after the sdist's top folder)


SOURCES = (
    VocabSource("r50k_base", "openai-whisper==20250625", "whisper/assets/gpt2.tiktoken"),
    VocabSource(
        "cl100k_base",
        "litellm==1.109.1",
        "litellm/litellm_core_utils/tokenizers/9b5ad71b2ce5302211f9c61530b329a4922fc6a4",
    ),
)


class VocabError(RuntimeError):
    pass


def cache_name(url: str) -> str:
    """The file name tiktoken's cache uses for `url` (tiktoken.load.read_file_cached)."""
    return hashlib.sha1(url.encode()).hexdigest()


def read_member(archive: Path, member: str) -> Optional[bytes]:
    """The bytes of `member` in a wheel/zip or an sdist tarball, or None if it is not there.
    An sdist puts everything under `<name>-<version>/`, so any one leading folder is accepted."""
    archive = Path(archive)
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            for name in zf.namelist():
                if name == member or name.split("/", 1)[-1] == member:
                    return zf.read(name)
        return None
    if tarfile.is_tarfile(archive):
        with tarfile.open(archive) as tf:
            for info in tf:
                if info.isfile() and (info.name == member or info.name.split("/", 1)[-1] == member):
                    f = tf.extractfile(info)
                    return f.read() if f is not None else None
        return None
    raise VocabError(f"{archive} is neither a wheel/zip nor a tar archive")


def is_cached(encoding: str, cache_dir: Path, reference_files: Mapping = _REFERENCE_FILES) -> bool:
    url, sha256 = reference_files[encoding]
    path = Path(cache_dir) / cache_name(url)
    return path.is_file() and hashlib.sha256(path.read_bytes()).hexdigest() == sha256


def install_vocab(
    data: bytes, encoding: str, cache_dir: Path, origin: str = "?", reference_files: Mapping = _REFERENCE_FILES
) -> Path:
    """Check `data` against the expected sha256 and write it atomically into the cache."""
    url, sha256 = reference_files[encoding]
    got = hashlib.sha256(data).hexdigest()
    if got != sha256:
        raise VocabError(
            f"{encoding} from {origin} has sha256 {got}, expected {sha256}: the package does "
            f"not ship the file tiktoken expects (another version?); nothing was written"
        )
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    path = cache_dir / cache_name(url)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def extract_vocab(
    archives: list[Path], source: VocabSource, cache_dir: Path, reference_files: Mapping = _REFERENCE_FILES
) -> Path:
    """Find `source.member` in one of `archives`, verify it and install it into `cache_dir`."""
    for archive in archives:
        data = read_member(archive, source.member)
        if data is not None:
            return install_vocab(
                data,
                source.encoding,
                cache_dir,
                origin=f"{Path(archive).name}:{source.member}",
                reference_files=reference_files,
            )
    raise VocabError(
        f"none of {[Path(a).name for a in archives]} contains {source.member} (needed for {source.encoding})"
    )


def pip_download(requirement: str, dest: Path, pip: list[str]) -> list[Path]:
    dest.mkdir(parents=True, exist_ok=True)
    before = set(dest.iterdir())
    cmd = [*pip, "download", "--no-deps", "--dest", str(dest), requirement]
    print(f"$ {shlex.join(cmd)}", flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise VocabError(f"pip download {requirement} failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
    new = sorted(set(dest.iterdir()) - before)
    return new or sorted(dest.iterdir())


def fetch(cache_dir: Path, pip: list[str], sources=SOURCES, force: bool = False) -> dict[str, Path]:
    out = {}
    with tempfile.TemporaryDirectory(prefix="chatlm-vocabs-") as tmp:
        for source in sources:
            url, _ = _REFERENCE_FILES[source.encoding]
            if not force and is_cached(source.encoding, cache_dir):
                out[source.encoding] = Path(cache_dir) / cache_name(url)
                print(f"{source.encoding}: already in {cache_dir} with the right sha256", flush=True)
                continue
            archives = pip_download(source.requirement, Path(tmp) / source.encoding, pip)
            out[source.encoding] = extract_vocab(archives, source, cache_dir)
            print(
                f"{source.encoding}: {source.requirement}:{source.member} -> {out[source.encoding]} (sha256 verified)",
                flush=True,
            )
    return out


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache-dir", default=DEFAULT_CACHE, help=f"tiktoken cache directory (default {DEFAULT_CACHE})")
    p.add_argument("--pip", default=f"{sys.executable} -m pip", help="the pip command to download with")
    p.add_argument("--force", action="store_true", help="download again even if the cache is complete")
    args = p.parse_args(argv)
    cache_dir = Path(os.path.expanduser(args.cache_dir)).absolute()
    try:
        fetch(cache_dir, shlex.split(args.pip), force=args.force)
    except VocabError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    # check that tiktoken itself loads them from there, offline
    os.environ["TIKTOKEN_CACHE_DIR"] = str(cache_dir)
    from chatlm.tokenizer import reference_encoding

    for source in SOURCES:
        enc = reference_encoding(source.encoding)
        if enc is None:
            print(f"error: tiktoken could not load {source.encoding} from {cache_dir}", file=sys.stderr)
            return 1
        print(f"{source.encoding}: loads in tiktoken, {enc.n_vocab} tokens", flush=True)
    print(f"\nexport TIKTOKEN_CACHE_DIR={shlex.quote(str(cache_dir))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
