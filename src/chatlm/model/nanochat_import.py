"""Import a nanochat checkpoint (`model_<step>.pt` + `meta_<step>.json`) as a chatlm checkpoint.

    chatlm convert nanochat ~/.cache/nanochat/base_checkpoints/d24 runs/imported_d24 [--step N]

writes `runs/imported_d24/checkpoints/step_<N>/` (model state only; the optimizer, loader and RNG
files hold empty placeholders) that `load_checkpoint` + `GPT(...).load_state_dict(strict=True)`
accept. See docs/nanochat_import.md for the mapping and its limits.

Config mapping (nanochat's 7 persisted `model_config` fields -> ModelConfig):

    n_layer          -> depth
    n_embd, n_head   -> head_dim = n_embd / n_head, aspect_ratio = n_embd // n_layer; the width
                        chatlm derives, ceil(depth * aspect_ratio / head_dim) * head_dim, must give
                        n_embd back (always when n_embd % n_layer == 0, and whenever n_layer <= head_dim)
    n_kv_head        -> n_kv_head (None when equal to n_head)
    sequence_len, vocab_size, window_pattern -> the same names

Every constant nanochat hard-codes (softcap, QK scale, RoPE base, VE gate, smear, backout, window
rounding, ...) takes chatlm's default, which is nanochat's value at commit 92d63d4.

State-dict keys are renamed through `NANOCHAT_KEYS`, one table of `{i}`-templated names: fix a
name there and both directions (import, and `to_nanochat_state_dict` used by tests) follow.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict
from pathlib import Path
from typing import Optional, Union

import torch

from chatlm.config import ConfigError, ModelConfig
from chatlm.errors import ChatlmError

#: nanochat state-dict name -> chatlm name; `{i}` is a layer index. nanochat keeps the embedding and
#: the blocks in a `transformer` ModuleDict ('wte', 'h'); value embeddings are a ModuleDict keyed by
#: the layer index. smear_lambda/backout_lambda are shape (1,) in nanochat, () in chatlm.
NANOCHAT_KEYS: dict[str, str] = {
    "transformer.wte.weight": "wte.weight",
    "transformer.h.{i}.attn.c_q.weight": "blocks.{i}.attn.c_q.weight",
    "transformer.h.{i}.attn.c_k.weight": "blocks.{i}.attn.c_k.weight",
    "transformer.h.{i}.attn.c_v.weight": "blocks.{i}.attn.c_v.weight",
    "transformer.h.{i}.attn.c_proj.weight": "blocks.{i}.attn.c_proj.weight",
    "transformer.h.{i}.attn.ve_gate.weight": "blocks.{i}.attn.ve_gate.weight",
    "transformer.h.{i}.mlp.c_fc.weight": "blocks.{i}.mlp.c_fc.weight",
    "transformer.h.{i}.mlp.c_proj.weight": "blocks.{i}.mlp.c_proj.weight",
    "lm_head.weight": "lm_head.weight",
    "value_embeds.{i}.weight": "value_embeds.{i}.weight",
    "resid_lambdas": "resid_lambdas",
    "x0_lambdas": "x0_lambdas",
    "smear_gate.weight": "smear_gate.weight",
    "smear_lambda": "smear_lambda",
    "backout_lambda": "backout_lambda",
}

#: the fields nanochat persists in meta_<step>.json["model_config"] (spec §1.1), all required
NANOCHAT_CONFIG_FIELDS = ("sequence_len", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd", "window_pattern")

COMPILE_PREFIX = "_orig_mod."
_MODEL_RE = re.compile(r"^model_(\d+)\.pt$")

PathLike = Union[str, Path]


class NanochatImportError(ChatlmError, ValueError):
    """A nanochat checkpoint that cannot be imported; the message names the field, key or file."""


# ----------------------------------------------------------------------------------------------
# key renaming


def _template_regex(template: str) -> re.Pattern:
    return re.compile("^" + re.escape(template).replace(re.escape("{i}"), r"(?P<i>\d+)") + "$")


_FORWARD = [(_template_regex(src), dst) for src, dst in NANOCHAT_KEYS.items()]
_BACKWARD = [(_template_regex(dst), src) for src, dst in NANOCHAT_KEYS.items()]


def _rename(key: str, table) -> Optional[str]:
    for pattern, target in table:
        m = pattern.match(key)
        if m:
            return target.format(**m.groupdict())
    return None


def chatlm_key(nanochat_key: str) -> Optional[str]:
    """chatlm's name for a nanochat state-dict key (after prefix stripping), or None if unknown."""
    return _rename(nanochat_key, _FORWARD)


