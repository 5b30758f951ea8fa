"""BOS best-fit packing (pretraining) and pad-not-crop packing (SFT)."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from chatlm.data.packing import (
    BestFitPacker,
    pack_stream,
)

BOS = 0


class DocSource:
    """Deterministic chunks of documents whose non-BOS tokens are globally unique and increasing,
    so any token identifies its document and offset. `position` is the resumable state."""

    def __init__(self, seed: int = 0, chunk: int = 16, max_len: int = 300, position: int = 0):
        self.seed, self.chunk, self.max_len, self.position = seed, chunk, max_len, position
        self.docs: dict[int, list[int]] = {}

    def chunk_at(self, index: int) -> list[list[int]]:
        rng = np.random.default_rng([self.seed, index])
        lengths = np.minimum(rng.geometric(1 / 60, size=self.chunk), self.max_len)
        docs = []
        for j, n in enumerate(lengths):
            doc_id = index * self.chunk + j
            start = 1 + doc_id * self.max_len  # unique token range per document
            doc = [BOS] + list(range(start, start + int(n) - 1))
            self.docs[doc_id] = doc
            docs.append(doc)
        return docs

    def __call__(self) -> list[list[int]]:
        docs = self.chunk_at(self.position)
        self.position += 1
        return docs


def split_row(row: np.ndarray, source: DocSource) -> list[tuple[int, int]]:
    """Row -> [(doc_id, piece_len)], checking each piece is a prefix of its document."""
    starts = np.flatnonzero(row == BOS).tolist()
    assert starts and starts[0] == 0, "a row must start with BOS"
    pieces = []
    for s, e in zip(starts, starts[1:] + [len(row)]):
        piece = row[s:e].tolist()
        if len(piece) == 1:  # a BOS-only piece: a 1-token document, or a crop to 1 token
            pieces.append((None, 1))
            continue
        doc_id = (piece[1] - 1) // source.max_len
        assert piece == source.docs[doc_id][: len(piece)], "pieces must be contiguous document prefixes"
        pieces.append((doc_id, len(piece)))
    return pieces


def test_rows_are_bos_aligned_contiguous_document_pieces():
    T = 255
    source = DocSource(seed=1)
    packer = BestFitPacker(bos_id=BOS, buffer_size=64)
    used: set[int] = set()
    cropped_tokens = 0
    for _ in range(300):
        row = packer.pack_row(T + 1, refill=source)
        assert row.shape == (T + 1,) and row[0] == BOS
        pieces = split_row(row, source)
        for k, (doc_id, n) in enumerate(pieces):
            if doc_id is None:
                continue
            assert doc_id not in used, "a document may be used only once"
            used.add(doc_id)
            full = len(source.docs[doc_id])
            if n < full:  # a crop: only the last piece of a row, and the tail is gone for good
                assert k == len(pieces) - 1
                cropped_tokens += full - n
    assert packer.tokens_out == 300 * (T + 1)
    # conservation: every token taken from the source is either in a row or cropped away
    fed = sum(len(d) for d in source.docs.values())
    assert packer.tokens_out + packer.tokens_cropped == fed - packer.buffered_tokens
    # crops we could attribute (a crop down to a lone BOS cannot be told from a 1-token document)
    assert 0 < cropped_tokens <= packer.tokens_cropped
    assert 0 < packer.waste < 0.5


def test_best_fit_choice_and_crop_path():
    packer = BestFitPacker(bos_id=BOS, buffer_size=1)
    docs = {n: [BOS] + [n] * (n - 1) for n in (8, 5, 6, 3)}
    packer.add(docs[n] for n in (8, 5, 6, 3))
    # room 10: the largest fitting is 8; room 2: nothing fits -> crop the shortest (3) to 2
    assert packer.pack_row(10).tolist() == docs[8] + docs[3][:2]
    assert packer.tokens_cropped == 1 and packer.docs_cropped == 1
    # room 10: 6 fits, then room 4: nothing (5 left) -> crop 5 to 4
    assert packer.pack_row(10).tolist() == docs[6] + docs[5][:4]
    assert packer.tokens_cropped == 2
    with pytest.raises(RuntimeError, match="ran dry"):
        packer.pack_row(10)


def test_pad_fills_the_row_the_documents_ran_out_in():
    packer = BestFitPacker(bos_id=BOS)
    packer.add([[BOS, 7, 7, 7], [BOS, 9]])
    # 4 + 2 document tokens, then padding; tokens_out counts only document tokens
    assert packer.pack_row(10, pad=-1).tolist() == [BOS, 7, 7, 7, BOS, 9] + [-1] * 4
    assert packer.last_row_tokens == 6 and packer.tokens_out == 6 and len(packer) == 0
    assert packer.pack_row(5, pad=-1).tolist() == [-1] * 5 and packer.last_row_tokens == 0
    packer.add([[BOS, 1, 1]])
    assert packer.pack_row(3, pad=-1).tolist() == [BOS, 1, 1] and packer.last_row_tokens == 3  # exact fit
    assert packer.tokens_out == 9


def test_exact_fit_has_no_waste_and_ties_go_in_arrival_order():
    packer = BestFitPacker(bos_id=BOS)
    a, b, c = [BOS, 1, 1], [BOS, 2, 2], [BOS, 3, 3, 3]
    packer.add([a, b, c])
    assert packer.pack_row(7).tolist() == c + a
    packer.add([[BOS, 4, 4, 4]])
    assert packer.pack_row(7).tolist() == [BOS, 4, 4, 4] + b
    assert packer.tokens_cropped == 0


def test_refill_happens_before_every_pick():
    """With buffer_size docs always present the candidates never depend on call batching."""
    source = DocSource(seed=2)
    packer = BestFitPacker(bos_id=BOS, buffer_size=40)
    for _ in range(20):
        packer.pack_row(513, refill=source)
        assert len(packer) >= 40 - 1  # topped up before the last pick, which took one document


def test_state_dict_round_trip_resumes_identically():
    T, total, cut = 511, 60, 25
    src_a = DocSource(seed=3)
    a = BestFitPacker(bos_id=BOS, buffer_size=50)
    rows_a, snapshot = [], None
    for i in range(total):
        if i == cut:
            snapshot = (pickle.dumps(a.state_dict()), src_a.position)
        rows_a.append(a.pack_row(T + 1, refill=src_a).copy())

    state, position = snapshot
    src_b = DocSource(seed=3, position=position)
    b = BestFitPacker(bos_id=BOS, buffer_size=50)
    b.load_state_dict(pickle.loads(state))
    rows_b = [b.pack_row(T + 1, refill=src_b).copy() for _ in range(total - cut)]
    assert all(np.array_equal(x, y) for x, y in zip(rows_a[cut:], rows_b))
    assert b.stats() == a.stats()

    # plain lists (e.g. a JSON checkpoint) load as well
    as_lists = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in a.state_dict().items()}
    c = BestFitPacker(bos_id=BOS, buffer_size=50)
    c.load_state_dict(as_lists)
    assert c.state_dict()["lengths"].tolist() == as_lists["lengths"]


def test_state_dict_rejects_garbage():
    packer = BestFitPacker(bos_id=BOS)
    packer.add([[BOS, 1, 2]])
    state = packer.state_dict()
    state["lengths"] = np.array([5])
    with pytest.raises(ValueError):
        BestFitPacker().load_state_dict(state)
    with pytest.raises(ValueError):
        BestFitPacker().load_state_dict({"version": 99})
    empty = BestFitPacker().state_dict()
    fresh = BestFitPacker()
    fresh.load_state_dict(empty)
    assert len(fresh) == 0


def test_rejects_documents_without_bos():
    packer = BestFitPacker(bos_id=BOS)
    with pytest.raises(ValueError, match="BOS"):
        packer.add([[5, 6, 7]])
    with pytest.raises(ValueError):
        packer.add([[]])


def test_pack_stream_and_out_buffer():
    source = DocSource(seed=4)
    chunks = [source.chunk_at(i) for i in range(30)]
    rows = list(pack_stream(chunks, 129, buffer_size=32, bos_id=BOS))
    assert rows and all(r.shape == (129,) and r[0] == BOS for r in rows)
    out = np.empty(129, dtype=np.int32)
    packer = BestFitPacker(bos_id=BOS)
    packer.add(chunks[0])
    assert packer.pack_row(129, out=out) is out
