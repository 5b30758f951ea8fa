"""The schemas in Hydra's ConfigStore and the `chatlm_*` resolvers used by conf/hydra/default.yaml.

Both are registered at import (idempotent), so submitit jobs that unpickle a task function from
`chatlm.hydra.app` have them too.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from chatlm.config import GROUP_SCHEMAS, STAGE_SCHEMAS, stage_schema
from chatlm.config.keys import dirname_exclusions
from chatlm.runtime import stamp


def register_configs() -> None:
    cs = ConfigStore.instance()
    for stage, schema in STAGE_SCHEMAS.items():
        cs.store(name=f"{stage}_schema", node=schema)
    for group, schema in GROUP_SCHEMAS.items():
        cs.store(group=f"schema/{group}", name=group, node=schema)
    from chatlm.hydra import launcher, sweeper

    launcher.register()  # hydra/launcher options chatlm_slurm, chatlm_local
    sweeper.register()  # hydra/sweeper option chatlm_basic


_UNSAFE = re.compile(r"[^A-Za-z0-9._=,+-]")


def safe_dirname(text: str, limit: int = 120) -> str:
    """A sweep job's override string as one safe path component (no '/', bounded length)."""
    text = _UNSAFE.sub("_", str(text)) or "default"
    if len(text) > limit:
        digest = hashlib.sha1(text.encode()).hexdigest()[:8]
        text = f"{text[: limit - 9]}~{digest}"
    return text


def excluded_from_dirname(stage: str) -> list[str]:
    """Override keys left out of a sweep job's directory name: those the stage's schema declares
    `results=False` (`chatlm.config.keys.dirname_exclusions`)."""
    return list(dirname_exclusions(stage_schema(stage)))


def register_resolvers() -> None:
    # use_cache=True: one value per process, and Hydra copies the submitting process's cache
    # into every submitit job, so a sweep's jobs all agree on its directory.
    if not OmegaConf.has_resolver("chatlm_stamp"):
        OmegaConf.register_new_resolver("chatlm_stamp", lambda part: stamp.current()[part], use_cache=True)
    if not OmegaConf.has_resolver("chatlm_dirname"):
        OmegaConf.register_new_resolver("chatlm_dirname", safe_dirname)
    if not OmegaConf.has_resolver("chatlm_path"):
        OmegaConf.register_new_resolver("chatlm_path", lambda p: str(Path(os.path.expanduser(str(p))).absolute()))
    if not OmegaConf.has_resolver("chatlm_dirname_exclusions"):
        OmegaConf.register_new_resolver("chatlm_dirname_exclusions", excluded_from_dirname)


register_configs()
register_resolvers()
