"""Checkpoints: full round trip, atomicity under crashes, retention, leftovers, error messages."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from chatlm.optim.muon_adamw import MuonAdamW
from chatlm.runtime import checkpoint as ckpt
from chatlm.runtime.checkpoint import CheckpointError

REPO = Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------------------------------------
# helpers


class Tiny(torch.nn.Module):
    def __init__(self, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.wte = torch.nn.Parameter(torch.randn(16, 8, generator=g))
        self.h = torch.nn.ParameterList([torch.nn.Parameter(torch.randn(8, 8, generator=g)) for _ in range(3)])
        self.head = torch.nn.Parameter(torch.randn(16, 8, generator=g))


def make_optim(model: Tiny) -> MuonAdamW:
    return MuonAdamW(
        [
            {
                "kind": "adamw",
                "params": [model.wte, model.head],
                "lr": 0.01,
                "betas": (0.8, 0.95),
                "eps": 1e-10,
                "weight_decay": 0.0,
            },
            {"kind": "muon", "params": list(model.h), "lr": 0.02, "momentum": 0.95, "weight_decay": 0.1},
        ]
    )


def train_steps(model: Tiny, opt: MuonAdamW, n: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()


def draws() -> tuple:
    return random.random(), random.gauss(0, 1), np.random.rand(3).tolist(), np.random.randn(), torch.rand(4).tolist()


META = {
    "config_hash": "abc123",
    "model_config": {"depth": 2, "n_embd": 8},
    "derived": {"batch": (4, 8)},
    "loop": {"min_val_bpb": float("inf"), "smooth_loss": 2.5, "train_time": 12.0},
}


def save(run_dir: Path, step: int, model: torch.nn.Module | None = None, world_size: int = 1, **kw) -> Path:
    model = model if model is not None else Tiny(step)
    loaders = [{"rank": r, "tokens": np.arange(5, dtype=np.int32), "position": (0, r)} for r in range(world_size)]
    rngs = [ckpt.capture_rng_state() for _ in range(world_size)]
    return ckpt.save_checkpoint(
        run_dir,
        step,
        model_state=model.state_dict(),
        optim_state={"state": {}, "param_groups": []},
        loader_states=loaders,
        rng_states=rngs,
        meta=dict(META, world_size=world_size),
        **kw,
    )


def visible_steps(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith("step_"))


def hidden(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith("."))


def latest_name(run_dir: Path) -> str:
    return os.readlink(run_dir / "checkpoints" / "latest")


# ----------------------------------------------------------------------------------------------
# round trip


def test_round_trip_of_every_part(tmp_path):
    torch.manual_seed(0)
    model = Tiny(1)
    opt = make_optim(model)
    train_steps(model, opt, 2, seed=3)
    random.seed(5)
    np.random.seed(6)
    torch.manual_seed(7)
    random.gauss(0, 1)  # leaves a cached gauss_next in the python state
    rng = ckpt.capture_rng_state()
    expected = draws()
    loader_states = [
        {
            "version": 1,
            "rank": r,
            "position": (2, r),
            "packer": {"lengths": np.array([2, 3]), "tokens": np.arange(5, dtype=np.int32), "docs_in": np.int64(9)},
            "pending_rows": None,
        }
        for r in range(2)
    ]
    path = ckpt.save_checkpoint(
        tmp_path,
        42,
        model_state=model.state_dict(),
        optim_state=opt.full_state_dict(),
        loader_states=loader_states,
        rng_states=[rng, rng],
        meta=dict(META, world_size=2),
    )
    assert path == tmp_path / "checkpoints" / "step_000042"
    assert sorted(p.name for p in path.iterdir()) == ["loader.pt", "meta.json", "model.pt", "optim.pt", "rng.pt"]
    assert latest_name(tmp_path) == "step_000042"

    state = ckpt.load_checkpoint(tmp_path)
    assert state["path"] == path.resolve()
    meta = state["meta"]
    assert meta["step"] == 42 and meta["world_size"] == 2 and meta["config_hash"] == "abc123"
    assert meta["loop"]["min_val_bpb"] == float("inf") and meta["derived"]["batch"] == [4, 8]
    assert meta["chatlm_version"] and meta["time"] and set(meta["files"]) == set(ckpt.FILES)

    # model
    clone = Tiny(99)
    clone.load_state_dict(state["model"])
    for a, b in zip(model.parameters(), clone.parameters()):
        assert torch.equal(a, b)
    # optimizer: identical next step from the reloaded state
    opt2 = make_optim(clone)
    opt2.load_full_state_dict(state["optim"])
    train_steps(model, opt, 1, seed=11)
    train_steps(clone, opt2, 1, seed=11)
    for a, b in zip(model.parameters(), clone.parameters()):
        assert torch.equal(a, b)
    # loader: numpy became tensors, everything else as given
    assert len(state["loader"]) == 2
    ld = state["loader"][1]
    assert ld["position"] == (2, 1) and ld["packer"]["docs_in"] == 9 and type(ld["packer"]["docs_in"]) is int
    assert isinstance(ld["packer"]["tokens"], torch.Tensor) and ld["packer"]["tokens"].dtype == torch.int32
    assert ld["packer"]["tokens"].tolist() == [0, 1, 2, 3, 4]
    # RNG: restore, then the same draws as right after the capture
    draws()
    ckpt.restore_rng_state(state["rng"][0])
    assert draws() == expected


def test_every_file_loads_with_weights_only(tmp_path):
    model = Tiny(0)
    opt = make_optim(model)
    train_steps(model, opt, 1, seed=0)
    path = ckpt.save_checkpoint(
        tmp_path,
        1,
        model_state=model.state_dict(),
        optim_state=opt.full_state_dict(),
        loader_states=[{"a": np.zeros(3, np.uint32), "b": np.float32(1.5)}],
        rng_states=[ckpt.capture_rng_state()],
        meta=META,
    )
    for name in ckpt.FILES:
        obj = torch.load(path / name, weights_only=True)
        assert obj is not None
    loader = torch.load(path / "loader.pt", weights_only=True)[0]
    assert loader["a"].dtype == torch.int64 and loader["b"] == 1.5  # unsigned widened, scalar -> float


def test_compiled_prefix_is_stripped_and_unstorable_values_fail_before_writing(tmp_path):
    state = {"_orig_mod.w": torch.ones(2), "b": torch.zeros(1)}
    path = ckpt.save_checkpoint(
        tmp_path, 1, model_state=state, optim_state={}, loader_states=[{}], rng_states=[{}], meta={}
    )
    assert set(torch.load(path / "model.pt", weights_only=True)) == {"w", "b"}
    with pytest.raises(TypeError, match=r"loader\[0\]\['x'\]"):
        ckpt.save_checkpoint(
            tmp_path, 2, model_state={}, optim_state={}, loader_states=[{"x": object()}], rng_states=[{}], meta={}
        )
    assert visible_steps(tmp_path) == ["step_000001"] and hidden(tmp_path) == []


# ----------------------------------------------------------------------------------------------
# the loader state survives a save/load and resumes the exact stream


@pytest.fixture(scope="module")
def tok_and_shards(tmp_path_factory):
    from chatlm.config import TokenizerConfig
    from chatlm.data.shards import list_shards, write_shards
    from chatlm.tokenizer import train_tokenizer

    rng = random.Random(0)
    words = "alpha beta gamma delta model token train data loss rate batch layer the of and to".split()
    docs = [f"doc{i} " + " ".join(rng.choice(words) for _ in range(rng.randint(5, 40))) for i in range(200)]
    tok = train_tokenizer(docs, TokenizerConfig(name="t", vocab_size=300))
    out = tmp_path_factory.mktemp("shards")
    write_shards(docs, out, docs_per_row_group=10, row_groups_per_shard=4)
    train, _val = list_shards(out)
    return tok, train


@pytest.mark.parametrize("include_last_batch", [False, True])
def test_loader_state_round_trips_into_pretrain_loader(tmp_path, tok_and_shards, include_last_batch):
    from chatlm.data.loader import PretrainLoader

    tok, train = tok_and_shards
    B, T, W = 2, 16, 2
    loaders = [PretrainLoader(train, tok, B, T, rank=r, world_size=W, buffer_size=20, threads=1) for r in range(W)]
    for ld in loaders:
        for _ in range(3):
            ld.next_batch()
    states = [ld.state_dict(include_last_batch=include_last_batch) for ld in loaders]
    if include_last_batch:
        assert states[0]["pending_rows"] is not None  # the array path is exercised
    ckpt.save_checkpoint(
        tmp_path,
        3,
        model_state={},
        optim_state={},
        loader_states=states,
        rng_states=[{}, {}],
        meta=dict(META, world_size=W),
    )
    loaded = ckpt.load_checkpoint(tmp_path, parts=("loader",))["loader"]
    assert loaded[0]["packer"]["tokens"].__class__ is torch.Tensor
    for r in range(W):
        resumed = PretrainLoader(train, tok, B, T, rank=r, world_size=W, buffer_size=20, threads=1, state=loaded[r])
        if include_last_batch:
            # the replayed batch is the one the original loader produced last
            assert np.array_equal(resumed.next_rows(), states[r]["pending_rows"])
        for _ in range(4):
            x0, y0 = (t.clone() for t in loaders[r].next_batch())
            x1, y1 = resumed.next_batch()
            assert torch.equal(x0, x1) and torch.equal(y0, y1)


# ----------------------------------------------------------------------------------------------
# atomicity


def test_latest_moves_only_after_the_step_dir_is_complete(tmp_path, monkeypatch):
    save(tmp_path, 1)
    seen = []
    original = ckpt._swap_link

    def checking_swap(link, target_name):
        step_dir = link.parent / target_name
        seen.append((latest_name(tmp_path), sorted(p.name for p in step_dir.iterdir())))
        ckpt.load_checkpoint(step_dir)  # complete and loadable before the link moves
        original(link, target_name)

    monkeypatch.setattr(ckpt, "_swap_link", checking_swap)
    save(tmp_path, 2)
    assert seen == [("step_000001", ["loader.pt", "meta.json", "model.pt", "optim.pt", "rng.pt"])]
    assert latest_name(tmp_path) == "step_000002"
    assert not os.path.isabs(latest_name(tmp_path))


def test_failed_write_leaves_previous_checkpoint(tmp_path, monkeypatch):
    save(tmp_path, 1, Tiny(1))
    real_save = torch.save
    calls = []

    def failing_save(obj, f, *a, **kw):
        calls.append(getattr(f, "name", f))
        if str(calls[-1]).endswith("optim.pt"):
            f.write(b"PK\x03\x04 half a zip")
            raise OSError(28, "No space left on device")
        return real_save(obj, f, *a, **kw)

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="No space"):
        save(tmp_path, 2, Tiny(2))
    monkeypatch.setattr(torch, "save", real_save)
    assert visible_steps(tmp_path) == ["step_000001"] and hidden(tmp_path) == []
    assert latest_name(tmp_path) == "step_000001"
    state = ckpt.load_checkpoint(tmp_path)
    assert torch.equal(state["model"]["wte"], Tiny(1).wte.detach())


_WRITER = textwrap.dedent("""
    import sys, torch
    from chatlm.runtime import checkpoint as ckpt
    run_dir = sys.argv[1]
    def save(step, big):
        g = torch.Generator().manual_seed(step)
        model = {f"w{i}": torch.randn(big, generator=g) for i in range(4)}
        ckpt.save_checkpoint(run_dir, step, model_state=model, optim_state={"m": model["w0"] * 2},
                             loader_states=[{"step": step}], rng_states=[ckpt.capture_rng_state()],
                             meta={"loop": {"step": step}})
    save(1, 16)
    print("ready", flush=True)
    step = 2
    while True:
        save(step, 1_000_000)  # 16 MB per checkpoint
        print("saved", step, flush=True)
        step += 1
