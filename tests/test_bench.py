"""`python -m chatlm.bench` on the CPU with the tiny model: the JSON's numbers agree with each other."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from chatlm import config as C
from chatlm.bench.attention_bench import attended_pairs, reference_attention
from chatlm.config.tree import group_options
from chatlm.hydra.app import to_typed
from chatlm.model import GPT
from chatlm.model.attention import window_mask
from chatlm.runtime.flops import train_flops_per_token

from .conftest import REPO, load_record, run_dirs

TINY = ["model=tiny", "hardware=cpu", "model.vocab_size=512"]


def _bench_json(tmp_path: Path, run_name: str) -> tuple[dict, Path]:
    dirs = [d for d in run_dirs(tmp_path / "outputs", "bench") if d.name.endswith(run_name)]
    assert len(dirs) == 1, dirs
    return json.loads((dirs[0] / "bench.json").read_text()), dirs[0]


def test_train_task_numbers_are_consistent(run_stage, tmp_path):
    # 2 x 128 tokens per micro-batch, 2 accumulation steps; 6 steps of which 2 are warm-up
    p = run_stage(
        "bench",
        *TINY,
        "steps=6",
        "warmup_steps=2",
        "hardware.device_batch_size=2",
        "total_batch_size=512",
        "hardware.peak_flops=1e12",
        "hardware.measured_flops=4e11",
    )
    assert p.returncode == 0, p.stderr[-3000:]
    r, run_dir = _bench_json(tmp_path, "train_tiny")

    assert (r["task"], r["device"], r["attention_backend"], r["compile"], r["dtype"], r["fp8"]) == (
        "train",
        "cpu",
        "sdpa",
        False,
        "float32",
        False,
    )
    assert (r["tokens_per_step"], r["device_batch_size"], r["seq_len"], r["grad_accum"]) == (512, 2, 128, 2)
    # every step was timed, the warm-up ones are left out of the statistics
    assert r["steps"] == 6 and len(r["step_times_s"]) == 6 and len(r["losses"]) == 6
    timed = r["step_times_s"][2:]
    assert r["timed_steps"] == 4 == len(timed)
    assert r["median_step_s"] == pytest.approx(statistics.median(timed), rel=1e-12)
    assert r["min_step_s"] == min(timed) and r["max_step_s"] == max(timed)
    assert r["first_step_s"] == r["step_times_s"][0]
    assert r["tok_per_s"] == pytest.approx(r["tokens_per_step"] / r["median_step_s"], rel=1e-9)
    # FLOPs/token is the model's own count (flops.py's formula), MFU divides by the configured peaks
    with torch.device("meta"):
        model = GPT(
            C.ModelConfig(name="tiny", depth=2, aspect_ratio=32, head_dim=32, sequence_len=128, window_round=32), 512
        )
    d = model.dims
    assert (
        r["flops_per_token"]
        == model.flops_per_token()
        == train_flops_per_token(model.num_matmul_params(), d.n_head, d.head_dim, d.windows, d.sequence_len)
    )
    assert r["peak_flops_nominal"] == 1e12 and r["ceiling"] is None
    assert r["mfu_nominal"] == pytest.approx(r["flops_per_token"] * r["tok_per_s"] / 1e12, rel=1e-9)
    assert (r["ceiling_flops"], r["ceiling_source"]) == (4e11, "hardware.measured_flops")
    assert r["mfu_measured"] == pytest.approx(r["mfu_nominal"] * 1e12 / 4e11, rel=1e-9)
    assert r["peak_mem_gib"] is None and r["losses_finite"]
    assert r["first_loss"] == pytest.approx(6.24, abs=0.1)  # ln(512): random ids, fresh model

    record = load_record(run_dir)
    assert record["status"] == "completed"
    assert record["final_metrics"]["tok_per_s"] == pytest.approx(r["tok_per_s"])
    assert "chatlm bench: train" in p.stdout and "tok/s" in p.stdout

    # the device script's summary reads the same file
    out = subprocess.run(
        [sys.executable, str(REPO / "launch/gpu/bench_summary.py"), str(run_dir / "bench.json")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert f"{r['tok_per_s']:,.0f} tok/s" in out


def test_train_task_without_peaks_reports_na(run_stage, tmp_path):
    p = run_stage("bench", *TINY, "steps=2", "warmup_steps=1", "hardware.device_batch_size=1", "total_batch_size=128")
    assert p.returncode == 0, p.stderr[-3000:]
    r, _ = _bench_json(tmp_path, "train_tiny")
    assert r["timed_steps"] == 1 and r["median_step_s"] == r["step_times_s"][1]
    assert r["mfu_nominal"] is None and r["mfu_measured"] is None and r["ceiling_flops"] is None


def test_attention_task_numbers_are_consistent(run_stage, tmp_path):
    p = run_stage(
        "bench", *TINY, "task=attention", "attn_batch_size=2", "attn_iters=3", "attn_warmup=1", "attn_check_rows=2"
    )
    assert p.returncode == 0, p.stderr[-3000:]
    r, _ = _bench_json(tmp_path, "attention_tiny")
    B, T, H, D = r["batch"], r["seq_len"], r["n_head"], r["head_dim"]
    assert (B, T, H, D, r["windows"]) == (2, 128, 2, 32, "SL")
    assert r["backends"] == ["sdpa"] and set(r["skipped"]) == {"fa4", "flex"}  # both need CUDA
    by_window = {e["window"]: e for e in r["results"]}
    assert sorted(by_window) == [32, 128] and all(e["layers"] == 1 for e in r["results"])
    for w, e in by_window.items():
        assert len(e["fwd_bwd_times_s"]) == 3
        assert e["fwd_bwd_s"] == pytest.approx(statistics.median(e["fwd_bwd_times_s"]), rel=1e-12)
        assert e["attended_pairs"] == int(window_mask(T, T, w, "cpu").sum())
        assert e["effective_flops"] == 14 * B * H * D * e["attended_pairs"]
        assert e["model_flops"] == 12 * H * D * min(w, T) * B * T
        assert e["effective_tflops"] == pytest.approx(e["effective_flops"] / e["fwd_bwd_s"] / 1e12, rel=1e-9)
        assert e["max_abs_err"] < 1e-4  # fp32 kernel against the fp32 reference
        assert set(e["errors"]) == {"out", "dq", "dk", "dv"}
    assert by_window[128]["attended_pairs"] == T * (T + 1) // 2  # the long window is full causal
    total = sum(e["fwd_bwd_s"] * e["layers"] for e in r["results"])
    assert r["model_attention_fwd_bwd_s"]["sdpa"] == pytest.approx(total, rel=1e-12)
    assert "chatlm bench: attention" in p.stdout


def test_loss_task_compares_each_kernel_with_the_plain_expression(run_stage, tmp_path):
    p = run_stage("bench", *TINY, "task=loss", "loss_batch_size=2", "loss_iters=3", "loss_warmup=1")
    assert p.returncode == 0, p.stderr[-3000:]
    r, _ = _bench_json(tmp_path, "loss_tiny")
    assert r["rows"] == 2 * r["seq_len"] and r["padded_vocab_size"] % 64 == 0
    by_variant = {e["variant"]: e for e in r["results"]}
    assert list(by_variant) == ["plain", "fused", "fused_logits"]
    for name, e in by_variant.items():
        assert len(e["fwd_bwd_times_s"]) == 3
        assert e["fwd_bwd_s"] == pytest.approx(statistics.median(e["fwd_bwd_times_s"]), rel=1e-12)
        assert e["loss"] == pytest.approx(by_variant["plain"]["loss"], rel=1e-5)
        if name != "plain":  # fp32 on CPU: the fused ops reproduce the plain loss and gradients
            assert e["loss_diff"] < 1e-5 and e["grad_x_rel"] < 1e-5 and e["grad_w_rel"] < 1e-5
    assert 5 < by_variant["plain"]["loss"] < 20  # logits with std ~4 over the vocabulary, softcapped
    assert "chatlm bench: loss head" in p.stdout


@pytest.mark.parametrize("T,w", [(16, 0), (16, 3), (16, 15), (16, 40), (7, 2)])
def test_attended_pairs_counts_the_mask(T, w):
    assert attended_pairs(T, w) == int(window_mask(T, T, w, "cpu").sum())


def test_reference_attention_matches_sdpa_with_gqa():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 9, 4, 8, generator=g)
    k, v = torch.randn(2, 9, 2, 8, generator=g), torch.randn(2, 9, 2, 8, generator=g)
    ref = reference_attention(q, k, v, window=3)
    mask = window_mask(9, 9, 3, "cpu")
    sdpa = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, enable_gqa=True
    ).transpose(1, 2)
    torch.testing.assert_close(ref, sdpa, rtol=1e-5, atol=1e-5)


def test_bench_composes_with_every_model(compose):
    for option in group_options("model"):
        typed = to_typed(compose("bench", [f"model={option}"]))
        assert isinstance(typed, C.BenchConfig) and typed.model.name == option
    d = to_typed(compose("bench"))
    assert (d.task, d.tokens, d.steps, d.warmup_steps, d.model.name, d.ceiling_size) == (
        "train",
        "synthetic",
        30,
        10,
        "d12",
        8192,
    )


@pytest.mark.parametrize(
    "override,key",
    [
        ("task=speed", "task"),
        ("tokens=random", "tokens"),
        ("warmup_steps=30", "warmup_steps"),
        ("steps=0", "steps"),
        ("attn_backends=[fa3]", "attn_backends"),
        ("attn_batch_size=0", "attn_batch_size"),
        ("loss_kernels=[liger]", "loss_kernels"),
        ("loss_batch_size=0", "loss_batch_size"),
        ("loss_iters=0", "loss_iters"),
    ],
)
def test_bad_bench_values_name_the_key(compose, override, key):
    with pytest.raises(C.ConfigError) as e:
        to_typed(compose("bench", [override]))
    assert e.value.key == key


def test_train_task_on_real_shards(run_stage, tmp_path):
    # tokens=data: the embedded shards through the training loader, tokenizer trained first
    p = run_stage(
        "bench",
        "model=tiny",
        "hardware=cpu",
        "tokens=data",
        "tokenizer=bpe8k",
        "auto_tokenizer=true",
        "steps=3",
        "warmup_steps=1",
        "hardware.device_batch_size=2",
        "total_batch_size=256",
    )
    assert p.returncode == 0, p.stderr[-3000:]
    r, _ = _bench_json(tmp_path, "train_tiny")
    assert (r["tokens"], r["vocab_size"], r["timed_steps"]) == ("data", 8192, 2)
    assert r["losses_finite"] and r["first_loss"] == pytest.approx(9.0, abs=0.2)  # ln(8192) at init


def test_profile_steps_are_extra_and_summarized(run_stage, tmp_path):
    p = run_stage(
        "bench",
        *TINY,
        "steps=3",
        "warmup_steps=1",
        "hardware.device_batch_size=2",
        "total_batch_size=256",
        "profile_steps=2",
    )
    assert p.returncode == 0, p.stderr[-3000:]
    r, run_dir = _bench_json(tmp_path, "train_tiny")
    # the profiled steps are not part of the statistics
    assert r["timed_steps"] == 2 and len(r["step_times_s"]) == 3 and len(r["losses"]) == 3
    prof = r["profile"]
    assert prof["steps"] == 2 and len(prof["step_times_s"]) == 2 and prof["clock"] == "operator self CPU time"
    assert sum(prof["by_category_ms_per_step"].values()) == pytest.approx(prof["total_ms_per_step"], rel=1e-6)
    assert prof["top"] and "matmul" in prof["by_category_ms_per_step"]
    assert (run_dir / "profile.txt").is_file() and "profile" in p.stdout
    # kernels.tsv lists every row, longest first, and its times add up to the profiled total
    lines = (run_dir / "kernels.tsv").read_text().splitlines()
    assert lines[0] == "ms_per_step\tcalls_per_step\tcategory\tname" and len(lines) - 1 >= len(prof["top"])
    ms = [float(line.split("\t")[0]) for line in lines[1:]]
    assert ms == sorted(ms, reverse=True)
    assert sum(ms) == pytest.approx(prof["total_ms_per_step"], rel=1e-3, abs=0.01 * len(ms))


def test_kernel_categories():
    from chatlm.bench.profile import categorize

    assert categorize("sm90_xmma_gemm_bf16bf16_bf16f32") == "matmul"
    assert categorize("nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NNT") == "matmul"
    assert categorize("triton_tem_fused_flex_attention_0") == "attention"
    assert categorize("triton_red_fused__to_copy_add_mean_mul_0").startswith("fused triton")
    assert categorize("_softcap_ce_rows_kernel").startswith("fused triton")  # the fused loss (Triton, own name)
    assert categorize("_qkv_rope_bwd_kernel").startswith("fused triton")  # RoPE + QK-norm (Triton, own name)
    assert categorize("Memcpy HtoD (Pinned -> Device)") == "memory copies"
    assert categorize("void at::native::vectorized_elementwise_kernel") == "other"


def test_annotations_are_not_kernels():
    from types import SimpleNamespace

    from chatlm.bench.profile import is_annotation

    assert is_annotation(SimpleNamespace(key="Optimizer.step#MuonAdamW.step"))
    assert is_annotation(SimpleNamespace(key="ProfilerStep*"))
    assert is_annotation(SimpleNamespace(key="my_range", is_user_annotation=True))
    assert not is_annotation(SimpleNamespace(key="nvjet_sm90_tst_192x192_64x3_2x1_v_bz_coopB_NNN"))


def test_scaling_summary_groups_by_configuration(tmp_path):
    """launch/gpu/scaling_summary.py: efficiency = tok/s(N) / (N x tok/s(1)) within one
    configuration, never across precisions; files from several calls combine."""

    def result(n, tps, fp8=False, model="d24"):
        return {
            "task": "train",
            "model": model,
            "dtype": "bfloat16",
            "fp8": fp8,
            "attention_backend": "fa4",
            "device_batch_size": 16,
            "tokens_per_step": 524288,
            "device_name": "NVIDIA H200",
            "world_size": n,
            "tok_per_s": tps,
            "median_step_s": 524288 / tps,
        }

    files = []
    for i, r in enumerate(
        [
            result(1, 100_000),
            result(2, 196_000),
            result(8, 760_000),
            result(1, 130_000, fp8=True),
            result(8, 975_000, fp8=True),
            result(2, 300_000, model="d20"),
        ]
    ):
        files.append(tmp_path / f"call{i % 2}_bench_{i:02d}.json")
        files[-1].write_text(json.dumps(r))
    out = subprocess.run(
        [
            sys.executable,
            str(REPO / "launch/gpu/scaling_summary.py"),
            "--json",
            str(tmp_path / "s.json"),
            *map(str, files),
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rows = {
        (r["model"], r["precision"], r["gpus"]): r["efficiency"] for r in json.loads((tmp_path / "s.json").read_text())
    }
    assert rows[("d24", "bfloat16", 1)] == 1.0
    assert rows[("d24", "bfloat16", 2)] == pytest.approx(0.98)
    assert rows[("d24", "bfloat16", 8)] == pytest.approx(0.95)
    assert rows[("d24", "bfloat16+fp8", 8)] == pytest.approx(975_000 / (8 * 130_000))
    assert rows[("d20", "bfloat16", 2)] is None and "n/a (no 1-GPU run)" in out
    assert "d24 bfloat16+fp8 fa4 B=16: 8 GPU(s) 975,000 tok/s" in out


def test_drill_compare_splits_the_difference_at_the_resume(tmp_path):
    """launch/gpu/drill_compare.py: the largest |loss - reference| before and after the stop step,
    the first differences after it, and val bpb side by side."""

    def write(name, losses, bpbs):
        rows = [{"step": s, "loss": v} for s, v in losses.items()] + [
            {"step": s, "val_bpb": v} for s, v in bpbs.items()
        ]
        (tmp_path / name).write_text("\n".join(json.dumps(r) for r in rows) + "\n")
        return tmp_path / name

    ref = write("ref.jsonl", {s: 10.0 - s for s in range(1, 9)}, {0: 3.0, 4: 2.0, 8: 1.5})
    drill = write(
        "drill.jsonl",
        {s: 10.0 - s + (0.001 if s <= 4 else 0.25 if s == 5 else 0.01) for s in range(1, 9)},
        {0: 3.0, 4: 2.0, 8: 1.6},
    )
    out = subprocess.run(
        [
            sys.executable,
            str(REPO / "launch/gpu/drill_compare.py"),
            "--stop",
            "4",
            "--reference",
            str(ref),
            "--json",
            str(tmp_path / "c.json"),
            str(drill),
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    c = json.loads((tmp_path / "c.json").read_text())
    assert c["max_abs_dloss_before"] == pytest.approx(0.001) and c["steps_before"] == 4
    assert c["max_abs_dloss_after"] == pytest.approx(0.25) and c["steps_after"] == 4
    assert c["first_steps_after"] == {"5": pytest.approx(0.25), "6": pytest.approx(0.01), "7": pytest.approx(0.01)}
    assert c["val_bpb"]["8"] == [1.6, 1.5]
    assert "max |loss - reference| after the resume: 0.2500 over 4 steps" in out


def test_inference_task_numbers_are_consistent(run_stage, compose, tmp_path):
    p = run_stage(
        "bench",
        *TINY,
        "task=inference",
        "infer_batch_sizes=[1,3]",
        "infer_prompt_tokens=12",
        "infer_new_tokens=6",
        "infer_modes=[eager]",
        "infer_profile=false",
    )
    assert p.returncode == 0, p.stderr[-3000:]
    r, _ = _bench_json(tmp_path, "inference_tiny")
    cfg = to_typed(compose("bench", ["model=tiny", "model.vocab_size=512"]))
    model = GPT(cfg.model, 512)
    d = model.dims
    assert (r["prompt_tokens"], r["new_tokens"]) == (12, 6)
    # keys + values of every layer, fp32 on the CPU
    assert r["kv_bytes_per_token"] == 2 * d.n_layer * d.n_kv_head * d.head_dim * 4
    # every matrix once per step, plus one row of each embedding table (wte and the value embeddings)
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    rows = d.n_embd + len(d.ve_layers) * d.n_kv_head * d.head_dim
    assert r["weight_bytes"] == 4 * (linear + rows)
    rows = {(e["mode"], e["batch"]): e for e in r["results"]}
    assert list(rows) == [("eager", 1), ("eager", 3)]
    for (_, batch), e in rows.items():
        assert e["decode_tok_per_s"] > 0 and e["ttft_ms"] > 0
        assert e["decode_tok_per_s_per_seq"] == pytest.approx(e["decode_tok_per_s"] / batch, rel=1e-9)
        # one decode step makes `batch` tokens, so the median step bounds the rate from the other side
        assert e["median_step_ms"] > 0
    assert "chatlm bench: inference" in p.stdout