def nanochat_key(chatlm_name: str) -> Optional[str]:
    """nanochat's name for a chatlm state-dict key, or None if nanochat has no such tensor."""
    return _rename(chatlm_name, _BACKWARD)


def strip_compile_prefix(state: dict) -> dict:
    """Drop the `_orig_mod.` prefixes torch.compile adds (possibly nested) from every key."""
    out = {}
    for k, v in state.items():
        while k.startswith(COMPILE_PREFIX):
            k = k[len(COMPILE_PREFIX) :]
        if k in out:
            raise NanochatImportError(f"state dict has key {k!r} both with and without the '{COMPILE_PREFIX}' prefix")
        out[k] = v
    return out


def to_nanochat_state_dict(state: dict) -> dict:
    """A chatlm state dict under nanochat's names and shapes (the inverse of the import)."""
    out = {}
    for k, v in state.items():
        name = nanochat_key(k)
        if name is None:
            raise KeyError(f"no nanochat name for chatlm key {k!r}; add it to NANOCHAT_KEYS")
        out[name] = v.reshape(1) if v.dim() == 0 else v
    return out


# ----------------------------------------------------------------------------------------------
# config mapping


def _int_field(cfg: dict, name: str, where: str) -> int:
    v = cfg[name]
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise NanochatImportError(f"{where}: model_config.{name} must be a positive integer, got {v!r}")
    return v


def model_config_from_nanochat(nc: dict, where: str = "model_config") -> ModelConfig:
    """ModelConfig for nanochat's persisted `model_config` (see the module docstring)."""
    if not isinstance(nc, dict):
        raise NanochatImportError(f"{where}: 'model_config' must be a JSON object, got {type(nc).__name__}")
    missing = [f for f in NANOCHAT_CONFIG_FIELDS if f not in nc]
    if missing:
        raise NanochatImportError(
            f"{where}: model_config lacks field(s) {', '.join(map(repr, missing))} (needs all of "
            f"{', '.join(NANOCHAT_CONFIG_FIELDS)}); checkpoints from before sliding windows (2026-01-11) "
            "have no window_pattern and also predate value embeddings, which chatlm cannot import"
        )
    unknown = sorted(set(nc) - set(NANOCHAT_CONFIG_FIELDS))
    if unknown:
        raise NanochatImportError(
            f"{where}: model_config has unknown field(s) {', '.join(map(repr, unknown))}: a nanochat newer than "
            "92d63d4 (or a fork) with architecture options chatlm does not know; refusing to guess"
        )
    L = _int_field(nc, "n_layer", where)
    C = _int_field(nc, "n_embd", where)
    H = _int_field(nc, "n_head", where)
    Hkv = _int_field(nc, "n_kv_head", where)
    T = _int_field(nc, "sequence_len", where)
    V = _int_field(nc, "vocab_size", where)
    pattern = nc["window_pattern"]
    if not isinstance(pattern, str):
        raise NanochatImportError(f"{where}: model_config.window_pattern must be a string, got {pattern!r}")
    if C % H:
        raise NanochatImportError(f"{where}: model_config.n_embd={C} is not divisible by n_head={H}")
    if H % Hkv:
        raise NanochatImportError(f"{where}: model_config.n_head={H} is not divisible by n_kv_head={Hkv}")
    head_dim = C // H
    aspect = C // L
    from chatlm.model.sizing import model_width

    if aspect < 1 or model_width(L, aspect, head_dim) != C:
        raise NanochatImportError(
            f"{where}: n_embd={C} with n_layer={L}, head_dim={head_dim} cannot be expressed as chatlm's "
            "ceil(depth * aspect_ratio / head_dim) * head_dim"
        )
    try:  # every other field: chatlm's default, nanochat's hard-coded constant at 92d63d4
        return ModelConfig(
            name=f"nanochat_d{L}",
            depth=L,
            aspect_ratio=aspect,
            head_dim=head_dim,
            n_kv_head=None if Hkv == H else Hkv,
            sequence_len=T,
            vocab_size=V,
            window_pattern=pattern,
        )
    except ConfigError as e:
        raise NanochatImportError(f"{where}: {e}") from e


