"""`python -m chatlm.<stage> --help`: what the stage does, its groups and keys, and examples.

Built from the stage's primary config (its header comment and defaults list) and the schema's field
descriptions, so it cannot drift from either. Hydra's own help stays at `--hydra-help`.
"""

from __future__ import annotations

import dataclasses
import re

import yaml

from chatlm.config import stage_schema
from chatlm.config.fields import field_help
from chatlm.config.keys import nested_schema
from chatlm.config.tree import conf_dir, group_options

EXAMPLES: dict[str, list[str]] = {
    "train": [
        "python -m chatlm.train experiment=quickstart          # a d4 model on CPU in minutes, no network",
        "python -m chatlm.train model=d12 hardware=h100x1      # one GPU",
        "python -m chatlm.train -m model.softcap=10,15,20 cluster=slurm_h100   # a sweep on Slurm",
        "python -m chatlm.train --plan model=d24               # the sizes, batch and horizon, without training",
    ],
    "eval": [
        "python -m chatlm.eval ckpt=outputs/train/latest       # bits per byte of the newest pretraining run",
        "python -m chatlm.eval ckpt=RUN/checkpoints/step_000120 eval_tokens=65536",
        "python -m chatlm.eval -m ckpt=RUN/checkpoints/step_000060,RUN/checkpoints/step_000120",
    ],
    "bench": [
        "python -m chatlm.bench model=d12                      # tok/s, MFU, peak memory of training steps",
        "python -m chatlm.bench model=d12 tokens=data          # the same on the data group's shards",
        "python -m chatlm.bench task=attention model=d24       # each attention kernel, checked against fp32",
    ],
    "tokenize": [
        "python -m chatlm.tokenize                             # the 32K BPE on the embedded corpus",
        "python -m chatlm.tokenize tokenizer=bpe8k data=offline_registry",
        "python -m chatlm.tokenize tokenizer=bpe8k overwrite=true",
    ],
    "check": [
        "python -m chatlm.check                                # one process: device, dtype, a run directory",
        "python -m chatlm.check hardware=cpu2                  # 2 ranks spawned by chatlm",
        "python -m chatlm.check cluster=submitit_local hardware=cpu2   # through submitit, as on Slurm",
    ],
}


def _header(text: str) -> list[str]:
    """The comment lines at the top of a YAML file, without the '#'."""
    out = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        out.append(line.lstrip("#").strip())
    return out


def _groups(text: str) -> list[tuple[str, str, str]]:
    """(group, default option, comment) of the defaults list, without schemas, _self_ and hydra."""
    out = []
    for line in text.splitlines():
        m = re.match(r"\s*-\s*(optional\s+)?([\w/]+):\s*(\S+)\s*(#\s*(.*))?$", line)
        if m and m.group(2) not in ("hydra", "local"):
            out.append((m.group(2), m.group(3), (m.group(5) or "").strip()))
    return out


def stage_help(stage: str) -> str:
    text = (conf_dir() / f"{stage}.yaml").read_text()
    schema = stage_schema(stage)
    lines = [
        *_header(text),
        "",
        f"usage: python -m chatlm.{stage} [group=option ...] [key=value ...] "
        "[-m (sweep)] [--plan] [--cfg job --resolve]",
        "",
        "groups (pick one option each):",
    ]
    for group, default, comment in _groups(text):
        options = ", ".join(group_options(group)) or "-"
        lines.append(f"  {group:<12} default {default:<10} {comment}")
        lines.append(f"  {'':<12} options: {options}")
    values = yaml.safe_load(text) or {}
    lines += ["", "keys (key=value):"]
    for f in dataclasses.fields(schema):
        if nested_schema(schema, f.name) is not None or f.name == "stage":
            continue
        default = values.get(f.name, f.default if f.default is not dataclasses.MISSING else "[]")
        lines.append(f"  {f.name:<26} {str(default):<12} {field_help(f)}")
    if EXAMPLES.get(stage):
        lines += ["", "examples:", *(f"  {e}" for e in EXAMPLES[stage])]
    lines += ["", f"Every key of a group: python -m chatlm.{stage} --cfg job --resolve; reference: docs/configs.md"]
    return "\n".join(lines)
