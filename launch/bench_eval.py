"""Benchmark the evaluators: CORE and MMLU examples/s, batched vs one example per forward pass.

    python launch/bench_eval.py OUT.json --ckpt outputs/train/latest                 # a checkpoint
    python launch/bench_eval.py OUT.json --depth 20 [--tokenizer-dir DIR]            # fresh weights
        [--bundle DIR] [--chat-dir DIR] [--tasks hellaswag,arc_easy,...] [--examples 256]
        [--batch-size 32] [--max-batch-tokens 32768] [--device auto] [--backend auto]

Task data: a CORE bundle (`--bundle`, default ~/.cache/chatlm/evals/core) and MMLU from
`--chat-dir` (default ~/.cache/chatlm/evals/chat), as `chatlm fetch evals` writes them. With
`--depth` the weights are a fresh init (speed does not depend on them) and the tokenizer is
`--tokenizer-dir` or a 32K BPE trained on the task texts.

For each task the same examples are scored twice: `per_example` forwards the rows of one example
at a time (nanochat's batching: all choices of one example), `batched` packs rows of many examples
into each forward (chatlm's). Reported: examples/s of both, the speed-up, and how many examples
got a different credit in the two modes (0 means the scores do not depend on the batching; on a
GPU in bf16 this is the number to watch). MMLU: the letter logits of one prompt per forward vs
batched. With --gen-examples: GSM8K prompts generated greedily (chatlm.engine.padded), one prompt
at a time vs padded batches; "differs" counts answers that are not token-identical. Prints a
table and writes OUT.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

from chatlm.config import ModelConfig, TokenizerConfig  # noqa: E402
from chatlm.engine.padded import generate_padded  # noqa: E402
from chatlm.evals import chat, core  # noqa: E402
from chatlm.evals.scoring import last_position_logits, score_rows  # noqa: E402
from chatlm.model import select_inference_backend  # noqa: E402
from chatlm.runtime.model_loading import build_model, load_model  # noqa: E402
from chatlm.tokenizer import Tokenizer, train_tokenizer  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _model(args: argparse.Namespace, texts: list[str], device: torch.device):
    if args.ckpt:
        loaded = load_model(args.ckpt, device=device)
        return loaded.model, loaded.tokenizer, f"checkpoint {args.ckpt}"
    if args.tokenizer_dir:
        tok = Tokenizer.load(args.tokenizer_dir)
    else:
        tok = train_tokenizer(iter(texts), TokenizerConfig(name="bench32k", vocab_size=32768))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cfg = ModelConfig(depth=args.depth)
    backend = select_inference_backend(device, dtype) if args.backend == "auto" else args.backend
    model = build_model(cfg, tok.vocab_size, device, dtype, backend)
    model.init_weights()
    return model.eval(), tok, f"d{args.depth} (fresh init), {dtype}, attention {backend}"


class FullLogits(torch.nn.Module):
    """The model without `final_hidden`/`head_logits`: the scorers then take the logits of every
    position (the path before engine.padded.span_logits), for an A/B of the two."""

    def __init__(self, model):
        super().__init__()
        self.inner = model
        self.cos = model.cos

    def forward(self, idx):
        return self.inner(idx)


def _core_rows(tok, task, examples):
    data = core.select(examples, -1)
    per_example = []
    for i, item in enumerate(data):
        prompts = core.render_prompts(task.kind, item, task.delimiter, core.fewshot(data, i, task.num_fewshot))
        per_example.append(core.example_rows(task.kind, tok.encode(prompts, prepend=tok.bos_id)))
    return data, per_example


def _credits(task, data, per_example, scores):
    out, at = [], 0
    for item, rows in zip(data, per_example):
        mine = scores[at : at + len(rows)]
        at += len(rows)
        if task.kind == "language_modeling":
            out.append(1.0 if mine[0].greedy_match else 0.0)
        else:
            out.append(core.tie_credit([s.mean_loss for s in mine], int(item["gold"])))
    return out


def _timed(fn, device):
    """(fn(), seconds), the device synchronized on both sides."""
    _sync(device)
    t0 = time.perf_counter()
    out = fn()
    _sync(device)
    return out, time.perf_counter() - t0


def _row(task, kind, examples, rows, tokens, t_one, t_many, differs, accuracy) -> dict:
    return {
        "task": task,
        "kind": kind,
        "examples": examples,
        "rows": rows,
        "tokens": tokens,
        "per_example_ex_s": examples / t_one,
        "batched_ex_s": examples / t_many,
        "speedup": t_one / t_many,
        "credit_differs": differs,
        "accuracy": accuracy,
    }


def bench_core_task(model, tok, task, examples, args, device) -> dict:
    data, per_example = _core_rows(tok, task, examples[: args.examples])
    flat = [r for rows in per_example for r in rows]
    pad = tok.bos_id
    score_rows(model, flat[:8], pad, args.batch_size, args.max_batch_tokens)  # warm-up
    one, t_one = _timed(
        lambda: [s for rows in per_example for s in score_rows(model, rows, pad, len(rows), 10**9)], device
    )
    many, t_many = _timed(lambda: score_rows(model, flat, pad, args.batch_size, args.max_batch_tokens), device)
    a, b = _credits(task, data, per_example, one), _credits(task, data, per_example, many)
    differs = sum(x != y for x, y in zip(a, b))
    tokens = sum(len(r.tokens) for r in flat)
    return _row(task.label, task.kind, len(data), len(flat), tokens, t_one, t_many, differs, sum(b) / len(b))


def bench_mmlu(model, tok, rows, args, device) -> dict:
    rows = chat.select(rows, args.examples)
    prompts = [chat.prompt_ids(tok, chat.mc_message(r["question"], r["choices"])) for r in rows]
    letters = [tok.encode(x)[0] for x in chat.LETTERS[:4]]
    bos, b, mbt = tok.bos_id, args.batch_size, args.max_batch_tokens
    last_position_logits(model, prompts[:8], bos, b, mbt)  # warm-up
    one, t_one = _timed(lambda: [last_position_logits(model, [p], bos, 1, 10**9)[0] for p in prompts], device)
    many, t_many = _timed(lambda: last_position_logits(model, prompts, bos, b, mbt), device)
    pick = [[int(x[letters].argmax()) for x in group] for group in (one, many)]
    differs = sum(x != y for x, y in zip(*pick))
    accuracy = sum(p == int(r["answer"]) for p, r in zip(pick[1], rows)) / len(rows)
    return _row("mmlu", "categorical", len(rows), len(rows), sum(map(len, prompts)), t_one, t_many, differs, accuracy)


def bench_generation(model, tok, rows, args, device) -> dict:
    """GSM8K prompts, greedy, args.new_tokens each: one prompt at a time vs padded batches."""
    rows = chat.select(rows, args.gen_examples)
    prompts = [chat.prompt_ids(tok, r["question"]) for r in rows]
    n, bos = args.new_tokens, tok.bos_id
    generate_padded(model, prompts[:2], bos, 4, batch_size=2)  # warm-up
    one, t_one = _timed(lambda: [generate_padded(model, [p], bos, n, batch_size=1)[0] for p in prompts], device)
    many, t_many = _timed(lambda: generate_padded(model, prompts, bos, n, batch_size=args.gen_batch), device)
    differs = sum(a != b for a, b in zip(one, many))
    tokens = sum(map(len, many))
    return _row(
        "gsm8k_generation", f"greedy {n} tokens", len(rows), len(rows), tokens, t_one, t_many, differs, float("nan")
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--ckpt")
    ap.add_argument("--depth", type=int, default=20)
    ap.add_argument("--tokenizer-dir")
    ap.add_argument("--bundle", default="~/.cache/chatlm/evals/core")
    ap.add_argument("--chat-dir", default="~/.cache/chatlm/evals")
    ap.add_argument("--tasks", default="hellaswag,arc_easy,winogrande,lambada_openai,bigbench_operators")
    ap.add_argument("--examples", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-batch-tokens", type=int, default=32768)
    ap.add_argument("--gen-examples", type=int, default=0, help="GSM8K prompts generated (0: skip)")
    ap.add_argument("--gen-batch", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--head", default="span", choices=["span", "full"], help="logits at scored positions only, or all")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--backend", default="auto", help="with --depth: auto (fa4, else sdpa), sdpa, flex, fa4")
    args = ap.parse_args()
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    bundle = Path(args.bundle).expanduser()
    wanted = args.tasks.split(",")
    prepared = [(t, ex) for t, ex in core.prepare_core(bundle) if t.label in wanted]
    mmlu = chat.load_task("mmlu", Path(args.chat_dir).expanduser())
    texts = [json.dumps(x) for _, ex in prepared for x in ex[:2000]] + [r["question"] for r in mmlu[:2000]]
    model, tok, what = _model(args, texts, device)
    if args.head == "full":
        model, what = FullLogits(model), what + ", logits at every position"
    results = []
    with torch.no_grad():
        for task, examples in prepared:
            results.append(bench_core_task(model, tok, task, examples, args, device))
        results.append(bench_mmlu(model, tok, mmlu, args, device))
        if args.gen_examples > 0:
            gsm8k = chat.load_task("gsm8k", Path(args.chat_dir).expanduser())
            results.append(bench_generation(model, tok, gsm8k, args, device))
    print(f"model: {what} | device {device} | batch {args.batch_size} rows, {args.max_batch_tokens} tokens")
    print(f"{'task':34} {'kind':18} {'ex':>5} {'one ex/s':>10} {'batched ex/s':>13} {'speed-up':>9} {'differs':>8}")
    for r in results:
        print(
            f"{r['task']:34} {r['kind']:18} {r['examples']:5d} {r['per_example_ex_s']:10.1f} "
            f"{r['batched_ex_s']:13.1f} {r['speedup']:8.2f}x {r['credit_differs']:8d}"
        )
    record = {
        "date": time.strftime("%Y-%m-%d"),
        "host": platform.node(),
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "torch": torch.__version__,
        "model": what,
        "args": vars(args),
        "results": results,
    }
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
