"""Serving benchmark: requests/s, output tok/s and time to first token of `python -m chatlm.serve`
with 1, 8 and 32 concurrent streaming clients, against the engine's own batched decode rate.

    python launch/bench_serve.py --ckpt outputs/train/latest                 # CPU
    python launch/bench_serve.py --ckpt RUN --device cuda --out bench.json   # GPU, no network needed
    python launch/bench_serve.py --random-init d20 --tokenizer-dir DIR --device cuda   # d20-shaped, random weights

1. The engine alone, in this process: B (the largest client count) random prompts of
   --prompt-tokens tokens added at once and decoded greedily for --new-tokens tokens with no stop
   token (one untimed pass first). Its decode rate (tokens after the first step / their time) is
   what a full batch can do at best; the rate over the whole pass (prefill included) is reported too.
2. The server, as a subprocess (`python -m chatlm.serve ... port=0`), after the model here is freed.
   Two untimed rounds (1 client, then the most clients, one request each), then for each client
   count c: c clients, each sending --requests streaming /v1/completions requests
   one after another (the same kind of random token prompts, temperature 0, ignore_eos so every
   answer has --new-tokens tokens). The clients are asyncio streams in this process speaking
   HTTP/1.0 (one connection per request) and parse only the final usage chunk: little client work.
   requests/s and output tok/s are over the wall time of the whole round (first request sent to
   last byte); TTFT is the time from sending a request to its first data chunk.

The ratio served/engine compares output tok/s at the largest client count with the engine's
decode rate at that batch: what the HTTP layer, the scheduler thread and the clients' turnover
(a new request's prefill while the others wait) cost. A table goes to stdout; everything to --out.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Optional


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[k]


def random_prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, length), generator=g).tolist()


# ----------------------------------------------------------------------------------------------
# the engine alone


def engine_rate(model: Any, tok: Any, batch: int, prompt_tokens: int, new_tokens: int, seed: int) -> dict:
    from chatlm.engine.engine import Engine, SamplingParams

    engine = Engine(model, tok, max_batch=batch)
    prompts = random_prompts(batch, prompt_tokens, model.dims.vocab_size, seed)
    params = SamplingParams(max_tokens=new_tokens)

    def one_pass() -> tuple[float, float, int]:
        sync(engine.device)
        t0 = time.perf_counter()
        for p in prompts:
            engine.add(p, params)
        engine.step()  # prefill + every first token
        t_first = time.perf_counter()
        tokens = 0
        while engine.has_work():
            tokens += sum(1 for e in engine.step() if e.token is not None)
        sync(engine.device)
        return t_first - t0, time.perf_counter() - t_first, tokens

    one_pass()  # untimed: first calls, CUDA graph capture, allocator
    ttft, decode_s, tokens = one_pass()
    return {
        "batch": batch,
        "ttft_ms": ttft * 1000,
        "decode_tok_per_s": tokens / decode_s,
        "overall_tok_per_s": (tokens + batch) / (ttft + decode_s),
        "cuda_graphs": engine.graphs is not None,
    }


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def process_cpu_s(pid: int) -> Optional[float]:
    """User + system CPU seconds of a process so far (Linux /proc), else None."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def sync(device: Any) -> None:
    import torch

    if getattr(device, "type", str(device)).startswith("cuda"):
        torch.cuda.synchronize(device)


def random_checkpoint(model_group: str, tokenizer_dir: str, out: Path, device: str = "cpu") -> Path:
    """A checkpoint of the model group's shape with random (initial) weights and the given tokenizer
    (built on `device`: a d20 initializes in a second on a GPU)."""
    import dataclasses

    import torch
    from omegaconf import OmegaConf

    from chatlm.config import ModelConfig
    from chatlm.config.tree import conf_dir
    from chatlm.runtime.checkpoint import save_checkpoint
    from chatlm.runtime.model_loading import build_model, tokenizer_record
    from chatlm.tokenizer import Tokenizer

    tok = Tokenizer.load(tokenizer_dir)
    group = OmegaConf.load(conf_dir() / "model" / f"{model_group}.yaml")
    node = OmegaConf.merge(OmegaConf.structured(ModelConfig), group)
    cfg: ModelConfig = OmegaConf.to_object(node)  # type: ignore[assignment]
    torch.manual_seed(0)
    model = build_model(cfg, tok.vocab_size, device, torch.float32, "sdpa")
    model.init_weights()
    meta = {
        "stage": "train",
        "model_config": dataclasses.asdict(cfg),
        "vocab_size": tok.vocab_size,
        "tokenizer": tokenizer_record(tok, tokenizer_dir),
        "world_size": 1,
    }
    (out / "run.json").parent.mkdir(parents=True, exist_ok=True)
    (out / "run.json").write_text(json.dumps({"run_name": f"{model_group}-random"}))
    step_dir = save_checkpoint(
        out, 0, model_state=model.state_dict(), optim_state={}, loader_states=[{}], rng_states=[{}], meta=meta
    )
    del model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return step_dir


