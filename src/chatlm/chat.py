"""`python -m chatlm.chat ckpt=<run dir | checkpoint>`: a terminal chat, or one answer with -p "...".

The Hydra edge: compose conf/chat.yaml with the command line's overrides (no run directory), type
it as `ChatConfig`, then `run_chat` (plain code) loads the model and talks."""

from __future__ import annotations

import sys
from typing import Any, Callable, Optional, TextIO

from chatlm.config import ChatConfig
from chatlm.errors import ChatlmError, UsageError

HELP_COMMANDS = "/clear: new conversation | /exit or Ctrl-D: quit"


def parse_argv(argv: list[str]) -> list[str]:
    """Hydra overrides from the command line; `-p TEXT` / `--prompt TEXT` become prompt=TEXT."""
    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("-p", "--prompt"):
            if i + 1 >= len(argv):
                raise UsageError(f"{arg} needs the prompt text after it")
            text = argv[i + 1].replace("\\", "\\\\").replace("'", "\\'")
            out.append(f"prompt='{text}'")
            i += 2
            continue
        out.append(arg)
        i += 1
    return out


def compose_config(overrides: list[str]) -> ChatConfig:
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from chatlm.config.tree import conf_dir
    from chatlm.hydra import store  # noqa: F401 - registers the schemas
    from chatlm.hydra.overrides import check_overrides

    check_overrides("chat", overrides)
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        try:
            cfg = compose(config_name="chat", overrides=overrides)
        except ChatlmError:
            raise
        except Exception as e:  # Hydra's override and type errors: one line
            raise UsageError(str(e).splitlines()[0]) from None
    try:
        return OmegaConf.to_object(cfg)  # type: ignore[return-value]
    except ChatlmError:
        raise
    except Exception as e:
        cause = e.__cause__ if isinstance(e.__cause__, ChatlmError) else None
        if cause is not None:
            raise cause from None
        raise UsageError(str(e).splitlines()[0]) from None


def build_session(cfg: ChatConfig) -> Any:
    """Load the checkpoint and wrap it in an engine and a ChatSession."""
    import torch

    from chatlm.engine.chat_session import ChatSession
    from chatlm.engine.engine import Engine, SamplingParams, cast_for_inference
    from chatlm.engine.tools import ToolTokens, calculator_for
    from chatlm.runtime.model_loading import load_model

    device = cfg.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = None if cfg.dtype == "auto" else getattr(torch, cfg.dtype, None)
    if cfg.dtype != "auto" and not isinstance(dtype, torch.dtype):
        raise UsageError(f"dtype: unknown dtype {cfg.dtype!r}; valid: auto, float32, bfloat16, float16")
    loaded = load_model(cfg.ckpt, device, dtype, tokenizer_dir=cfg.tokenizer_dir)
    model, tok, meta = cast_for_inference(loaded.model), loaded.tokenizer, loaded.meta
    mode = cfg.mode
    if mode == "auto":
        mode = "chat" if meta.get("stage") in ("sft", "rl") else "complete"
    tools = None
    if mode == "chat":
        try:
            tools = ToolTokens(tok, calculator_for(cfg.tool_executor)) if cfg.tools else None
            tok.encode_special("<|assistant_end|>")
        except KeyError as e:
            raise UsageError(f"mode=chat: the checkpoint's tokenizer lacks the chat special tokens ({e})") from None
    engine = Engine(model, tok, max_batch=1, tools=tools, cuda_graphs=cfg.cuda_graphs)
    params = SamplingParams(
        max_tokens=cfg.max_tokens, temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p, seed=cfg.seed
    )
    return ChatSession(engine, tok, mode=mode, params=params, system=cfg.system), meta


def run_chat(
    cfg: ChatConfig,
    read: Callable[[str], str] = input,
    out: TextIO = sys.stdout,
    session: Optional[Any] = None,
) -> int:
    from chatlm.engine.engine import RequestError

    meta: dict = {}
    if session is None:
        session, meta = build_session(cfg)
    label = "Assistant" if session.mode == "chat" else "Model"

    def answer(text: str) -> None:
        try:
            for piece in session.reply(text):
                out.write(piece)
                out.flush()
        except RequestError as e:
            out.write(f"[{e}]")
        out.write("\n")
        out.flush()

    if cfg.prompt:
        answer(cfg.prompt)
        return 0
    step = meta.get("step", "?")
    out.write(f"chatlm chat: {meta.get('checkpoint', cfg.ckpt)} (step {step}, {session.mode} mode). {HELP_COMMANDS}\n")
    while True:
        try:
            text = read("\nYou: ").strip()
        except (EOFError, KeyboardInterrupt):
            out.write("\n")
            return 0
        if not text:
            continue
        if text in ("/exit", "/quit", "exit", "quit"):
            return 0
        if text == "/clear":
            session.clear()
            out.write("(new conversation)\n")
            continue
        if text.startswith("/"):
            out.write(f"unknown command {text.split()[0]}; {HELP_COMMANDS}\n")
            continue
        out.write(f"{label}: ")
        out.flush()
        dropped = session.dropped_turns
        try:
            answer(text)
        except KeyboardInterrupt:
            out.write(" [stopped]\n")
        if session.dropped_turns > dropped:
            out.write(f"(the oldest {session.dropped_turns - dropped} turn(s) no longer fit the context: dropped)\n")


def main() -> None:
    from chatlm.hydra.app import fail

    argv = sys.argv[1:]
    if "--help" in argv or "-h" in argv:
        from chatlm.hydra.help import stage_help

        usage = 'usage: python -m chatlm.chat ckpt=<run | checkpoint> [-p "prompt"] [key=value ...]'
        print("\n".join(usage if line.startswith("usage:") else line for line in stage_help("chat").splitlines()))
        sys.exit(0)
    try:
        cfg = compose_config(parse_argv(argv))
        sys.exit(run_chat(cfg))
    except ChatlmError as e:
        fail("chat", e)


if __name__ == "__main__":
    main()
