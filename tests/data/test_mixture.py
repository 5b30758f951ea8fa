"""The mixture loader: token shares follow the weights, exact resume, disjoint ranks, finite mode."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from chatlm.config import TokenizerConfig
from chatlm.data.loader import MixtureLoader, PretrainLoader, make_loader
from chatlm.data.shards import DataError, iter_documents, iter_row_groups, list_shards, write_shards
from chatlm.runtime.checkpoint import to_safe
from chatlm.tokenizer import train_tokenizer
from tests.tokenizer.conftest import make_corpus

B, T = 3, 32


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(make_corpus(300, seed=1), TokenizerConfig(name="t", vocab_size=400))


def _shard_set(tmp_path_factory, name, docs, per_rg, rgs_per_shard):
    out = tmp_path_factory.mktemp(name)
    write_shards(docs, out, docs_per_row_group=per_rg, row_groups_per_shard=rgs_per_shard)
    train, val = list_shards(out)
    return [*train, val]  # the loader reads whatever files it is given


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    # tagged so every packed piece can be traced to its source by its first token after BOS;
    # source b has longer documents and bigger row groups, so balancing by row groups would fail
    a = [f"@@ {text}" for text in make_corpus(200, seed=3)]
    b = [f"## {text} {text}" for text in make_corpus(200, seed=4)]
    return (
        _shard_set(tmp_path_factory, "a", a, per_rg=5, rgs_per_shard=8),
        _shard_set(tmp_path_factory, "b", b, per_rg=10, rgs_per_shard=4),
    )


def batches(loader, n):
    return [tuple(t.clone() for t in loader.next_batch()) for _ in range(n)]


def _first_tokens(tok, files):
    return {tok.encode(d)[0] for d in iter_documents(files)}


def test_make_loader_picks_the_loader(tok, sources):
    a, b = sources
    assert type(make_loader([(a, 1.0)], tok, B, T)) is PretrainLoader
    assert type(make_loader([(a, 1.0), (b, 2.0)], tok, B, T, buffer_size=8)) is MixtureLoader
    with pytest.raises(DataError):
        make_loader([], tok, B, T)
    with pytest.raises(DataError, match="weight"):
        MixtureLoader([(a, 1.0), (b, 0.0)], tok, B, T)


@pytest.mark.parametrize("weights", [(3.0, 1.0), (1.0, 1.0), (1.0, 4.0)])
def test_token_shares_follow_the_weights(tok, sources, weights):
    a, b = sources
    first_a, first_b = _first_tokens(tok, a), _first_tokens(tok, b)
    assert not first_a & first_b
    # rows long enough that few tokens are cropped: the packed share is then the drawn share
    loader = MixtureLoader([(a, weights[0]), (b, weights[1])], tok, 2, 1024, buffer_size=16)
    counts = [0, 0]
    for _ in range(60):
        for row in loader.next_rows():
            starts = list(np.flatnonzero(row == tok.bos_id)) + [len(row)]
            for s, e in zip(starts[:-1], starts[1:]):
                if e - s < 2:
                    continue  # a lone BOS at the end of a row: no tag to read
                counts[0 if row[s + 1] in first_a else 1] += e - s
                assert row[s + 1] in first_a or row[s + 1] in first_b
    share = counts[0] / sum(counts)
    expected = weights[0] / sum(weights)
    assert abs(share - expected) < 0.05, (share, expected)  # packed: cropping and the buffer blur it a bit
    stats = loader.stats["sources"]
    assert abs(stats[0]["token_share"] - expected) < 0.02, stats  # drawn: to one row group (~2%)
    assert stats[0]["epoch"] > 1 or stats[1]["epoch"] > 1  # the run wrapped around at least one source


@pytest.mark.parametrize("include_last_batch", [False, True])
def test_resume_gives_the_same_stream(tok, sources, include_last_batch):
    a, b = sources
    make = lambda state=None: MixtureLoader([(a, 2.0), (b, 1.0)], tok, 4, 256, buffer_size=8, state=state)  # noqa: E731
    straight = make()
    reference = batches(straight, 40)
    first = make()
    batches(first, 25)
    state = first.state_dict(include_last_batch=include_last_batch)
    # through a checkpoint file, as train.py stores it (weights_only load)
    buf = io.BytesIO()
    torch.save(to_safe(state), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    resumed = make(state)
    skip = 24 if include_last_batch else 25
    for (x, y), (rx, ry) in zip(reference[skip:], batches(resumed, 40 - skip), strict=True):
        assert torch.equal(x, rx) and torch.equal(y, ry)
    assert resumed.stats["sources"] == straight.stats["sources"]
    assert first.stats["sources"][0]["epoch"] > 1  # the state was taken after a wrapped around


def test_mismatched_states_are_refused(tok, sources):
    a, b = sources
    mix = MixtureLoader([(a, 2.0), (b, 1.0)], tok, B, T, buffer_size=8)
    batches(mix, 2)
    state = mix.state_dict()
    with pytest.raises(DataError, match="weights"):
        MixtureLoader([(a, 1.0), (b, 1.0)], tok, B, T, buffer_size=8, state=state)
    with pytest.raises(DataError, match="shard set changed"):
        MixtureLoader([(a[:-1], 2.0), (b, 1.0)], tok, B, T, buffer_size=8, state=state)
    with pytest.raises(DataError, match="source directories"):
        MixtureLoader([(b, 2.0), (a, 1.0)], tok, B, T, buffer_size=8, state=state)
    with pytest.raises(DataError, match="rank 0 of 1, not rank 1 of 2"):
        MixtureLoader([(a, 2.0), (b, 1.0)], tok, B, T, rank=1, world_size=2, state=state)
    with pytest.raises(DataError, match="one source"):
        PretrainLoader(a, tok, B, T, state=state)
    with pytest.raises(DataError, match="single source"):
        MixtureLoader([(a, 2.0), (b, 1.0)], tok, B, T, state=PretrainLoader(a, tok, B, T).state_dict())


def _spy(loader):
    seen = [[] for _ in loader.streams]
    for i, stream in enumerate(loader.streams):
        original = stream.next_documents

        def spy(original=original, stream=stream, out=seen[i]):
            docs = original()
            if docs is not None:
                out.append(stream.position)
            return docs

        stream.next_documents = spy
    return seen


def test_two_ranks_read_disjoint_row_groups(tok, sources):
    a, b = sources
    seen = []
    for rank in (0, 1):
        loader = MixtureLoader([(a, 1.0), (b, 1.0)], tok, B, T, rank=rank, world_size=2, buffer_size=8, infinite=False)
        positions = _spy(loader)
        list(loader)
        seen.append([set(p) for p in positions])
    for src, files in enumerate((a, b)):
        r0, r1 = seen[0][src], seen[1][src]
        assert r0 and r1 and not r0 & r1
        # together the ranks read every row group of the source once
        assert len(r0 | r1) == sum(1 for _ in iter_row_groups(files))


def test_a_source_runs_out_in_finite_mode(tok, tmp_path_factory, sources):
    _, b = sources
    small = _shard_set(
        tmp_path_factory, "small", [f"@@ {t}" for t in make_corpus(20, seed=5)], per_rg=5, rgs_per_shard=2
    )  # 4 row groups, drawn with 4x b's weight: runs out first
    loader = MixtureLoader([(small, 4.0), (b, 1.0)], tok, B, T, buffer_size=8, infinite=False)
    order = []
    for i, stream in enumerate(loader.streams):
        original = stream.next_documents
        stream.next_documents = lambda original=original, i=i: (order.append(i), original())[1]
    n = sum(1 for _ in loader)
    assert n > 0
    small_stream, big_stream = loader.streams
    assert small_stream.exhausted and big_stream.exhausted and small_stream.epoch == big_stream.epoch == 1
    assert loader.docs_drawn == [20, 200]  # every document of both sources went into the packer
    last_small = max(i for i, s in enumerate(order) if s == 0)
    assert order[last_small + 1 :] and set(order[last_small + 1 :]) == {1}  # b carried on alone
    with pytest.raises(StopIteration):
        loader.next_batch()


def test_stream_encoding_matches_the_tokenizer_for_any_thread_count(tok, sources):
    from chatlm.data.loader import DocumentStream, _tokenizer_pool

    a, _ = sources
    texts = next(iter_row_groups(a))[0]
    expected = tok.encode(texts, prepend=tok.bos_id)
    for threads in (1, 2, 3):
        docs = DocumentStream(a, tok, threads=threads).next_documents()
        assert [d.tolist() for d in docs] == expected and all(d.dtype == np.int32 for d in docs)
    pool = _tokenizer_pool(3)
    for _ in range(5):  # loaders made per evaluation share one pool: no threads pile up
        DocumentStream(a, tok, threads=3).next_documents()
    assert _tokenizer_pool(3) is pool and len(pool._threads) <= 3


def test_two_rank_mixture_continues_on_one_rank(tok, sources):
    """A checkpoint written on 2 ranks resumed on 1: each source picks up after the furthest row
    group either rank had read (nothing read twice) and keeps balancing tokens by the weights."""
    a, b = sources
    old = [MixtureLoader([(a, 2.0), (b, 1.0)], tok, B, T, rank=r, world_size=2, buffer_size=8) for r in (0, 1)]
    old_seen = [_spy(loader) for loader in old]
    for r, loader in enumerate(old):
        batches(loader, 6 + 3 * r)
    states = [loader.state_dict() for loader in old]
    new = MixtureLoader([(a, 2.0), (b, 1.0)], tok, B, T, buffer_size=8)
    new.continue_after(states)
    assert new.tokens_drawn == [sum(s["sources"][i]["tokens_drawn"] for s in states) for i in (0, 1)]
    new_seen = _spy(new)
    batches(new, 20)
    for src in (0, 1):
        before = {p for seen in old_seen for p in seen[src]}
        assert new_seen[src] and min(new_seen[src]) > max(before)  # nothing read twice
    shares = [s["token_share"] for s in new.stats["sources"]]
    assert abs(shares[0] - 2 / 3) < 0.1  # still 2:1 over everything drawn, old ranks included
    with pytest.raises(DataError, match="weights"):
        MixtureLoader([(a, 1.0), (b, 1.0)], tok, B, T).continue_after(states)


def test_padded_finite_mixture_packs_every_document(tok, sources):
    a, b = sources
    loader = MixtureLoader([(a, 1.0), (b, 2.0)], tok, B, T, buffer_size=8, infinite=False, pad_last=True)
    batches = [y.clone() for _, y in loader]
    assert loader.drained and (batches[-1] == -1).any()
    # every token drawn from either source went into a row or was cropped: none is left behind
    assert loader.packer.tokens_out + loader.packer.tokens_cropped == sum(loader.tokens_drawn)
    assert len(loader.packer) == 0
