"""From a checkpoint to a ready model: the one path every stage uses.

    model, tokenizer, meta = load_model("outputs/train/latest", device="cuda")

`load_model` accepts a run directory (its `checkpoints/latest`), a `checkpoints/` directory, a
`step_<N>` directory, or a converted nanochat checkpoint (`chatlm convert nanochat`). It builds the
model from the architecture recorded in the checkpoint, loads the weights strictly, and returns
the tokenizer the checkpoint was trained with, checked by fingerprint:

1. `tokenizer_dir=` when given;
2. the copy in the run directory (`<run>/tokenizer/`, written with the first checkpoint);
3. the directory recorded in meta.json (`tokenizer.path`);
4. for checkpoints written before tokenizers were recorded (chatlm <= 902ac35): the
   `derived.tokenizer_dir` of the run's config.resolved.yaml, checked by vocabulary size only.

A tokenizer that is missing or differs is one `TokenizerMismatch` line naming what was expected and
where it was looked for. Training's `init_from` and resume use the same checks
(`check_tokenizer`, `check_architecture`, `load_weights`) on the model they built themselves.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import logging
import typing
from pathlib import Path
from typing import Any, NamedTuple, Optional, Union

import torch
import yaml

from chatlm.config import ModelConfig
from chatlm.config.keys import non_architecture_fields
from chatlm.errors import ChatlmError
from chatlm.runtime.checkpoint import CheckpointError, find_checkpoint, load_checkpoint, read_meta
from chatlm.tokenizer import Tokenizer

log = logging.getLogger("chatlm")

PathLike = Union[str, Path]
RUN_TOKENIZER_DIR = "tokenizer"  # <run dir>/tokenizer: the copy written with the first checkpoint


class TokenizerMismatch(ChatlmError):
    """The tokenizer a checkpoint was trained with is not available, or another one was given."""


class LoadedModel(NamedTuple):
    model: Any  # chatlm.model.GPT, in eval mode
    tokenizer: Tokenizer
    meta: dict  # the checkpoint's meta.json, plus "checkpoint": its step directory


# ----------------------------------------------------------------------------------------------
# what a checkpoint records


def tokenizer_record(tokenizer: Tokenizer, path: Optional[PathLike] = None) -> dict:
    """The `tokenizer` entry of a checkpoint's meta: name, vocabulary size, fingerprint, directory."""
    return {**tokenizer.identity(), "path": str(path) if path is not None else None}


def run_dir_of(step_dir: Path) -> Path:
    """`<run>/checkpoints/step_<N>` -> `<run>`."""
    return step_dir.parent.parent


def model_config_from_meta(meta: dict, where: str = "meta.json") -> ModelConfig:
    """The ModelConfig a checkpoint records (enums from their values; fields added to chatlm after
    the checkpoint was written take their defaults)."""
    saved = meta.get("model_config")
    if not isinstance(saved, dict):
        raise CheckpointError(f"{where} has no model_config: not a chatlm model checkpoint")
    fields = {f.name: f for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(saved) - set(fields))
    if unknown:
        raise CheckpointError(
            f"{where}: model_config has field(s) {', '.join(unknown)} this chatlm does not know "
            "(written by a newer chatlm?): upgrade chatlm"
        )
    hints = typing.get_type_hints(ModelConfig)
    values: dict[str, Any] = {}
    for name, value in saved.items():
        t = hints[name]
        values[name] = t(value) if isinstance(t, type) and issubclass(t, enum.Enum) else value
    return ModelConfig(**values)


def check_architecture(meta: dict, model_cfg: ModelConfig, vocab_size: int, where: Any) -> None:
    """Refuse a checkpoint whose model differs from `model_cfg`, naming the fields (kernel choices
    and labels, `architecture=False` fields, may differ)."""
    saved = meta.get("model_config") or {}
    current = json.loads(json.dumps(dataclasses.asdict(model_cfg), default=lambda v: getattr(v, "value", str(v))))
    ignore = non_architecture_fields()
    diff = [
        f"model.{k}: checkpoint {saved[k]!r}, config {current.get(k)!r}"
        for k in sorted(saved)
        if k not in ignore and k in current and saved[k] != current[k]
    ]
    if meta.get("vocab_size") not in (None, vocab_size):
        diff.append(f"vocab size: checkpoint {meta['vocab_size']}, tokenizer {vocab_size}")
    if diff:
        raise ChatlmError(
            f"checkpoint {where} was trained with another architecture:\n  "
            + "\n  ".join(diff)
            + "\nset these model.* keys to the checkpoint's values"
        )


def check_tokenizer(meta: dict, tokenizer: Tokenizer, where: Any) -> None:
    """Refuse `tokenizer` unless it is the one the checkpoint was trained with (by fingerprint;
    checkpoints that predate the record: by vocabulary size)."""
    record = meta.get("tokenizer")
    if isinstance(record, dict) and record.get("sha256"):
        if record["sha256"] != tokenizer.fingerprint:
            raise TokenizerMismatch(
                f"checkpoint {where} was trained with tokenizer {record.get('name')!r} (fingerprint "
                f"{record['sha256'][:12]}, {record.get('vocab_size')} ids), but {tokenizer.name!r} (fingerprint "
                f"{tokenizer.fingerprint[:12]}, {tokenizer.vocab_size} ids) was given: use the checkpoint's tokenizer"
            )
        return
    if meta.get("vocab_size") not in (None, tokenizer.vocab_size):
        raise TokenizerMismatch(
            f"checkpoint {where} has a vocabulary of {meta['vocab_size']} ids but tokenizer "
            f"{tokenizer.name!r} has {tokenizer.vocab_size}: use the checkpoint's tokenizer"
        )