# ----------------------------------------------------------------------------------------------
# the server and its clients


def start_server(ckpt: str, device: str, max_batch: int, env: dict, cwd: Path) -> tuple[subprocess.Popen, str]:
    cmd = [
        sys.executable,
        "-m",
        "chatlm.serve",
        f"ckpt={ckpt}",
        "port=0",
        f"hardware.device={device}",
        f"max_batch={max_batch}",
        f"max_queue={4 * max_batch}",
        "request_log=false",
        "run_name=bench_serve",
    ]
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    found: list[str] = []
    lines: list[str] = []

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            m = re.search(r"chatlm serve: (http://\S+)", line)
            if m and not found:
                found.append(m.group(1))

    threading.Thread(target=read, daemon=True).start()
    deadline = time.time() + 600
    while not found and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    if not found:
        proc.kill()
        sys.exit("the server did not start:\n" + "".join(lines[-40:]))
    return proc, found[0]


async def stream_one(host: str, port: int, body: bytes) -> dict:
    """One streaming request over HTTP/1.0: (start, first data chunk, end, completion tokens)."""
    t0 = time.perf_counter()
    reader, writer = await asyncio.open_connection(host, port)
    head = (
        f"POST /v1/completions HTTP/1.0\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    writer.write(head.encode() + body)
    await writer.drain()
    status = await reader.readline()
    if b" 200 " not in status:
        rest = await reader.read()
        raise RuntimeError(f"{status.decode().strip()}: {rest.decode(errors='replace')[-300:]}")
    while (await reader.readline()) not in (b"\r\n", b""):
        pass
    first: Optional[float] = None
    tail = b""
    while True:  # read whatever has arrived (often many events at once); parse only the usage at the end
        data = await reader.read(1 << 16)
        if not data:
            break
        if first is None and b"data: " in data:
            first = time.perf_counter()
        tail = (tail + data)[-4096:]
    end = time.perf_counter()
    writer.close()
    usage = tail.rsplit(b'"usage":', 1)[1].split(b"}", 1)[0] + b"}" if b'"usage":{' in tail else b"{}"
    tokens = json.loads(usage).get("completion_tokens", 0)
    return {"start": t0, "first": first or end, "end": end, "tokens": tokens}


async def round_of(url: str, clients: int, requests: int, prompts: list[list[int]], new_tokens: int) -> dict:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    results: list[dict] = []

    async def client(c: int) -> None:
        for r in range(requests):
            prompt = prompts[(c * requests + r) % len(prompts)]
            body = json.dumps(
                {
                    "prompt": prompt,
                    "max_tokens": new_tokens,
                    "temperature": 0,
                    "ignore_eos": True,
                    "stream": True,
                    "stream_options": {"include_usage": True},
                }
            ).encode()
            results.append(await stream_one(host, int(port), body))

    t0 = time.perf_counter()
    await asyncio.gather(*(client(c) for c in range(clients)))
    wall = time.perf_counter() - t0
    tokens = sum(r["tokens"] for r in results)
    ttft = [r["first"] - r["start"] for r in results]
    per_request = [(r["tokens"] - 1) / (r["end"] - r["first"]) for r in results if r["end"] > r["first"]]
    return {
        "clients": clients,
        "requests": len(results),
        "wall_s": wall,
        "requests_per_s": len(results) / wall,
        "output_tok_per_s": tokens / wall,
        "ttft_p50_ms": percentile(ttft, 50) * 1000,
        "ttft_p99_ms": percentile(ttft, 99) * 1000,
        "per_request_tok_per_s": statistics.median(per_request) if per_request else None,
        "completion_tokens": tokens,
        "all_full_length": all(r["tokens"] == new_tokens for r in results),
    }


# ----------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", help="a run directory or checkpoint to serve")
    ap.add_argument("--random-init", metavar="MODEL", help="instead of --ckpt: random weights of conf/model/MODEL")
    ap.add_argument("--tokenizer-dir", help="with --random-init: the tokenizer directory")
    ap.add_argument("--device", default="cpu", help="cpu | cuda (default cpu)")
    ap.add_argument("--clients", default="1,8,32", help="concurrent client counts (default 1,8,32)")
    ap.add_argument("--requests", type=int, default=4, help="requests per client in each round (default 4)")
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="bench_serve.json", help="where the JSON goes")
    args = ap.parse_args()
    if not args.ckpt and not args.random_init:
        ap.error("give --ckpt or --random-init")

    import torch

    from chatlm.engine.engine import cast_for_inference
    from chatlm.model import select_inference_backend
    from chatlm.runtime.device import choose_dtype
    from chatlm.runtime.model_loading import load_model

    work = Path(tempfile.mkdtemp(prefix="bench_serve_"))
    ckpt = args.ckpt
    if args.random_init:
        if not args.tokenizer_dir:
            ap.error("--random-init needs --tokenizer-dir")
        ckpt = str(random_checkpoint(args.random_init, args.tokenizer_dir, work / "random_run", args.device))
    counts = sorted(int(c) for c in args.clients.split(","))
    device = torch.device(args.device)
    dtype = choose_dtype("auto", device.type)[0]
    loaded = load_model(ckpt, device, dtype, backend=select_inference_backend(device, dtype))
    model, tok = cast_for_inference(loaded.model), loaded.tokenizer
    context = int(model.dims.sequence_len)
    prompt_tokens = min(args.prompt_tokens, context - args.new_tokens - 1)
    if prompt_tokens < 1:
        sys.exit(f"--new-tokens {args.new_tokens} leaves no room for a prompt in the context ({context})")
    info = {
        "date": time.strftime("%Y-%m-%d"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "checkpoint": loaded.meta["checkpoint"],
        "depth": model.dims.n_layer,
        "params": sum(p.numel() for p in model.parameters()),
        "dtype": str(model.compute_dtype).removeprefix("torch."),
        "context": context,
        "prompt_tokens": prompt_tokens,
        "new_tokens": args.new_tokens,
        "requests_per_client": args.requests,
        "command": " ".join(sys.argv),
    }
    print(f"engine alone: batch {counts[-1]}, {prompt_tokens}-token prompts, {args.new_tokens} new tokens", flush=True)
    engine = engine_rate(model, tok, counts[-1], prompt_tokens, args.new_tokens, args.seed)
    del model, loaded
    if device.type == "cuda":
        torch.cuda.empty_cache()

    env = dict(os.environ, CHATLM_OUTPUT_ROOT=str(work / "outputs"), PYTHONUNBUFFERED="1")
    proc, url = start_server(ckpt, args.device, counts[-1], env, work)
    prompts = random_prompts(max(counts) * args.requests, prompt_tokens, tok.vocab_size, args.seed + 1)
    rounds = []
    try:
        # untimed: first calls, and on CUDA the graph capture of every batch bucket and span
        asyncio.run(round_of(url, 1, 1, prompts, args.new_tokens))
        asyncio.run(round_of(url, counts[-1], 1, prompts, args.new_tokens))
        for c in counts:
            print(f"serving: {c} client(s) x {args.requests} requests", flush=True)
            server0, client0 = process_cpu_s(proc.pid), time.process_time()
            r = asyncio.run(round_of(url, c, args.requests, prompts, args.new_tokens))
            server1 = process_cpu_s(proc.pid)
            # CPU seconds per wall second: how much of the machine the server and the clients used
            r["client_cpu_per_s"] = (time.process_time() - client0) / r["wall_s"]
            r["server_cpu_per_s"] = None if server0 is None or server1 is None else (server1 - server0) / r["wall_s"]
            rounds.append(r)
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(60)
    top = rounds[-1]
    result = {
        **info,
        "engine": engine,
        "served": rounds,
        "served_over_engine": top["output_tok_per_s"] / engine["decode_tok_per_s"],
        "served_over_engine_overall": top["output_tok_per_s"] / engine["overall_tok_per_s"],
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")

    print(f"\n{info['device']} | torch {info['torch']} | depth {info['depth']} | {info['dtype']}")
    print(f"prompt {prompt_tokens} tokens, {args.new_tokens} new tokens, {args.requests} requests per client\n")
    columns = ["clients", "requests/s", "output tok/s", "TTFT p50 ms", "TTFT p99 ms", "tok/s per request"]
    print("| " + " | ".join([*columns, "CPU server/clients"]) + " |")
    print("|---|---|---|---|---|---|---|")
    for r in rounds:
        cpu = f"{r['server_cpu_per_s']:.2f} / {r['client_cpu_per_s']:.2f}" if r["server_cpu_per_s"] is not None else "-"
        print(
            f"| {r['clients']} | {r['requests_per_s']:.2f} | {r['output_tok_per_s']:.0f} | {r['ttft_p50_ms']:.0f} | "
            f"{r['ttft_p99_ms']:.0f} | {r['per_request_tok_per_s'] or 0:.0f} | {cpu} |"
        )
    print(
        f"\nengine alone, batch {engine['batch']}: decode {engine['decode_tok_per_s']:.0f} tok/s "
        f"(prefill included: {engine['overall_tok_per_s']:.0f}); served/engine at {top['clients']} clients: "
        f"{result['served_over_engine']:.2f} ({result['served_over_engine_overall']:.2f} against the prefill-"
        f"included rate)\nwrote {args.out}"
    )


if __name__ == "__main__":
    main()
