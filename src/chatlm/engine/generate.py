"""Plain generation on top of the engine: `generate` (token lists in, new tokens out) and
nanochat's training-time text samples (spec §3.7)."""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from chatlm.engine.engine import Engine, SamplingParams

# The 7 fixed prompts nanochat samples (greedy, 16 tokens) at every evaluation (spec §3.7).
SAMPLE_PROMPTS: tuple[str, ...] = (
    "The capital of France is",
    "The chemical symbol of gold is",
    "If yesterday was Friday, then tomorrow will be",
    "The opposite of hot is",
    "The planets of the solar system are:",
    "My favorite color is",
    "If 5*x + 3 = 13, then x is",
)


def generate(
    model: torch.nn.Module,
    prompt_ids: Sequence[Sequence[int]],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: Optional[int] = None,
    seed: Optional[int] = None,
    stop_ids: Sequence[int] = (),
    *,
    top_p: float = 1.0,
    tools=None,
    batch_size: int = 32,
) -> list[list[int]]:
    """Continue every prompt by up to `max_new_tokens` tokens; returns only the new tokens.

    A row stops at its first token in `stop_ids` (not included) or after `max_new_tokens`.
    temperature 0 is greedy; otherwise row i samples with seed `seed + i` (seed None: drawn from
    torch's global RNG). Runs in eval mode under no_grad and restores the model's mode; the cache
    holds the longest prompt plus `max_new_tokens` (up to the RoPE table)."""
    prompts = [[int(t) for t in p] for p in prompt_ids]
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (e.g. BOS)")
    if max_new_tokens == 0 or not prompts:
        return [[] for _ in prompts]
    if temperature > 0 and seed is None:
        seed = int(torch.randint(0, 2**62, (1,)).item())
    was_training = model.training
    model.eval()
    try:
        engine = Engine(
            model,
            getattr(tools, "tok", None),
            max_batch=min(batch_size, len(prompts)),
            max_len=max(map(len, prompts)) + max_new_tokens,
            tools=tools,
            cuda_graphs=False,
        )
        ids = []
        for i, p in enumerate(prompts):
            params = SamplingParams(
                max_tokens=max_new_tokens,
                temperature=temperature,
                top_k=top_k or 0,
                top_p=top_p,
                seed=None if seed is None else seed + i,
                stop_token_ids=tuple(stop_ids),
            )
            ids.append(engine.add(p, params))
        outputs: dict = {i: [] for i in ids}
        for event in engine.stream():
            if event.token is not None:
                outputs[event.request_id].append(event.token)
        return [outputs[i] for i in ids]
    finally:
        model.train(was_training)


def sample_texts(
    model: torch.nn.Module, tokenizer, prompts: Sequence[str] = SAMPLE_PROMPTS, max_new_tokens: int = 16
) -> list[str]:
    """nanochat's training-time samples: BOS + prompt, greedy, `max_new_tokens` tokens.

    Returns the decoded continuations only (the text after each prompt); a row stops early at
    BOS (a base model's end of document). Callers print `prompt + continuation`.
    """
    bos = tokenizer.bos_id
    ids = [[bos] + list(tokenizer.encode(p)) for p in prompts]
    outs = generate(model, ids, max_new_tokens, temperature=0.0, stop_ids=(bos,))
    return [tokenizer.decode(o) for o in outs]


#: the questions a chat model answers in its training-time samples (SFT, RL)
CHAT_SAMPLE_QUESTIONS = (
    "What is your name?",
    "Who made you?",
    "How many times does the letter 'r' appear in the word 'strawberry'?",
    "Sam has 12 bags with 7 apples in each bag. How many apples does Sam have?",
    "Why is the sky blue?",
)


def chat_replies(model: torch.nn.Module, tokenizer, questions: Sequence[str], max_new_tokens: int = 64) -> list[str]:
    """Greedy assistant replies to single-turn questions (the chat template), with calculator
    calls run; each reply stops at `<|assistant_end|>` or BOS. Returns the decoded replies."""
    from chatlm.engine.tools import ToolTokens
    from chatlm.tokenizer.chat_format import render_for_completion

    prompts = [
        render_for_completion(tokenizer, [{"role": "user", "content": q}, {"role": "assistant", "content": ""}])
        for q in questions
    ]
    stop = (tokenizer.encode_special("<|assistant_end|>"), tokenizer.bos_id)
    outs = generate(model, prompts, max_new_tokens, stop_ids=stop, tools=ToolTokens(tokenizer))
    return [tokenizer.decode(o) for o in outs]
