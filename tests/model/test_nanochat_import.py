"""`chatlm convert nanochat`: a chatlm GPT written in nanochat's checkpoint format, imported back."""

import json

import pytest
import torch

from chatlm.cli import main
from chatlm.config import ModelConfig
from chatlm.model import GPT
from chatlm.model import nanochat_import as ni
from chatlm.model.sizing import derive_dims
from chatlm.runtime.checkpoint import load_checkpoint

VOCAB = 100  # padded to 128


def tiny_model(seed=0, **kw) -> GPT:
    # T=512 -> nanochat's S window 128, so the windows really differ between layers
    base = dict(name="tiny", depth=4, aspect_ratio=16, head_dim=16, n_kv_head=2, sequence_len=512)
    base.update(kw)
    torch.manual_seed(seed)
    with torch.device("meta"):
        model = GPT(ModelConfig(**base), VOCAB, attention_backend="sdpa")
    model.to_empty(device="cpu")
    model.init_weights()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_((0.05 * torch.randn(p.shape, generator=g)).to(p.dtype))
        model.smear_lambda.fill_(0.7)
        model.backout_lambda.fill_(0.3)
    return model


def nanochat_config(model: GPT) -> dict:
    d = model.dims
    return {
        "sequence_len": d.sequence_len,
        "vocab_size": d.vocab_size,
        "n_layer": d.n_layer,
        "n_head": d.n_head,
        "n_kv_head": d.n_kv_head,
        "n_embd": d.n_embd,
        "window_pattern": model.config.window_pattern,
    }


def write_nanochat(dirpath, model: GPT, step=10, config=None, state=None, bf16_embeddings=True):
    """model_<step>.pt + meta_<step>.json as nanochat's checkpoint_manager writes them."""
    dirpath.mkdir(parents=True, exist_ok=True)
    if state is None:
        state = ni.to_nanochat_state_dict(model.state_dict())
        if bf16_embeddings:  # nanochat stores wte and value embeddings in bf16
            state = {k: (v.to(torch.bfloat16) if "wte" in k or "value_embeds" in k else v) for k, v in state.items()}
        state = {"_orig_mod." + k: v for k, v in state.items()}
    torch.save(state, dirpath / f"model_{step:06d}.pt")
    meta = {
        "step": step,
        "val_bpb": 1.23,
        "model_config": config or nanochat_config(model),
        "user_config": {"depth": model.dims.n_layer},
        "device_batch_size": 4,
        "max_seq_len": 512,
    }
    (dirpath / f"meta_{step:06d}.json").write_text(json.dumps(meta))
    return state


def test_state_dict_names_are_nanochats():
    model = tiny_model()
    names = set(ni.to_nanochat_state_dict(model.state_dict()))
    assert {
        "transformer.wte.weight",
        "transformer.h.0.attn.c_q.weight",
        "transformer.h.3.mlp.c_proj.weight",
        "transformer.h.1.attn.ve_gate.weight",
        "value_embeds.3.weight",
        "lm_head.weight",
        "resid_lambdas",
        "x0_lambdas",
        "smear_gate.weight",
        "smear_lambda",
        "backout_lambda",
    } <= names
    assert not any(k.startswith("blocks.") for k in names)
    for k in model.state_dict():
        assert ni.chatlm_key(ni.nanochat_key(k)) == k


def test_convert_via_cli_gives_identical_logits(tmp_path, capsys):
    model = tiny_model()
    src = tmp_path / "d4"
    write_nanochat(src, model, step=5, bf16_embeddings=False)
    write_nanochat(src, model, step=10, bf16_embeddings=False)
    out = tmp_path / "imported"
    assert main(["convert", "nanochat", str(src), str(out)]) == 0
    step_dir = out / "checkpoints" / "step_000010"
    assert capsys.readouterr().out.strip() == str(step_dir)

    ck = load_checkpoint(out, parts=("model",))
    meta = ck["meta"]
    assert meta["source"] == "nanochat" and meta["step"] == 10 and meta["vocab_size"] == VOCAB
    cfg = ModelConfig(**meta["model_config"])
    assert (cfg.depth, cfg.head_dim, cfg.n_kv_head, cfg.sequence_len, cfg.short_window) == (4, 16, 2, 512, None)
    with torch.device("meta"):
        loaded = GPT(cfg, meta["vocab_size"], attention_backend="sdpa")
    loaded.to_empty(device="cpu")
    loaded.load_state_dict(ck["model"], strict=True)
    loaded.init_rotary()
    assert loaded.dims == model.dims
    idx = torch.randint(0, VOCAB, (2, 300))
    with torch.no_grad():
        assert torch.equal(loaded(idx), model(idx))