""")


def test_sigkill_mid_write_leaves_a_loadable_latest(tmp_path):
    seed = int(time.time() * 1000) % 100000
    rng = random.Random(seed)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO / "src"))
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(tmp_path)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.05, 1.0))
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    # after the kill: `latest` is a complete checkpoint; every visible step dir is complete too
    state = ckpt.load_checkpoint(tmp_path)
    step = state["meta"]["step"]
    assert state["loader"] == [{"step": step}], f"seed {seed}"
    assert torch.equal(state["optim"]["m"], state["model"]["w0"] * 2), f"seed {seed}"
    for name in visible_steps(tmp_path):
        ckpt.load_checkpoint(tmp_path / "checkpoints" / name)
    assert int(latest_name(tmp_path).split("_")[1]) >= max(int(n.split("_")[1]) for n in visible_steps(tmp_path)) - 1
    # the next save removes whatever the killed write left behind
    save(tmp_path, 1000)
    assert hidden(tmp_path) == [], f"seed {seed}"
    assert latest_name(tmp_path) == "step_001000"


def test_leftovers_are_cleaned_on_next_save(tmp_path):
    save(tmp_path, 1)
    ck = tmp_path / "checkpoints"
    (ck / ".step_000002.tmp-99999").mkdir()
    (ck / ".step_000002.tmp-99999" / "model.pt").write_bytes(b"partial")
    (ck / ".step_000001.del-99998").mkdir()
    os.symlink("step_000001", ck / ".latest.99997.tmp")
    assert visible_steps(tmp_path) == ["step_000001"]
    assert ckpt.find_checkpoint(tmp_path) == (ck / "step_000001").resolve()  # leftovers are invisible
    save(tmp_path, 3)
    assert hidden(tmp_path) == [] and visible_steps(tmp_path) == ["step_000001", "step_000003"]


def test_same_step_is_replaced_and_an_interrupted_replacement_is_restored(tmp_path):
    save(tmp_path, 1, Tiny(1))
    save(tmp_path, 2, Tiny(2))
    save(tmp_path, 2, Tiny(22))
    assert visible_steps(tmp_path) == ["step_000001", "step_000002"] and hidden(tmp_path) == []
    assert torch.equal(ckpt.load_checkpoint(tmp_path)["model"]["wte"], Tiny(22).wte.detach())
    # a kill between the two renames of a replacement: step_2 moved aside, latest dangles
    ck = tmp_path / "checkpoints"
    os.replace(ck / "step_000002", ck / ".step_000002.old-4242")
    assert ckpt.find_checkpoint(tmp_path) == (ck / "step_000001").resolve()  # falls back to newest complete
    save(tmp_path, 3)
    assert visible_steps(tmp_path) == ["step_000001", "step_000002", "step_000003"] and hidden(tmp_path) == []


# ----------------------------------------------------------------------------------------------
# retention


def test_keep_last(tmp_path):
    for step in range(1, 6):
        save(tmp_path, step * 10, keep_last=2)
    assert visible_steps(tmp_path) == ["step_000040", "step_000050"] and hidden(tmp_path) == []
    assert latest_name(tmp_path) == "step_000050"
    # never the one `latest` points to, even when it is older than the newest k
    ck = tmp_path / "checkpoints"
    os.remove(ck / "latest")
    os.symlink("step_000040", ck / "latest")
    ckpt.prune_checkpoints(ck, 1)
    assert visible_steps(tmp_path) == ["step_000040", "step_000050"]
    with pytest.raises(ValueError):
        save(tmp_path, 60, keep_last=0)


# ----------------------------------------------------------------------------------------------
# finding and errors


def test_find_checkpoint_accepts_run_checkpoints_and_step_dirs(tmp_path):
    save(tmp_path, 1)
    save(tmp_path, 2)
    ck = tmp_path / "checkpoints"
    step2 = (ck / "step_000002").resolve()
    assert ckpt.find_checkpoint(tmp_path) == step2
    assert ckpt.find_checkpoint(ck) == step2
    assert ckpt.find_checkpoint(ck / "latest") == step2
    assert ckpt.find_checkpoint(str(ck / "step_000001")) == (ck / "step_000001").resolve()
    assert ckpt.latest_checkpoint(tmp_path) == step2
    assert ckpt.latest_checkpoint(tmp_path / "elsewhere") is None
    assert [s for s, _ in ckpt.list_checkpoints(ck)] == [1, 2]


def test_error_no_checkpoint_says_where_it_looked(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        ckpt.find_checkpoint(tmp_path / "missing")
    (tmp_path / "run").mkdir()
    with pytest.raises(CheckpointError, match=r"looked for .*run/checkpoints/latest"):
        ckpt.load_checkpoint(tmp_path / "run")
    (tmp_path / "run" / "checkpoints").mkdir()
    with pytest.raises(CheckpointError, match=r"no checkpoint found in .*run/checkpoints"):
        ckpt.find_checkpoint(tmp_path / "run")


def test_error_missing_file(tmp_path):
    save(tmp_path, 1)
    path = save(tmp_path, 2)
    (path / "optim.pt").unlink()
    with pytest.raises(CheckpointError) as e:
        ckpt.load_checkpoint(tmp_path)
    msg = str(e.value)
    assert "optim.pt is missing" in msg and "step_000001" in msg and "resume=" in msg


def test_error_truncated_file_names_it_and_suggests_previous_step(tmp_path):
    save(tmp_path, 1)
    save(tmp_path, 2)
    path = save(tmp_path, 3)
    model_pt = path / "model.pt"
    data = model_pt.read_bytes()
    model_pt.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as e:
        ckpt.load_checkpoint(tmp_path)
    msg = str(e.value)
    assert "model.pt is truncated" in msg and "step_000001, step_000002" in msg
    assert f"resume={tmp_path / 'checkpoints' / 'step_000002'}" in msg
    # a truncation that meta.json cannot see (sizes not recorded) still fails in torch.load, clearly
    meta = json.loads((path / "meta.json").read_text())
    del meta["files"]
    (path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"model\.pt cannot be loaded"):
        ckpt.load_checkpoint(tmp_path)


def test_error_corrupt_file_of_the_right_size(tmp_path):
    path = save(tmp_path, 1)
    rng_pt = path / "rng.pt"
    rng_pt.write_bytes(os.urandom(rng_pt.stat().st_size))
    with pytest.raises(CheckpointError) as e:
        ckpt.load_checkpoint(tmp_path)
    assert "rng.pt cannot be loaded" in str(e.value) and "no earlier checkpoint exists" in str(e.value)


def test_error_unreadable_meta(tmp_path):
    save(tmp_path, 1)
    path = save(tmp_path, 2)
    (path / "meta.json").write_text('{"step": 2, "world_')
    with pytest.raises(CheckpointError, match=r"meta\.json is unreadable.*step_000001"):
        ckpt.load_checkpoint(tmp_path)
    (path / "meta.json").unlink()
    with pytest.raises(CheckpointError, match=r"meta\.json is missing"):
        ckpt.load_checkpoint(path)
