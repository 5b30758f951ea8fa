"""The pretraining loader: BOS rows, exact resume, rank-disjoint data, epochs, bad state."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from chatlm.config import TokenizerConfig
from chatlm.data.loader import PretrainLoader
from chatlm.data.shards import DataError, list_shards, write_shards
from chatlm.tokenizer import train_tokenizer
from tests.tokenizer.conftest import make_corpus

B, T = 3, 32


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(make_corpus(300, seed=1), TokenizerConfig(name="t", vocab_size=400))


@pytest.fixture(scope="module")
def shards(tmp_path_factory, tok):
    # documents tagged with their index so tests can tell them apart after decoding
    docs = [f"[doc{i:04d}] " + text for i, text in enumerate(make_corpus(240, seed=2))]
    out = tmp_path_factory.mktemp("shards")
    write_shards(docs, out, docs_per_row_group=10, row_groups_per_shard=4)  # 6 shards of 40 docs
    train, val = list_shards(out)
    return train, val, docs


def batches(loader, n):
    return [tuple(t.clone() for t in loader.next_batch()) for _ in range(n)]


def test_batches_are_shifted_bos_rows(tok, shards):
    train, _, _ = shards
    loader = PretrainLoader(train, tok, B, T)
    for x, y in batches(loader, 5):
        assert x.shape == y.shape == (B, T) and x.dtype == y.dtype == torch.int64
        assert (x[:, 0] == tok.bos_id).all()
        assert torch.equal(x[:, 1:], y[:, :-1])


def test_rows_are_document_pieces_in_order(tok, shards):
    train, _, docs = shards
    loader = PretrainLoader(train, tok, B, T)
    encoded = {i: tok.encode(d, prepend=tok.bos_id) for i, d in enumerate(docs)}
    for _ in range(4):
        for row in loader.next_rows():
            # split at BOS: every piece must be a prefix of exactly one document (crops only cut tails)
            starts = np.flatnonzero(row == tok.bos_id)
            assert starts[0] == 0
            for a, b in zip(starts, list(starts[1:]) + [len(row)]):
                piece = row[a:b].tolist()
                assert any(e[: len(piece)] == piece for e in encoded.values())


def test_resume_gives_the_same_stream(tok, shards):
    train, _, _ = shards
    straight = PretrainLoader(train, tok, B, T)
    reference = batches(straight, 12)
    first = PretrainLoader(train, tok, B, T)
    batches(first, 5)
    state = first.state_dict()
    resumed = PretrainLoader(train, tok, B, T, state=state)
    for (x, y), (rx, ry) in zip(reference[5:], batches(resumed, 7)):
        assert torch.equal(x, rx) and torch.equal(y, ry)


def test_resume_with_the_prefetched_batch(tok, shards):
    train, _, _ = shards
    reference = batches(PretrainLoader(train, tok, B, T), 6)
    first = PretrainLoader(train, tok, B, T)
    batches(first, 3)  # the third batch is "held" by a loop that prefetches
    resumed = PretrainLoader(train, tok, B, T, state=first.state_dict(include_last_batch=True))
    for (x, y), (rx, ry) in zip(reference[2:], batches(resumed, 4)):
        assert torch.equal(x, rx) and torch.equal(y, ry)


def test_two_ranks_read_disjoint_row_groups(tok, shards):
    train, _, _ = shards
    seen = []
    for rank in (0, 1):
        loader = PretrainLoader(train, tok, B, T, rank=rank, world_size=2, infinite=False)
        positions = []
        original = loader._documents

        def spy(original=original, loader=loader, positions=positions):
            docs = original()
            positions.append(loader.position)
            return docs

        loader._documents = spy
        list(loader)
        seen.append(set(positions))
    assert seen[0] and seen[1] and not seen[0] & seen[1]
    assert {rg for _, rg in seen[0]} == {0, 2} and {rg for _, rg in seen[1]} == {1, 3}
    assert len(seen[0] | seen[1]) == len(train) * 4  # together they read every row group once


def test_epochs_wrap_around(tok, tmp_path):
    docs = [f"short document number {i} " * 3 for i in range(20)]
    write_shards(docs, tmp_path, docs_per_row_group=5, row_groups_per_shard=2)
    train, _ = list_shards(tmp_path)
    loader = PretrainLoader(train, tok, 2, 64, buffer_size=4)
    batches(loader, 40)
    assert loader.epoch > 1 and loader.stats["row_groups_read"] > 6


def test_finite_loader_ends(tok, shards):
    _, val, _ = shards
    n = sum(1 for _ in PretrainLoader([val], tok, B, T, infinite=False))
    assert 0 < n < 100


def test_state_for_another_rank_or_dataset_is_refused(tok, shards):
    train, _, _ = shards
    state = PretrainLoader(train, tok, B, T).state_dict()
    with pytest.raises(DataError, match="rank 0 of 1, not rank 1 of 2"):
        PretrainLoader(train, tok, B, T, rank=1, world_size=2, state=state)
    with pytest.raises(DataError, match="shard set changed"):
        PretrainLoader(train[:-1], tok, B, T, state=state)


def test_too_many_ranks_for_the_data(tok, shards):
    _, val, _ = shards
    loader = PretrainLoader([val], tok, B, T, rank=7, world_size=8)
    with pytest.raises(DataError, match="no row groups"):
        loader.next_batch()


def _doc_tokens(tok, path) -> int:
    """Tokens of every document in a shard file, BOS included (what a drained packer must account for)."""
    import pyarrow.parquet as pq

    return sum(len(tok.encode(t)) + 1 for t in pq.read_table(path).column("text").to_pylist())


def _drain(loader):
    return [tuple(t.clone() for t in b) for b in loader]


def test_padded_finite_loader_evaluates_every_document(tok, shards):
    _, val, _ = shards
    plain, padded = (
        PretrainLoader([val], tok, B, T, infinite=False),
        PretrainLoader([val], tok, B, T, infinite=False, pad_last=True),
    )
    a, b = _drain(plain), _drain(padded)
    # the same full batches, then one more: the documents the plain loader drops
    assert len(b) == len(a) + 1 and all(torch.equal(x, u) and torch.equal(y, v) for (x, y), (u, v) in zip(a, b))
    x, y = b[-1]
    pad = y == -1
    assert pad.any() and (x[pad] == tok.bos_id).all()
    flat = pad.flatten().int()
    assert (flat.diff() >= 0).all()  # the padding is one block at the end of the batch
    # nothing is lost but the crops: every document token was packed or cropped...
    assert padded.packer.tokens_out + padded.packer.tokens_cropped == _doc_tokens(tok, val)
    # ...and each packed row of n tokens gave n - 1 targets (the plain loader's last rows gave none)
    rows = sum(int((yy >= 0).any(dim=1).sum()) for _, yy in b)
    targets = sum(int((yy >= 0).sum()) for _, yy in b)
    assert targets == padded.packer.tokens_out - rows > sum(int((yy >= 0).sum()) for _, yy in a)
    assert padded.drained and not plain.drained
    with pytest.raises(ValueError, match="finite"):
        PretrainLoader([val], tok, B, T, pad_last=True)


def test_more_ranks_than_val_row_groups_evaluate_what_there_is(tok, shards):
    # 8 ranks over a val shard of 4 row groups with batches bigger than a rank's share (the
    # embedded val split on 8 GPUs): the ranks with data give one padded batch, the others none
    _, val, _ = shards
    loaders = [
        PretrainLoader([val], tok, 8, 256, rank=r, world_size=8, infinite=False, pad_last=True) for r in range(8)
    ]
    counts = [len(_drain(ld)) for ld in loaders]
    assert counts == [1, 1, 1, 1, 0, 0, 0, 0]
    assert sum(ld.packer.tokens_out + ld.packer.tokens_cropped for ld in loaders) == _doc_tokens(tok, val)
    assert [
        len(_drain(PretrainLoader([val], tok, 8, 256, rank=r, world_size=8, infinite=False))) for r in range(8)
    ] == [0] * 8  # without padding every batch is partial and dropped


def _read_positions(loader, n_batches=None):
    """The (file, row group) positions a loader reads while producing n batches (all, if None)."""
    positions, original = [], loader._documents

    def spy():
        docs = original()
        if docs is not None:
            positions.append(loader.position)
        return docs

    loader._documents = spy
    if n_batches is None:
        list(loader)
    else:
        batches(loader, n_batches)
    return positions


@pytest.mark.parametrize("old_world,new_world", [(2, 1), (1, 2), (2, 3)])
def test_another_number_of_ranks_continues_the_stream_without_rereading(tok, shards, old_world, new_world):
    train, _, _ = shards
    old = [PretrainLoader(train, tok, B, T, rank=r, world_size=old_world, buffer_size=20) for r in range(old_world)]
    read = [_read_positions(loader, 3 + 2 * r) for r, loader in enumerate(old)]  # the ranks stop unevenly
    states = [loader.state_dict() for loader in old]
    furthest = max(p for rank in read for p in rank)
    new = []
    for r in range(new_world):
        loader = PretrainLoader(train, tok, B, T, rank=r, world_size=new_world, buffer_size=20, infinite=False)
        loader.continue_after(states)
        new.append(_read_positions(loader))
    before = {p for rank in read for p in rank}
    after = [p for rank in new for p in rank]
    assert after and min(after) > furthest and len(set(after)) == len(after)  # nothing read twice
    everything = {(f, rg) for f in range(len(train)) for rg in range(4)}
    skipped = everything - before - set(after)
    # only what lagging old ranks had not reached, and the rest of the furthest one's stride block
    assert all(
        p <= furthest or p[0] == furthest[0] and p[1] < (furthest[1] // new_world + 1) * new_world for p in skipped
    )
    assert len({p for p in skipped if p > furthest}) <= new_world - 1
    # rank 0 starts at the first row group of its new stride after the furthest one read
    assert new[0][0] == min(p for p in everything if p > furthest and p[1] % new_world == 0)


def test_continuing_refuses_another_shard_set(tok, shards):
    train, _, _ = shards
    states = [PretrainLoader(train, tok, B, T, rank=r, world_size=2).state_dict() for r in (0, 1)]
    with pytest.raises(DataError, match="shard set changed"):
        PretrainLoader(train[:-1], tok, B, T).continue_after(states)


def test_continuing_picks_the_furthest_epoch_first(tok, shards):
    """A rank that has wrapped into the next epoch is further than any position of the last one."""
    train, _, _ = shards
    from chatlm.data.loader import DocumentStream

    def state(epoch, position, read=8):
        return {"files": [f.name for f in train], "epoch": epoch, "position": position, "row_groups_read": read}

    stream = DocumentStream(train, tok)
    stream.continue_after([state(1, [4, 3]), state(2, [0, 1]), state(2, [0, 0])])
    assert (stream.epoch, stream.position, stream.row_groups_read) == (2, (0, 1), 24)
    stream.continue_after([state(1, [4, 3]), state(2, None)])  # wrapped, nothing read yet
    assert (stream.epoch, stream.position) == (2, None)
    stream.continue_after([state(1, None, 0), state(1, None, 0)])  # nobody read anything
    assert (stream.epoch, stream.position, stream.row_groups_read) == (1, None, 0)


# ---------------------------------------------------------------------------------------------
# read-ahead: the next row group is read and tokenized on a background thread


class _ThreadRecordingTokenizer:
    """The real tokenizer, recording which thread encodes each row group."""

    def __init__(self, tok):
        self.inner, self.threads = tok, []
        self.bos_id = tok.bos_id

    def encode(self, texts, prepend=None, num_threads=8):
        import threading

        self.threads.append(threading.current_thread().name)
        return self.inner.encode(texts, prepend=prepend, num_threads=num_threads)


def _stream(files, tok, **kw):
    from chatlm.data.loader import DocumentStream

    return DocumentStream(files, tok, threads=1, **kw)


def test_read_ahead_gives_the_same_documents_and_states(tok, tmp_path):
    docs = [f"doc {i} " + "word " * (i % 7 + 1) for i in range(60)]
    write_shards(docs, tmp_path, docs_per_row_group=5, row_groups_per_shard=3)
    train, _ = list_shards(tmp_path)  # 3 train shards: an epoch is 9 row groups
    plain, ahead = _stream(train, tok, read_ahead=False), _stream(train, tok, read_ahead=True)
    for _ in range(25):  # across two epoch boundaries
        a, b = plain.next_documents(), ahead.next_documents()
        assert [d.tolist() for d in a] == [d.tolist() for d in b]
        assert plain.state_dict() == ahead.state_dict()
    assert ahead.epoch == 3 and ahead._pending is not None  # the 26th row group is in flight


def test_read_ahead_runs_on_its_own_thread_and_resumes_exactly(tok, shards):
    train, _, _ = shards
    rec = _ThreadRecordingTokenizer(tok)
    stream = _stream(train, rec)
    first = stream.next_documents()
    assert first is not None and rec.threads[0] == "MainThread"  # the first read has nothing to overlap
    stream.next_documents()
    stream.next_documents()
    stream._pending.result()  # the fourth row group, read ahead while the third was handed out
    assert all(t.startswith("chatlm-read-ahead") for t in rec.threads[1:]) and len(rec.threads) == 4
    state = stream.state_dict()  # three row groups handed out; the fourth read ahead is not in it
    expected = stream.next_documents()
    again = _stream(train, tok)
    again.load_state_dict(state)
    assert [list(map(int, d)) for d in again.next_documents()] == [list(map(int, d)) for d in expected]


def test_loading_a_state_drops_the_row_group_read_ahead(tok, shards):
    train, _, _ = shards
    stream = _stream(train, tok)
    start = stream.state_dict()
    head = [stream.next_documents() for _ in range(2)]  # the third is being read ahead
    stream.load_state_dict(start)
    assert [d.tolist() for d in stream.next_documents()] == [d.tolist() for d in head[0]]