def test_convert_step_option_and_bf16_embeddings(tmp_path):
    model = tiny_model()
    src = tmp_path / "d4"
    write_nanochat(src, model, step=10)
    write_nanochat(src, tiny_model(seed=5), step=20)
    step_dir = ni.import_nanochat(src, tmp_path / "out", step=10)
    assert step_dir.name == "step_000010"
    ck = load_checkpoint(step_dir, parts=("model",))
    assert ck["model"]["wte.weight"].dtype == torch.bfloat16
    assert ck["model"]["smear_lambda"].shape == torch.Size([])
    loaded = GPT(ModelConfig(**ck["meta"]["model_config"]), VOCAB, attention_backend="sdpa")
    loaded.load_state_dict(ck["model"], strict=True)
    with torch.no_grad():
        model.wte.weight.copy_(model.wte.weight.to(torch.bfloat16).float())
        for emb in model.value_embeds.values():
            emb.weight.copy_(emb.weight.to(torch.bfloat16).float())
        idx = torch.randint(0, VOCAB, (1, 64))
        assert torch.equal(loaded(idx), model(idx))


def test_missing_meta_field_is_named(tmp_path, capsys):
    model = tiny_model()
    cfg = nanochat_config(model)
    del cfg["window_pattern"]
    write_nanochat(tmp_path / "old", model, config=cfg)
    assert main(["convert", "nanochat", str(tmp_path / "old"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "'window_pattern'" in err and "meta_000010.json" in err
    assert not (tmp_path / "out").exists()


def test_unknown_meta_field_is_named(tmp_path):
    model = tiny_model()
    cfg = dict(nanochat_config(model), engram_enabled=True)
    write_nanochat(tmp_path / "fork", model, config=cfg)
    with pytest.raises(ni.NanochatImportError, match="unknown field.*'engram_enabled'"):
        ni.import_nanochat(tmp_path / "fork", tmp_path / "out")


def test_unknown_and_missing_keys_are_named(tmp_path):
    model = tiny_model()
    state = {"_orig_mod." + k: v for k, v in ni.to_nanochat_state_dict(model.state_dict()).items()}
    state["_orig_mod.transformer.h.0.attn.extra_gate.weight"] = torch.zeros(2, 2)
    del state["_orig_mod.value_embeds.1.weight"]
    write_nanochat(tmp_path / "x", model, state=state)
    with pytest.raises(ni.NanochatImportError) as e:
        ni.import_nanochat(tmp_path / "x", tmp_path / "out")
    msg = str(e.value)
    assert "unknown key(s) transformer.h.0.attn.extra_gate.weight" in msg
    assert "missing key(s) value_embeds.1.weight" in msg


def test_pre_value_embedding_checkpoint_fails(tmp_path):
    model = tiny_model()
    state = {
        k: v
        for k, v in ni.to_nanochat_state_dict(model.state_dict()).items()
        if "value_embeds" not in k and "ve_gate" not in k and "smear" not in k and "backout" not in k
    }
    write_nanochat(tmp_path / "jan", model, state=state)
    with pytest.raises(ni.NanochatImportError, match="missing key.*value_embeds.1.weight"):
        ni.import_nanochat(tmp_path / "jan", tmp_path / "out")


def test_shape_mismatch_is_named(tmp_path):
    model = tiny_model()
    cfg = dict(nanochat_config(model), vocab_size=300)  # tables are 128 rows, config says 320
    write_nanochat(tmp_path / "v", model, config=cfg)
    with pytest.raises(
        ni.NanochatImportError, match=r"transformer.wte.weight has shape \(128, 64\), expected \(320, 64\)"
    ):
        ni.import_nanochat(tmp_path / "v", tmp_path / "out")


def test_not_a_checkpoint_dir(tmp_path):
    with pytest.raises(ni.NanochatImportError, match="no model_<step>.pt"):
        ni.import_nanochat(tmp_path, tmp_path / "out")
    (tmp_path / "model_000003.pt").write_bytes(b"")
    with pytest.raises(ni.NanochatImportError, match="meta_000003.json is missing"):
        ni.import_nanochat(tmp_path, tmp_path / "out")
    with pytest.raises(ni.NanochatImportError, match="no checkpoint for step 7"):
        ni.import_nanochat(tmp_path, tmp_path / "out", step=7)


@pytest.mark.parametrize(
    "nc, expect",
    [
        # nanochat d24: C=1536, 12 heads of 128
        (
            dict(n_layer=24, n_embd=1536, n_head=12, n_kv_head=12),
            dict(depth=24, aspect_ratio=64, head_dim=128, n_kv_head=None),
        ),
        # odd depth, width rounded up to the head dim (d25 -> 1664, 13 heads)
        (
            dict(n_layer=25, n_embd=1664, n_head=13, n_kv_head=13),
            dict(depth=25, aspect_ratio=66, head_dim=128, n_kv_head=None),
        ),
        # hand-written GQA config, width not a multiple of depth
        (dict(n_layer=5, n_embd=64, n_head=4, n_kv_head=2), dict(depth=5, aspect_ratio=12, head_dim=16, n_kv_head=2)),
    ],
)
def test_config_mapping(nc, expect):
    full = dict(sequence_len=2048, vocab_size=32768, window_pattern="SSSL", **nc)
    cfg = ni.model_config_from_nanochat(full)
    for k, v in expect.items():
        assert getattr(cfg, k) == v, k
    from chatlm.model.sizing import derive_dims

    d = derive_dims(cfg)
    assert (d.n_layer, d.n_embd, d.n_head, d.n_kv_head, d.short_window) == (
        nc["n_layer"],
        nc["n_embd"],
        nc["n_head"],
        nc["n_kv_head"],
        512,
    )


def test_config_mapping_errors():
    base = dict(sequence_len=2048, vocab_size=32768, window_pattern="SSSL", n_kv_head=4)
    with pytest.raises(ni.NanochatImportError, match="cannot be expressed"):
        ni.model_config_from_nanochat(dict(base, n_layer=40, n_embd=64, n_head=4))
    with pytest.raises(ni.NanochatImportError, match="n_head=6 is not divisible by n_kv_head=4"):
        ni.model_config_from_nanochat(dict(base, n_layer=4, n_embd=96, n_head=6))
    with pytest.raises(ni.NanochatImportError, match="window_pattern"):
        ni.model_config_from_nanochat(dict(base, n_layer=4, n_embd=64, n_head=4, window_pattern="SXL"))
    with pytest.raises(ni.NanochatImportError, match="n_layer must be a positive integer"):
        ni.model_config_from_nanochat(dict(base, n_layer="4", n_embd=64, n_head=4))


def nanochat_window(long_window: int) -> int:
    """nanochat's expression for the short window, verbatim: the unary minus binds first."""
    return -(-long_window // 4 // 128) * 128


@pytest.mark.parametrize("T", [64, 100, 128, 513, 1025, 2048, 2049, 4096])
def test_short_window_follows_nanochat(T):
    # ceil(T / 512) * 128, not ceil(floor(T / 4) / 128) * 128: T=2049 -> 640, T=513 -> 256; and not
    # capped at T: T=64 -> 128
    cfg = ni.model_config_from_nanochat(
        dict(sequence_len=T, vocab_size=64, window_pattern="SL", n_layer=2, n_embd=256, n_head=2, n_kv_head=2)
    )
    assert cfg.short_window is None  # derived, as nanochat derives it
    assert derive_dims(cfg).windows[0] == nanochat_window(T)
    assert {513: 256, 1025: 384, 2049: 640, 64: 128}.get(T, nanochat_window(T)) == nanochat_window(T)


def test_converted_checkpoint_with_a_tokenizer_loads_through_load_model(tmp_path):
    from chatlm.config import TokenizerConfig
    from chatlm.runtime.model_loading import TokenizerMismatch, load_model
    from chatlm.tokenizer import train_tokenizer
    from tests.tokenizer.conftest import make_corpus

    vocab = 300  # a real BPE has at least 256 bytes + 9 special tokens
    torch.manual_seed(0)
    with torch.device("meta"):
        model = GPT(ModelConfig(name="tiny", depth=2, aspect_ratio=32, head_dim=32, sequence_len=64), vocab)
    model.to_empty(device="cpu")
    model.init_weights()
    src = tmp_path / "d2"
    write_nanochat(src, model, step=10, bf16_embeddings=False)
    with pytest.raises(TokenizerMismatch, match="imported from nanochat.*pass tokenizer_dir="):
        load_model(ni.import_nanochat(src, tmp_path / "bare"))
    tok = train_tokenizer(make_corpus(300, seed=1), TokenizerConfig(name="t", vocab_size=vocab))
    tok.save(tmp_path / "tok")
    assert main(["convert", "nanochat", str(src), str(tmp_path / "out"), "--tokenizer", str(tmp_path / "tok")]) == 0
    loaded, loaded_tok, meta = load_model(tmp_path / "out")
    assert loaded_tok.fingerprint == tok.fingerprint and meta["tokenizer"]["sha256"] == tok.fingerprint
    idx = torch.randint(0, vocab, (2, 16))
    with torch.no_grad():
        assert torch.allclose(loaded(idx), model(idx), atol=1e-5)