def model_config_dict(cfg: ModelConfig) -> dict:
    """ModelConfig as plain JSON builtins (enums as their values)."""
    d = asdict(cfg)
    return {k: (v.value if hasattr(v, "value") else v) for k, v in d.items()}


# ----------------------------------------------------------------------------------------------
# files


def find_steps(ckpt_dir: PathLike) -> list[int]:
    """Steps with a model_<step>.pt in a nanochat checkpoint directory, ascending."""
    return sorted(int(m.group(1)) for p in Path(ckpt_dir).iterdir() if (m := _MODEL_RE.match(p.name)))


def read_nanochat_checkpoint(ckpt_dir: PathLike, step: Optional[int] = None) -> tuple[dict, dict, int]:
    """(state_dict with prefixes stripped, meta, step) of a nanochat checkpoint directory."""
    d = Path(ckpt_dir).expanduser()
    if not d.is_dir():
        raise NanochatImportError(
            f"{d} is not a directory: pass a nanochat checkpoint directory such as "
            "~/.cache/nanochat/base_checkpoints/d24"
        )
    steps = find_steps(d)
    if not steps:
        raise NanochatImportError(f"{d} has no model_<step>.pt files: not a nanochat checkpoint directory")
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise NanochatImportError(f"{d} has no checkpoint for step {step}; steps: {', '.join(map(str, steps))}")
    model_path, meta_path = d / f"model_{step:06d}.pt", d / f"meta_{step:06d}.json"
    if not model_path.is_file():  # e.g. model_10.pt without zero padding
        model_path = next(p for p in d.iterdir() if (m := _MODEL_RE.match(p.name)) and int(m.group(1)) == step)
    if not meta_path.is_file():
        raise NanochatImportError(f"{meta_path} is missing: the model config is read from it")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise NanochatImportError(f"{meta_path} is unreadable ({type(e).__name__}: {e})") from e
    if not isinstance(meta, dict) or "model_config" not in meta:
        raise NanochatImportError(f"{meta_path} has no 'model_config' field")
    try:
        state = torch.load(model_path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise NanochatImportError(
            f"{model_path} cannot be loaded ({type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]})"
        ) from e
    if not isinstance(state, dict):
        raise NanochatImportError(f"{model_path} does not hold a state dict (got {type(state).__name__})")
    return strip_compile_prefix(state), meta, step


def convert_state_dict(state: dict, cfg: ModelConfig, where: str = "model") -> dict:
    """nanochat's (prefix-stripped) state dict -> chatlm's, checked against a GPT built from `cfg`."""
    from chatlm.model.gpt import GPT

    with torch.device("meta"):
        expected = GPT(cfg, cfg.vocab_size, attention_backend="sdpa").state_dict()
    out, unknown = {}, []
    for k, v in state.items():
        name = chatlm_key(k)
        if name is None or name not in expected:
            unknown.append(k)
            continue
        out[name] = v
    missing = [nanochat_key(k) or k for k in expected if k not in out]
    if unknown or missing:
        parts = []
        if unknown:
            parts.append(f"unknown key(s) {', '.join(unknown[:8])}{' ...' if len(unknown) > 8 else ''}")
        if missing:
            parts.append(f"missing key(s) {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")
        raise NanochatImportError(
            f"{where}: {'; '.join(parts)} for a nanochat_d{cfg.depth} of nanochat 92d63d4's architecture "
            "(checkpoints from before value embeddings (2026-01-18) or smear/backout (2026-03-14) are not "
            "supported; if nanochat renamed a tensor, fix chatlm.model.nanochat_import.NANOCHAT_KEYS)"
        )
    for name, v in out.items():
        want = expected[name].shape
        if v.shape != want:
            if v.numel() == 1 and want == torch.Size([]):
                out[name] = v.reshape(())
            else:
                raise NanochatImportError(
                    f"{where}: {nanochat_key(name)} has shape {tuple(v.shape)}, expected "
                    f"{tuple(want)} from model_config"
                )
        if not out[name].is_floating_point():
            raise NanochatImportError(f"{where}: {nanochat_key(name)} has dtype {v.dtype}, expected floating point")
    return {k: out[k] for k in expected}  # chatlm's order


def import_nanochat(
    ckpt_dir: PathLike, out_dir: PathLike, step: Optional[int] = None, tokenizer_dir: Optional[PathLike] = None
) -> Path:
    """Convert a nanochat checkpoint directory into a chatlm checkpoint under `out_dir`.

    Returns the written step directory (`out_dir/checkpoints/step_<N>`). Tensors keep their dtypes
    (fp32 Linears, bf16 embeddings as nanochat saves them); `load_state_dict` casts on load.
    """
    from chatlm.model.sizing import derive_dims
    from chatlm.runtime.checkpoint import save_checkpoint

    ckpt_dir = Path(ckpt_dir).expanduser()
    state, meta, step = read_nanochat_checkpoint(ckpt_dir, step)
    where = str(ckpt_dir / f"meta_{step:06d}.json")
    cfg = model_config_from_nanochat(meta["model_config"], where)
    model_state = convert_state_dict(state, cfg, str(ckpt_dir / f"model_{step:06d}.pt"))
    dims = derive_dims(cfg)
    out_meta = {
        "source": "nanochat",
        "source_path": str(ckpt_dir.resolve()),
        "source_step": step,
        "source_model_config": meta["model_config"],
        "world_size": 1,
        "model_config": model_config_dict(cfg),
        "vocab_size": cfg.vocab_size,
        "derived": dims.as_dict(),
    }
    for key in ("val_bpb",):
        if key in meta:
            out_meta[f"source_{key}"] = meta[key]
    if tokenizer_dir is not None:
        _attach_tokenizer(Path(tokenizer_dir), Path(out_dir), cfg, out_meta)
    return save_checkpoint(
        out_dir, step, model_state=model_state, optim_state={}, loader_states=[{}], rng_states=[{}], meta=out_meta
    )


def _attach_tokenizer(tokenizer_dir: Path, out_dir: Path, cfg: ModelConfig, meta: dict) -> None:
    """Copy a chatlm tokenizer with the checkpoint's vocabulary into `<out>/tokenizer` and record it,
    so `load_model(out)` needs no tokenizer_dir."""
    from chatlm.runtime.model_loading import RUN_TOKENIZER_DIR, tokenizer_record
    from chatlm.tokenizer import Tokenizer

    tok = Tokenizer.load(tokenizer_dir)
    if tok.vocab_size != cfg.vocab_size:
        raise NanochatImportError(
            f"{tokenizer_dir}: tokenizer {tok.name!r} has {tok.vocab_size} ids but the "
            f"checkpoint's vocab_size is {cfg.vocab_size}"
        )
    tok.save(out_dir / RUN_TOKENIZER_DIR)
    meta["tokenizer"] = tokenizer_record(tok, tokenizer_dir)