# ----------------------------------------------------------------------------------------------
# finding the tokenizer


def _legacy_tokenizer_dir(step_dir: Path) -> Optional[Path]:
    try:
        resolved = yaml.safe_load((run_dir_of(step_dir) / "config.resolved.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        return None
    path = (resolved.get("derived") or {}).get("tokenizer_dir")
    return Path(path) if path else None


def tokenizer_candidates(step_dir: Path, meta: dict, tokenizer_dir: Optional[PathLike]) -> list[Path]:
    """Where the checkpoint's tokenizer may be, in the order they are tried."""
    if tokenizer_dir is not None:
        return [Path(tokenizer_dir).expanduser()]
    out = [run_dir_of(step_dir) / RUN_TOKENIZER_DIR]
    record: dict = meta["tokenizer"] if isinstance(meta.get("tokenizer"), dict) else {}
    if record.get("path"):
        out.append(Path(record["path"]))
    legacy = _legacy_tokenizer_dir(step_dir) if not record else None
    if legacy is not None:
        out.append(legacy)
    return out


def checkpoint_tokenizer(step_dir: Path, meta: dict, tokenizer_dir: Optional[PathLike] = None) -> Tokenizer:
    """The checkpoint's tokenizer (see the module docstring), checked against the checkpoint."""
    candidates = tokenizer_candidates(step_dir, meta, tokenizer_dir)
    for path in candidates:
        if (path / "tokenizer.json").is_file():
            tokenizer = Tokenizer.load(path)
            check_tokenizer(meta, tokenizer, step_dir)
            if not isinstance(meta.get("tokenizer"), dict):
                log.warning(
                    "checkpoint %s predates tokenizer fingerprints: %s was checked by vocabulary size only",
                    step_dir,
                    path,
                )
            return tokenizer
    record = meta.get("tokenizer") if isinstance(meta.get("tokenizer"), dict) else None
    looked = ", ".join(str(p) for p in candidates)
    if record:
        what = f"tokenizer {record.get('name')!r} (fingerprint {str(record.get('sha256'))[:12]})"
    elif meta.get("source") == "nanochat":
        what = "a tokenizer: it was imported from nanochat, which keeps its tokenizer apart"
    else:
        what = f"a tokenizer of {meta.get('vocab_size')} ids"
    raise TokenizerMismatch(
        f"checkpoint {step_dir} needs {what}, and none was found (looked in: {looked}); pass "
        "tokenizer_dir=<directory of that tokenizer>"
    )


# ----------------------------------------------------------------------------------------------
# building and loading


def build_model(model_cfg: ModelConfig, vocab_size: int, device: Any, dtype: torch.dtype, backend: str) -> Any:
    """A GPT on `device` with uninitialized weights (meta -> to_empty) and valid RoPE tables."""
    from chatlm.model import GPT

    with torch.device("meta"):
        model = GPT(model_cfg, vocab_size, dtype, backend)
    model.to_empty(device=device)
    model.init_rotary()
    return model


def load_weights(
    model: Any, path: PathLike, *, model_cfg: ModelConfig, tokenizer: Tokenizer, map_location: Any = "cpu"
) -> dict:
    """Load a checkpoint's weights into a model built from `model_cfg` (training's `init_from`),
    after checking its tokenizer and architecture; returns the checkpoint's meta."""
    state = load_checkpoint(path, map_location=map_location, parts=("model",))
    check_tokenizer(state["meta"], tokenizer, state["path"])
    check_architecture(state["meta"], model_cfg, tokenizer.vocab_size, state["path"])
    model.load_state_dict(state["model"])
    return {**state["meta"], "checkpoint": str(state["path"])}


def load_model(
    path: PathLike,
    device: Any = "cpu",
    dtype: Optional[torch.dtype] = None,
    *,
    tokenizer_dir: Optional[PathLike] = None,
    backend: str = "auto",
    overrides: Optional[dict] = None,
) -> LoadedModel:
    """(model in eval mode, tokenizer, meta) of a checkpoint; see the module docstring.

    `dtype`: the compute dtype (None: bf16 on CUDA SM >= 80, else fp32). `backend`: the attention
    backend ('auto' picks as training does). `overrides`: non-architecture ModelConfig fields to
    change (kernel choices); architecture fields are the checkpoint's."""
    from chatlm.model import select_backend
    from chatlm.runtime.device import choose_dtype

    step_dir = find_checkpoint(path)
    meta = read_meta(step_dir)
    tokenizer = checkpoint_tokenizer(step_dir, meta, tokenizer_dir)
    model_cfg = model_config_from_meta(meta, str(step_dir / "meta.json"))
    bad = sorted(set(overrides or {}) - non_architecture_fields())
    if bad:
        raise ChatlmError(f"load_model: {', '.join(bad)} are architecture fields, fixed by the checkpoint")
    model_cfg = dataclasses.replace(model_cfg, **(overrides or {}))
    device = torch.device(device)
    if dtype is None:
        dtype = choose_dtype("auto", device.type)[0]
    backend = select_backend(model_cfg.attention_backend if backend == "auto" else backend, device, dtype)
    model = build_model(model_cfg, tokenizer.vocab_size, device, dtype, backend)
    state = load_checkpoint(step_dir, map_location=device, parts=("model",))
    check_architecture(meta, model_cfg, tokenizer.vocab_size, step_dir)
    model.load_state_dict(state["model"])
    model.eval()
    return LoadedModel(model, tokenizer, {**meta, "checkpoint": str(step_dir)})
