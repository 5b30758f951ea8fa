"""load_model: a checkpoint (new or written by 902ac35) to a ready model with its checked tokenizer."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from chatlm.config import ModelConfig
from chatlm.runtime.model_loading import (
    TokenizerMismatch,
    check_architecture,
    load_model,
    load_weights,
    model_config_from_meta,
)
from chatlm.runtime.rundir import config_hash
from chatlm.tokenizer import Tokenizer
from tests.conftest import load_record, stage_env, train_once

LEGACY = Path(__file__).parent / "fixtures" / "legacy_902ac35"


@pytest.fixture
def trained(smoke_train_run):
    run, env, _ = smoke_train_run
    return run, env


def test_legacy_checkpoint_loads_with_the_same_logits():
    expected = json.loads((LEGACY / "expected_logits.json").read_text())
    model, tok, meta = load_model(LEGACY / "run", tokenizer_dir=LEGACY / "tokenizer" / "bpe300")
    assert tok.vocab_size == 300 and meta["step"] == 2 and not model.training
    with torch.no_grad():
        logits = model(torch.tensor([expected["ids"]]))[0, :, :300]
    assert logits[-1, :8].tolist() == pytest.approx(expected["logits_last_row_first8"], abs=1e-6)
    assert float(logits.double().sum()) == pytest.approx(expected["logits_sum"], abs=1e-5)


def test_legacy_run_keeps_its_config_hash():
    # resume=auto compares this hash: a run written by 902ac35 must resume under today's code
    resolved = yaml.safe_load((LEGACY / "run" / "config.resolved.yaml").read_text())
    resolved.pop("derived")
    assert config_hash(resolved) == load_record(LEGACY / "run")["config_hash"]


def legacy_copy(tmp_path: Path, tokenizer_dir: Path) -> Path:
    """The legacy run with its config.resolved.yaml naming `tokenizer_dir` (as written on another machine)."""
    run = tmp_path / "run"
    shutil.copytree(LEGACY / "run", run, symlinks=True)
    resolved = yaml.safe_load((run / "config.resolved.yaml").read_text())
    resolved["derived"]["tokenizer_dir"] = str(tokenizer_dir)
    (run / "config.resolved.yaml").write_text(yaml.safe_dump(resolved))
    return run


def test_legacy_checkpoint_finds_the_tokenizer_its_run_names(tmp_path):
    run = legacy_copy(tmp_path, LEGACY / "tokenizer" / "bpe300")
    _, tok, _ = load_model(run)
    assert tok.name == "bpe300" and tok.vocab_size == 300


def test_legacy_checkpoint_without_its_tokenizer_is_one_clear_error(tmp_path):
    run = legacy_copy(tmp_path, tmp_path / "gone" / "bpe300")
    with pytest.raises(TokenizerMismatch, match=r"needs a tokenizer of 300 ids.*gone/bpe300.*pass tokenizer_dir="):
        load_model(run)


def test_new_checkpoint_records_and_carries_its_tokenizer(trained):
    run, _ = trained
    meta = json.loads((run / "checkpoints" / "latest" / "meta.json").read_text())
    tok = Tokenizer.load(run / "tokenizer")  # the copy written with the first checkpoint
    assert meta["tokenizer"]["sha256"] == tok.fingerprint and meta["tokenizer"]["name"] == "bpe8k"
    assert meta["tokens"] == 5 * 512 and meta["loop"]["min_val_bpb"] > 0
    model, loaded_tok, meta2 = load_model(run)
    assert loaded_tok.fingerprint == tok.fingerprint and meta2["checkpoint"].endswith("step_000005")
    # the model in the checkpoint: same logits as loading the state by hand into the recorded config
    state = torch.load(run / "checkpoints" / "latest" / "model.pt", weights_only=True)
    assert torch.equal(model.state_dict()["lm_head.weight"], state["lm_head.weight"])


def test_another_tokenizer_is_refused(trained, tmp_path):
    run, _ = trained
    other = tmp_path / "other"
    tok = Tokenizer.load(run / "tokenizer")
    ranks = dict(tok.mergeable_ranks)
    a, b = [k for k, v in ranks.items() if v in (300, 301)]
    ranks[a], ranks[b] = ranks[b], ranks[a]  # same size, different merges
    Tokenizer(ranks, tok.pattern, list(tok.special_tokens), name="bpe8k").save(other)
    with pytest.raises(TokenizerMismatch, match="was trained with tokenizer 'bpe8k'.*use the checkpoint's tokenizer"):
        load_model(run, tokenizer_dir=other)


def test_missing_tokenizer_names_what_was_expected(trained, tmp_path):
    run, _ = trained
    copy = tmp_path / "run"
    shutil.copytree(run, copy, symlinks=True, ignore=shutil.ignore_patterns("tokenizer"))
    meta_path = copy / "checkpoints" / "latest" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["tokenizer"]["path"] = str(tmp_path / "nowhere")
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(TokenizerMismatch) as e:
        load_model(copy)
    msg = str(e.value)
    assert "tokenizer 'bpe8k' (fingerprint" in msg and str(tmp_path / "nowhere") in msg and "tokenizer_dir=" in msg


def test_architecture_is_the_checkpoints(trained):
    run, _ = trained
    meta = json.loads((run / "checkpoints" / "latest" / "meta.json").read_text())
    cfg = model_config_from_meta(meta)
    assert cfg.depth == 2 and cfg.sequence_len == 128
    with pytest.raises(Exception, match="architecture fields"):
        load_model(run, overrides={"depth": 4})
    model, _, _ = load_model(run, overrides={"qkv_matmul": "separate"})  # a kernel choice may change
    assert model.config.qkv_matmul == "separate"
    wider = ModelConfig(**{**meta["model_config"], "softcap": 10.0})
    with pytest.raises(Exception, match=r"model.softcap: checkpoint 15.0, config 10.0"):
        check_architecture(meta, wider, 8192, "ckpt")


def test_load_weights_checks_before_loading(trained):
    run, _ = trained
    meta = json.loads((run / "checkpoints" / "latest" / "meta.json").read_text())
    cfg = model_config_from_meta(meta)
    tok = Tokenizer.load(run / "tokenizer")
    from chatlm.runtime.model_loading import build_model

    model = build_model(cfg, tok.vocab_size, "cpu", torch.float32, "sdpa")
    got = load_weights(model, run, model_cfg=cfg, tokenizer=tok)
    assert got["step"] == 5
    small = Tokenizer.load(LEGACY / "tokenizer" / "bpe300")
    with pytest.raises(TokenizerMismatch):
        load_weights(model, run, model_cfg=cfg, tokenizer=small)


def test_training_continues_a_legacy_checkpoint(tmp_path):
    """resume=<checkpoint written by 902ac35>: model, optimizer, loader and RNG state load, and the
    run carries on from step 2 to step 4 with finite losses."""
    data = tmp_path / "data"
    shutil.copytree(LEGACY / "data", data)
    env = stage_env(tmp_path)
    args = [
        "debug=smoke",
        "tokenizer.name=bpe300",
        "tokenizer.vocab_size=300",
        f"tokenizer.dir={LEGACY / 'tokenizer' / 'bpe300'}",
        "data.sources.0.kind=local",
        f"data.sources.0.path={data}",
        "data.doc_buffer=8",
        "model.sequence_len=64",
        "total_batch_size=256",
        "steps=4",
        "eval_tokens=256",
        f"resume={LEGACY / 'run' / 'checkpoints' / 'step_000002'}",
    ]
    run = train_once(tmp_path, env, *args)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [row["step"] for row in rows if "loss" in row]
    assert steps == [3, 4] and all(0 < row["loss"] < 10 for row in rows if "loss" in row)
    assert json.loads((run / "checkpoints" / "latest" / "meta.json").read_text())["tokenizer"]["name"] == "bpe300"
