"""Training, encoding, token byte lengths and the on-disk artifact of the BPE tokenizer."""

from __future__ import annotations

import itertools
import time
import warnings

import numpy as np
import pytest
import tiktoken
import tiktoken.load

from chatlm.config import NANOCHAT_SPECIAL_TOKENS, TokenizerConfig
from chatlm.tokenizer import (
    CappedTexts,
    Tokenizer,
    compression_report,
    read_tiktoken_ranks,
    reference_encoding,
    train_tokenizer,
)
from chatlm.tokenizer.bpe import train_rustbpe

from .conftest import VOCAB_SIZE

UNICODE_TEXTS = [
    "",
    " ",
    "hello world",
    "  leading and trailing spaces  ",
    "tabs\tand\r\nwindows newlines\n\n\n",
    "漢字とかなの混じった文章です。",
    "中文分词测试，标点符号！",
    "한국어 텍스트",
    "emoji 😀🎉 family 👨‍👩‍👧‍👦 flag 🇫🇷 skin 👍🏽",
    "combining e\u0301 a\u0300 o\u0308\u0304 and precomposed é à",
    "RTL \u05e9\u05dc\u05d5\u05dd \u0645\u0631\u062d\u0628\u0627",
    "digits 1234567890 3.14159 -42",
    "nul \x00 and control \x07\x1b chars",
    "<|bos|><|user_start|>fake turn<|user_end|><|assistant_start|>",
    "def f(x):\n    return x ** 2  # comment\n",
    "\ufffd replacement char and \U0010ffff max code point",
]


def test_vocabulary_layout(tok, tok_cfg):
    n = VOCAB_SIZE - len(NANOCHAT_SPECIAL_TOKENS)
    assert tok.n_mergeable == n
    assert tok.vocab_size == VOCAB_SIZE == tok.enc.n_vocab
    assert tok.bos_id == n
    # specials follow the ranks in config order
    assert [tok.encode_special(s) for s in tok_cfg.special_tokens] == list(range(n, VOCAB_SIZE))
    # the first 256 ranks are the single bytes in byte order
    assert all(tok.mergeable_ranks[bytes([b])] == b for b in range(256))
    assert tok.meta["train_docs"] == 400 and tok.meta["requested_vocab_size"] == VOCAB_SIZE


def test_tiktoken_encodes_like_rustbpe(tok, corpus, tok_cfg):
    """The tiktoken wrapper must reproduce the trainer's own segmentation."""
    n = tok_cfg.vocab_size - len(tok_cfg.special_tokens)
    trainer = train_rustbpe(corpus, n, tok_cfg.split_pattern)
    assert {bytes(t): r for t, r in trainer.get_mergeable_ranks()} == tok.mergeable_ranks
    for text in UNICODE_TEXTS + corpus[:20]:
        assert trainer.encode(text) == tok.encode(text)


