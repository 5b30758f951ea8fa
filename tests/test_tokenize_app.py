"""python -m chatlm.tokenize end to end on the embedded corpus (real rustbpe training)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from chatlm.tokenizer import Tokenizer
from tests.conftest import load_record, run_dirs, stage_env


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def test_tokenize_trains_saves_and_reports(tmp_path, run_stage, cache):
    env = stage_env(tmp_path, CHATLM_CACHE_DIR=str(cache))
    r = run_stage("tokenize", "tokenizer=bpe8k", "tokenizer.vocab_size=1024", "tokenizer.name=t1k", env=env)
    assert r.returncode == 0, r.stderr
    tok = Tokenizer.load(cache / "tokenizer" / "t1k")
    assert tok.vocab_size == 1024 and tok.bos_id == 1024 - 9
    assert tok.decode(tok.encode("Call me Ishmael.")) == "Call me Ishmael."
    tb = np.load(cache / "tokenizer" / "t1k" / "token_bytes.npy")
    assert tb.shape == (1024,) and tb[tok.bos_id] == 0 and tb[:256].tolist() == [1] * 256
    (d,) = run_dirs(tmp_path / "outputs", "tokenize")
    rec = load_record(d)
    m = rec["final_metrics"]
    assert rec["status"] == "completed" and m["vocab_size"] == 1024 and m["train_docs"] > 3000
    assert 2.5 < m["bytes_per_token"] < 5.0  # BPE-1k on English prose
    report = json.loads((d / "tokenizer_report.json").read_text())
    assert report["compression"]["chatlm"]["per_text"]["embedded"]["tokens"] > 1000
    # one progress display for the merges, not rustbpe's line per percent
    assert "Progress: " not in r.stdout and "tokenizer merges 100/100" in r.stdout
    assert r.stdout.count("tokenizer merges") <= 5

    again = run_stage("tokenize", "tokenizer=bpe8k", "tokenizer.vocab_size=1024", "tokenizer.name=t1k", env=env)
    assert again.returncode != 0 and "overwrite=true" in again.stderr and "reuse=true" in again.stderr
    kept = run_stage(
        "tokenize", "tokenizer=bpe8k", "tokenizer.vocab_size=1024", "tokenizer.name=t1k", "reuse=true", env=env
    )
    assert kept.returncode == 0, kept.stderr
    assert "kept the existing tokenizer" in kept.stdout and "tokenizer merges" not in kept.stdout
    rec = load_record(run_dirs(tmp_path / "outputs", "tokenize")[-1])
    assert rec["final_metrics"]["reused"] is True and rec["final_metrics"]["fingerprint"] == tok.fingerprint


def test_missing_data_source_says_how_to_build_it(tmp_path, run_stage, cache):
    env = stage_env(tmp_path, CHATLM_CACHE_DIR=str(cache))
    r = run_stage("tokenize", "data=offline_registry", env=env)
    assert r.returncode != 0 and "fetch_offline_corpus.py" in r.stderr
    rec = load_record(run_dirs(tmp_path / "outputs", "tokenize")[0])
    assert rec["status"] == "failed" and rec["error"]["type"] == "DataError"
