"""Byte-level BPE: trained with rustbpe, run with tiktoken, saved as a tiktoken ranks file.

Why two libraries: rustbpe trains fast (parallel pair counting in Rust) but its encoder is not
tuned for throughput; tiktoken encodes fast (and in parallel for batches) but cannot train. The
trained merges are a plain `{token bytes: rank}` table, which both understand, so we train with one
and wrap the table in a `tiktoken.Encoding` for everything else.

Layout of the vocabulary: ids `0 .. n-1` are the n mergeable ranks (the 256 single bytes first),
then the special tokens in config order, so `<|bos|>` has id `n` and the vocabulary is contiguous.

On disk (`Tokenizer.save`) a tokenizer is three files in one directory:

* `tokenizer.tiktoken`: tiktoken's own ranks format (`base64(token) rank` per line), readable
  with `tiktoken.load.load_tiktoken_bpe`;
* `tokenizer.json`: split pattern, special tokens with their ids, name and training provenance;
* `token_bytes.npy`: int32 byte length of every token id (0 for specials), used by bits-per-byte.

No pickles: the artifact is inspectable and does not depend on the tiktoken version.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional, Sequence, Union

import numpy as np
import tiktoken

from chatlm.config import TokenizerConfig
from chatlm.errors import ChatlmError

RANKS_FILE = "tokenizer.tiktoken"
META_FILE = "tokenizer.json"
TOKEN_BYTES_FILE = "token_bytes.npy"
FORMAT_VERSION = 1
CREATE_COMMAND = "python -m chatlm.tokenize"

TokenRef = Union[str, int]


def tokenizer_dir(tokenizer_cfg: TokenizerConfig, paths_cfg: Any) -> Path:
    """Where the tokenizer named `tokenizer_cfg.name` lives: `<paths.tokenizer_dir>/<name>`, unless
    `tokenizer.dir` says otherwise."""
    base = tokenizer_cfg.dir or os.path.join(paths_cfg.tokenizer_dir, tokenizer_cfg.name)
    return Path(os.path.expanduser(base)).absolute()


class TokenizerMissing(ChatlmError, FileNotFoundError):
    """No tokenizer where one was expected; the message names the command that creates it."""


# ----------------------------------------------------------------------------------------------
# the tokenizer


class Tokenizer:
    """A trained BPE (mergeable ranks + split pattern + special tokens) behind a tiktoken Encoding.

    Plain-text encoding is always *ordinary*: a string such as "<|bos|>" inside user text is
    encoded as the characters it is made of, never as the special token. Special tokens only enter
    a sequence through `prepend`/`append`, `encode_special` or the chat renderer, so untrusted text
    cannot forge conversation structure.
    """

    def __init__(
        self,
        mergeable_ranks: Mapping[bytes, int],
        pattern: str,
        special_tokens: Sequence[str],
        name: str = "rustbpe",
        meta: Optional[dict] = None,
    ):
        ranks = dict(mergeable_ranks)
        n = len(ranks)
        if sorted(ranks.values()) != list(range(n)):
            raise ValueError("mergeable ranks must be exactly the ids 0..n-1")
        if len(set(special_tokens)) != len(special_tokens):
            raise ValueError(f"duplicate special tokens in {list(special_tokens)}")
        self.name = name
        self.pattern = pattern
        self.mergeable_ranks = ranks
        self.special_tokens = {tok: n + i for i, tok in enumerate(special_tokens)}
        self.meta = dict(meta or {})
        self.enc = tiktoken.Encoding(
            name,
            pat_str=pattern,
            mergeable_ranks=ranks,
            special_tokens=self.special_tokens,
            explicit_n_vocab=n + len(self.special_tokens),
        )
        self._token_bytes: Optional[np.ndarray] = None
        self._fingerprint: Optional[str] = None

    # -- vocabulary ------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Mergeable ranks + special tokens (the model's embedding table needs at least this)."""
        return self.enc.n_vocab

    @property
    def n_mergeable(self) -> int:
        return len(self.mergeable_ranks)

    @property
    def bos_id(self) -> int:
        return self.encode_special("<|bos|>")

    def encode_special(self, name: str) -> int:
        """Id of a special token by its string, e.g. `encode_special("<|user_start|>")`."""
        try:
            return self.special_tokens[name]
        except KeyError:
            raise KeyError(f"unknown special token {name!r}; known: {list(self.special_tokens)}") from None

    def is_special(self, token_id: int) -> bool:
        return token_id >= self.n_mergeable

    @property
    def token_bytes(self) -> np.ndarray:
        """int32 array: how many raw bytes each token id stands for; 0 for special tokens.

        Bits-per-byte divides the summed loss by these lengths, so they must be exact. They are
        taken from the raw mergeable bytes, not from `len(decode([id]).encode())`: a token that is
        only part of a multi-byte UTF-8 character decodes to U+FFFD (3 bytes) and would be
        mis-sized that way. Special tokens count 0 so they drop out of bpb entirely.
        """
        if self._token_bytes is None:
            lengths = np.zeros(self.vocab_size, dtype=np.int32)
            for token, rank in self.mergeable_ranks.items():
                lengths[rank] = len(token)
            self._token_bytes = lengths
        return self._token_bytes

    def token_bytes_tensor(self, device: Any = "cpu"):
        """`token_bytes` as a torch int32 tensor (torch is imported only here)."""
        import torch

        return torch.from_numpy(self.token_bytes.copy()).to(device)

    # -- encode / decode ---------------------------------------------------------------------------

    def _resolve(self, ref: Optional[TokenRef]) -> Optional[int]:
        if ref is None:
            return None
        if isinstance(ref, str):
            return self.encode_special(ref)
        ref = int(ref)
        if not 0 <= ref < self.vocab_size:
            raise ValueError(f"token id {ref} outside the vocabulary [0, {self.vocab_size})")
        return ref

    def encode(
        self,
        text: Union[str, Sequence[str]],
        prepend: Optional[TokenRef] = None,
        append: Optional[TokenRef] = None,
        num_threads: int = 8,
    ):
        """Encode one string (-> list[int]) or a list of strings (-> list[list[int]], in parallel).

        `prepend`/`append` take a special token string or an id; pretraining prepends BOS to every
        document so each one can start a packed row.
        """
        first, last = self._resolve(prepend), self._resolve(append)
        if isinstance(text, str):
            rows = [self.enc.encode_ordinary(text)]
        elif isinstance(text, (list, tuple)):
            rows = self.enc.encode_ordinary_batch(list(text), num_threads=num_threads)
        else:
            raise TypeError(f"encode takes a str or a list of str, got {type(text).__name__}")
        if first is not None:
            rows = [[first] + row for row in rows]
        if last is not None:
            for row in rows:
                row.append(last)
        return rows[0] if isinstance(text, str) else rows

    def __call__(self, *args, **kwargs):
        return self.encode(*args, **kwargs)

    @staticmethod
    def _as_list(ids) -> list[int]:
        return ids.tolist() if hasattr(ids, "tolist") else [int(i) for i in ids]

    def decode(self, ids) -> str:
        """Ids -> text. Invalid UTF-8 (e.g. a cut multi-byte character) becomes U+FFFD."""
        return self.enc.decode(self._as_list(ids))

    def decode_bytes(self, ids) -> bytes:
        """Ids -> the exact bytes (special tokens as their UTF-8 strings)."""
        return self.enc.decode_bytes(self._as_list(ids))

    def id_to_token(self, token_id: int) -> bytes:
        return self.enc.decode_single_token_bytes(int(token_id))

    # -- identity ----------------------------------------------------------------------------------

    def _ranks_text(self) -> str:
        return "".join(
            f"{base64.b64encode(tok).decode('ascii')} {rank}\n"
            for tok, rank in sorted(self.mergeable_ranks.items(), key=lambda kv: kv[1])
        )

    @property
    def fingerprint(self) -> str:
        """sha256 over the merges, the split pattern and the special tokens: two tokenizers with the
        same fingerprint map every text to the same ids. Checkpoints record it (`identity`)."""
        if self._fingerprint is None:
            ranks = hashlib.sha256(self._ranks_text().encode("ascii")).hexdigest()
            blob = json.dumps(
                {"ranks_sha256": ranks, "pattern": self.pattern, "special_tokens": self.special_tokens}, sort_keys=True
            )
            self._fingerprint = hashlib.sha256(blob.encode()).hexdigest()
        return self._fingerprint

    def identity(self) -> dict:
        """What a checkpoint records about the tokenizer it was trained with."""
        return {"name": self.name, "vocab_size": self.vocab_size, "sha256": self.fingerprint}

    # -- persistence -------------------------------------------------------------------------------

    def save(self, directory: Union[str, os.PathLike]) -> Path:
        """Write the tokenizer artifact into `directory` (created if needed); returns the path.

        Each file is written to a temporary name and renamed, so a crash never leaves a half
        written tokenizer that a later run would load.
        """
        out = Path(directory).expanduser()
        out.mkdir(parents=True, exist_ok=True)
        ranks_text = self._ranks_text()
        meta = {
            "format": "chatlm-tokenizer",
            "version": FORMAT_VERSION,
            "name": self.name,
            "pattern": self.pattern,
            "n_mergeable": self.n_mergeable,
            "vocab_size": self.vocab_size,
            "special_tokens": self.special_tokens,
            "ranks_sha256": hashlib.sha256(ranks_text.encode("ascii")).hexdigest(),
            "meta": self.meta,
        }
        _atomic_write(out / RANKS_FILE, ranks_text.encode("ascii"))
        _atomic_write(out / META_FILE, (json.dumps(meta, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))
        tmp = out / (TOKEN_BYTES_FILE + ".tmp.npy")
        np.save(tmp, self.token_bytes)
        os.replace(tmp, out / TOKEN_BYTES_FILE)
        return out

    @classmethod
    def load(cls, directory: Union[str, os.PathLike]) -> Tokenizer:
        """Load a tokenizer written by `save`. A missing artifact names the command that makes it."""
        src = Path(directory).expanduser()
        missing = [f for f in (RANKS_FILE, META_FILE) if not (src / f).is_file()]
        if missing:
            raise TokenizerMissing(
                f"no tokenizer at {src} (missing {', '.join(missing)}); "
                f"train one first with `{CREATE_COMMAND}` (it writes this directory)"
            )
        meta = json.loads((src / META_FILE).read_text(encoding="utf-8"))
        if meta.get("format") != "chatlm-tokenizer" or meta.get("version") != FORMAT_VERSION:
            raise ValueError(f"{src / META_FILE}: not a chatlm tokenizer of format version {FORMAT_VERSION}")
        ranks = read_tiktoken_ranks(src / RANKS_FILE)
        specials = sorted(meta["special_tokens"].items(), key=lambda kv: kv[1])
        if [i for _, i in specials] != list(range(len(ranks), len(ranks) + len(specials))):
            raise ValueError(f"{src / META_FILE}: special token ids must follow the {len(ranks)} ranks")
        tok = cls(
            ranks, meta["pattern"], [s for s, _ in specials], name=meta.get("name", "rustbpe"), meta=meta.get("meta")
        )
        tb_path = src / TOKEN_BYTES_FILE
        if tb_path.is_file() and not np.array_equal(np.load(tb_path), tok.token_bytes):
            raise ValueError(f"{tb_path} does not match {src / RANKS_FILE}; re-run `{CREATE_COMMAND}`")
        return tok

    def __repr__(self) -> str:
        return (
            f"Tokenizer(name={self.name!r}, vocab_size={self.vocab_size}, "
            f"n_mergeable={self.n_mergeable}, bos_id={self.bos_id})"
        )


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def read_tiktoken_ranks(path: Union[str, os.PathLike]) -> dict[bytes, int]:
    """Parse a tiktoken ranks file. (tiktoken's own loader caches by path in a temp dir, which
    would serve a stale copy after a tokenizer is re-trained in place, so we read it ourselves.)"""
    ranks: dict[bytes, int] = {}
    for lineno, line in enumerate(Path(path).read_bytes().splitlines(), 1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except Exception as e:  # noqa: BLE001 - report which line is broken
            raise ValueError(f"{path}:{lineno}: malformed ranks line {line[:80]!r}") from e
    return ranks


# ----------------------------------------------------------------------------------------------
# training


class CappedTexts:
    """Iterate texts with each document cut to `doc_cap` chars and `max_chars` chars in total.

    The cap per document keeps one giant document (a data dump, a log file) from dominating the
    pair statistics; the total cap bounds training time. Counts what it let through, for the
    training provenance stored next to the tokenizer.
    """

    def __init__(self, texts: Iterable[str], max_chars: int, doc_cap: int):
        self.texts, self.max_chars, self.doc_cap = texts, max_chars, doc_cap
        self.docs = 0
        self.chars = 0

    def __iter__(self) -> Iterator[str]:
        texts = iter(self.texts)
        while self.chars < self.max_chars:  # check before pulling: never read past the budget
            try:
                text = next(texts)
            except StopIteration:
                return
            text = text[: min(self.doc_cap, self.max_chars - self.chars)]
            self.docs += 1
            self.chars += len(text)
            yield text


def train_rustbpe(texts: Iterable[str], n_ranks: int, pattern: str):
    """Train rustbpe's trainer to `n_ranks` mergeable ranks (256 bytes + merges) and return it."""
    import rustbpe

    if n_ranks < 256:
        raise ValueError(f"need at least the 256 byte tokens, asked for {n_ranks} mergeable ranks")
    trainer = rustbpe.Tokenizer()
    trainer.train_from_iterator(iter(texts), n_ranks, pattern=pattern)
    return trainer


def train_tokenizer(texts: Iterable[str], cfg: TokenizerConfig) -> Tokenizer:
    """Train a tokenizer with `cfg.vocab_size` ids in total: the special tokens take the last
    `len(cfg.special_tokens)` ids and the rest are BPE ranks learned from `texts`.

    A corpus too small to supply that many merges yields fewer ranks (with a warning); the special
    tokens then follow the ranks actually learned, so ids stay contiguous and `bos_id` stays
    `n_mergeable`.
    """
    n_ranks = cfg.vocab_size - len(cfg.special_tokens)
    capped = CappedTexts(texts, cfg.max_chars, cfg.doc_cap)
    t0 = time.time()
    trainer = train_rustbpe(capped, n_ranks, cfg.split_pattern)
    seconds = time.time() - t0
    ranks = {bytes(tok): int(rank) for tok, rank in trainer.get_mergeable_ranks()}
    if len(ranks) < n_ranks:
        warnings.warn(
            f"the training text only supported {len(ranks)} of {n_ranks} mergeable ranks; "
            f"vocab_size will be {len(ranks) + len(cfg.special_tokens)}, not {cfg.vocab_size}",
            stacklevel=2,
        )
    meta = {
        "requested_vocab_size": cfg.vocab_size,
        "train_docs": capped.docs,
        "train_chars": capped.chars,
        "doc_cap": cfg.doc_cap,
        "max_chars": cfg.max_chars,
        "train_seconds": round(seconds, 3),
        "trainer": "rustbpe",
    }
    return Tokenizer(ranks, cfg.split_pattern, cfg.special_tokens, name=cfg.name, meta=meta)


# ----------------------------------------------------------------------------------------------
# evaluation helpers


def compression_report(
    tokenizer: Union[Tokenizer, tiktoken.Encoding], texts: Union[Iterable[str], Mapping[str, str]]
) -> dict:
    """Bytes per token (higher = better compression) of `tokenizer` on `texts`.

    `tokenizer` may be ours or any `tiktoken.Encoding` (e.g. GPT-2's or GPT-4's, for comparison).
    Given a mapping name -> text, the report also has a `per_text` breakdown.
    """
    encode: Callable[[str], list[int]] = (
        tokenizer.encode if isinstance(tokenizer, Tokenizer) else tokenizer.encode_ordinary
    )
    named = texts.items() if isinstance(texts, Mapping) else enumerate(texts)
    per_text = {}
    total_bytes = total_tokens = 0
    for key, text in named:
        n_bytes, n_tokens = len(text.encode("utf-8")), len(encode(text))
        total_bytes += n_bytes
        total_tokens += n_tokens
        per_text[str(key)] = {
            "bytes": n_bytes,
            "tokens": n_tokens,
            "bytes_per_token": n_bytes / n_tokens if n_tokens else 0.0,
        }
    report: dict[str, Any] = {
        "texts": len(per_text),
        "bytes": total_bytes,
        "tokens": total_tokens,
        "bytes_per_token": total_bytes / total_tokens if total_tokens else 0.0,
    }
    if isinstance(texts, Mapping):
        report["per_text"] = per_text
    return report


# tiktoken fetches these over HTTP on first use and caches them under sha1(url) in its cache dir.
_REFERENCE_FILES = {
    "r50k_base": (
        "https://openaipublic.blob.core.windows.net/encodings/r50k_base.tiktoken",
        "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930",
    ),
    "cl100k_base": (
        "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken",
        "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
    ),
}


def _tiktoken_cache_dir() -> Optional[Path]:
    for var in ("TIKTOKEN_CACHE_DIR", "DATA_GYM_CACHE_DIR"):
        if var in os.environ:
            return Path(os.environ[var]) if os.environ[var] else None
    return Path(tempfile.gettempdir()) / "data-gym-cache"


def reference_encoding(name: str) -> Optional[tiktoken.Encoding]:
    """tiktoken's `r50k_base` (GPT-2) or `cl100k_base` (GPT-4), or None when not available offline.

    Loading is attempted only when tiktoken's cache already holds the file with the right hash,
    so tiktoken never reaches for the network (which would hang or fail on an offline machine).
    """
    if name not in _REFERENCE_FILES:
        raise ValueError(f"unknown reference encoding {name!r}; known: {sorted(_REFERENCE_FILES)}")
    url, sha256 = _REFERENCE_FILES[name]
    cache = _tiktoken_cache_dir()
    if cache is None:
        return None
    cached = cache / hashlib.sha1(url.encode()).hexdigest()
    try:
        if not cached.is_file() or hashlib.sha256(cached.read_bytes()).hexdigest() != sha256:
            return None
        return tiktoken.get_encoding(name)
    except Exception:  # noqa: BLE001 - a comparison table is optional; never fail a run over it
        return None