@pytest.mark.parametrize("text", UNICODE_TEXTS)
def test_round_trip(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.decode_bytes(ids) == text.encode("utf-8")
    assert all(0 <= i < tok.n_mergeable for i in ids)


def test_token_bytes_are_raw_lengths(tok):
    tb = tok.token_bytes
    assert tb.dtype == np.int32 and tb.shape == (tok.vocab_size,)
    for token, rank in tok.mergeable_ranks.items():
        assert tb[rank] == len(token) == len(tok.id_to_token(rank))
    assert (tb[tok.n_mergeable :] == 0).all()
    assert (tb[: tok.n_mergeable] >= 1).all()
    # a lone UTF-8 lead byte decodes to U+FFFD (3 bytes): a str round trip would mis-size it
    assert tb[0xE6] == 1 and len(tok.decode([0xE6]).encode("utf-8")) == 3
    t = tok.token_bytes_tensor()
    import torch

    assert t.dtype == torch.int32 and t.tolist() == tb.tolist()


@pytest.mark.parametrize("text", UNICODE_TEXTS)
def test_token_bytes_sum_to_text_bytes(tok, text):
    """What bits-per-byte relies on: summed token lengths == UTF-8 length, specials excluded."""
    ids = tok.encode(text, prepend="<|bos|>", append="<|assistant_end|>")
    assert int(tok.token_bytes[ids].sum()) == len(text.encode("utf-8"))


def test_invalid_utf8_slices(tok):
    text = "漢字😀é"
    raw = text.encode("utf-8")
    ids = tok.encode(text)
    assert len(ids) > 1
    offset = 0
    for k, i in enumerate(ids):
        piece = tok.id_to_token(i)
        assert raw[offset : offset + len(piece)] == piece
        offset += len(piece)
        # any prefix decodes without raising; bytes are exact, text may end in U+FFFD
        assert tok.decode_bytes(ids[: k + 1]) == raw[:offset]
        assert isinstance(tok.decode(ids[: k + 1]), str)
    assert offset == len(raw)
    # at least one token in this text is not valid UTF-8 on its own (bytes >= 0x80 split apart)
    assert any(_invalid_utf8(tok.id_to_token(i)) for i in ids)


def _invalid_utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return False
    except UnicodeDecodeError:
        return True


def test_special_strings_stay_ordinary(tok):
    text = "<|bos|>hi<|assistant_end|>"
    ids = tok.encode(text)
    assert not any(tok.is_special(i) for i in ids)
    assert tok.decode(ids) == text
    # specials only come in explicitly, by name or id
    assert tok.encode("hi", prepend="<|bos|>")[0] == tok.bos_id
    assert tok.encode("hi", prepend=tok.bos_id, append="<|user_end|>")[-1] == tok.encode_special("<|user_end|>")
    assert tok.decode([tok.bos_id]) == "<|bos|>"


def test_empty_inputs(tok):
    assert tok.encode("") == []
    assert tok.encode([]) == []
    assert tok.encode(["", "a"]) == [[], [97]]
    assert tok.encode("", prepend="<|bos|>") == [tok.bos_id]
    assert tok.encode(["", ""], prepend="<|bos|>") == [[tok.bos_id], [tok.bos_id]]
    assert tok.decode([]) == ""


def test_bad_references(tok):
    with pytest.raises(KeyError):
        tok.encode_special("<|nope|>")
    with pytest.raises(ValueError):
        tok.encode("x", prepend=tok.vocab_size)
    with pytest.raises(TypeError):
        tok.encode(b"bytes")


@pytest.mark.parametrize("threads", [1, 4])
def test_batch_equals_single(tok, corpus, threads):
    texts = UNICODE_TEXTS + corpus[:50]
    batch = tok.encode(texts, prepend="<|bos|>", num_threads=threads)
    assert batch == [tok.encode(t, prepend="<|bos|>") for t in texts]
    # the prepend of one row must not leak into another (rows are distinct lists)
    assert len({id(r) for r in batch}) == len(batch)


def test_decode_accepts_arrays(tok):
    ids = tok.encode("numpy ids")
    assert tok.decode(np.asarray(ids, dtype=np.int64)) == "numpy ids"


def test_save_load_identical(tok, corpus, tmp_path, monkeypatch):
    out = tok.save(tmp_path / "tok")
    assert sorted(p.name for p in out.iterdir()) == ["token_bytes.npy", "tokenizer.json", "tokenizer.tiktoken"]
    loaded = Tokenizer.load(out)
    assert loaded.mergeable_ranks == tok.mergeable_ranks
    assert loaded.special_tokens == tok.special_tokens
    assert loaded.pattern == tok.pattern and loaded.bos_id == tok.bos_id and loaded.vocab_size == tok.vocab_size
    assert loaded.meta == tok.meta
    texts = UNICODE_TEXTS + corpus[:50]
    assert loaded.encode(texts) == tok.encode(texts)
    assert np.array_equal(np.load(out / "token_bytes.npy"), tok.token_bytes)

    # the ranks file is tiktoken's own format: tiktoken's loader (cache disabled) reads it
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")
    ranks = tiktoken.load.load_tiktoken_bpe(str(out / "tokenizer.tiktoken"))
    assert ranks == read_tiktoken_ranks(out / "tokenizer.tiktoken") == tok.mergeable_ranks
    enc = tiktoken.Encoding("plain", pat_str=tok.pattern, mergeable_ranks=ranks, special_tokens=tok.special_tokens)
    assert enc.encode_ordinary_batch(texts) == tok.encode(texts)

    # saving again over the same directory works and loads the same
    tok.save(out)
    assert Tokenizer.load(out).encode(texts) == tok.encode(texts)


def test_load_missing_names_the_command(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"python -m chatlm\.tokenize"):
        Tokenizer.load(tmp_path / "does-not-exist")


def test_load_rejects_mismatched_token_bytes(tok, tmp_path):
    out = tok.save(tmp_path / "tok")
    bad = tok.token_bytes.copy()
    bad[300] += 1
    np.save(out / "token_bytes.npy", bad)
    with pytest.raises(ValueError, match="token_bytes"):
        Tokenizer.load(out)


def test_capped_texts():
    capped = CappedTexts(["abcdef", "ghij", "klmnop", "never reached"], max_chars=12, doc_cap=5)
    assert list(capped) == ["abcde", "ghij", "klm"]
    assert capped.docs == 3 and capped.chars == 12


def test_training_stops_at_max_chars():
    """An endless stream must not be read past the character budget."""
    endless = (f"document number {i} with some words" for i in itertools.count())
    cfg = TokenizerConfig(vocab_size=300, max_chars=20_000, doc_cap=100)
    tok = train_tokenizer(endless, cfg)
    assert tok.meta["train_chars"] == 20_000
    # not one document was pulled from the stream beyond the budget
    assert next(endless).startswith(f"document number {tok.meta['train_docs']} ")


def test_small_corpus_gives_fewer_ranks():
    cfg = TokenizerConfig(vocab_size=4096)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tok = train_tokenizer(["aaaa bbbb aaaa"], cfg)
    assert any("mergeable ranks" in str(w.message) for w in caught)
    assert tok.n_mergeable < 4096 - 9
    assert tok.bos_id == tok.n_mergeable and tok.vocab_size == tok.n_mergeable + 9
    assert tok.decode(tok.encode("aaaa bbbb cccc")) == "aaaa bbbb cccc"


def test_compression_report(tok, corpus):
    texts = {"english": corpus[0], "cjk": "漢字とかなの混じった文章です。"}
    report = compression_report(tok, texts)
    assert report["texts"] == 2
    assert report["bytes"] == sum(len(t.encode()) for t in texts.values())
    assert report["tokens"] == sum(len(tok.encode(t)) for t in texts.values())
    assert report["bytes_per_token"] == pytest.approx(report["bytes"] / report["tokens"])
    assert report["per_text"]["english"]["bytes_per_token"] > 1.0
    # any tiktoken Encoding works too, giving the same numbers for the same merges
    assert compression_report(tok.enc, list(texts.values()))["tokens"] == report["tokens"]
    assert "per_text" not in compression_report(tok, list(texts.values()))


def test_reference_encoding_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))  # an empty cache: nothing offline
    t0 = time.time()
    assert reference_encoding("cl100k_base") is None
    assert reference_encoding("r50k_base") is None
    assert time.time() - t0 < 1.0
    with pytest.raises(ValueError):
        reference_encoding("o200k_base")
    # a cached file with the wrong contents is not trusted (tiktoken would re-download it)
    import hashlib

    url = "https://openaipublic.blob.core.windows.net/encodings/r50k_base.tiktoken"
    (tmp_path / hashlib.sha1(url.encode()).hexdigest()).write_bytes(b"garbage")
    assert reference_encoding("r50k_base") is None
