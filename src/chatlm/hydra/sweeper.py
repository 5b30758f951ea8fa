"""chatlm's sweeper: Hydra's basic sweeper, plus a warning before a sweep runs points that coincide.

Two points coincide when their configs, with derived values in place of what derives them, hash the
same (`chatlm.training.plan.effective_config` and the run's config hash): `sweep=window` on the
2-layer tiny model runs SSSL as SL, and `L` twice. Each group of coinciding points is named with its
job numbers and overrides; the sweep still runs all of them (a seed study may want repeats).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

log = logging.getLogger("chatlm")
MAX_CHECKED = 512  # larger sweeps are not composed point by point


@dataclass
class ChatlmSweeperConf:
    _target_: str = "hydra_plugins.chatlm_launcher.sweepers.ChatlmBasicSweeper"
    max_batch_size: Optional[int] = None
    params: Optional[Dict[str, str]] = None


def register() -> None:
    ConfigStore.instance().store(group="hydra/sweeper", name="chatlm_basic", node=ChatlmSweeperConf, provider="chatlm")


def point_key(cfg: Any) -> Optional[str]:
    """The hash of a composed point's effective config; None when it does not validate (it will be
    recorded as a failed job)."""
    from chatlm.errors import ChatlmError
    from chatlm.runtime.rundir import config_hash
    from chatlm.training.plan import effective_config

    cfg = cfg.copy()
    with open_dict(cfg):
        cfg.pop("hydra", None)  # the job's config, as the task function gets it
    try:
        typed = OmegaConf.to_object(cfg)
        resolved = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
        return config_hash(effective_config(resolved, typed))  # type: ignore[arg-type]
    except (ChatlmError, ValueError, KeyError, OmegaConfBaseException):
        return None


def coinciding(keys: List[Optional[str]]) -> List[List[int]]:
    """Groups (of two or more) of point numbers with the same key."""
    groups: Dict[str, List[int]] = {}
    for i, key in enumerate(keys):
        if key is not None:
            groups.setdefault(key, []).append(i)
    return [g for g in groups.values() if len(g) > 1]


class ChatlmSweeperMixin:
    """Mixed into Hydra's BasicSweeper (the class Hydra finds is in hydra_plugins.chatlm_launcher)."""

    def sweep(self, arguments: List[str]) -> Any:
        self._warn_coinciding(arguments)
        return super().sweep(arguments)  # type: ignore[misc]

    def _points(self, arguments: List[str]) -> List[List[str]]:
        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)  # type: ignore[attr-defined]
        overrides = parser.parse_overrides(self._parse_config() + list(arguments))  # type: ignore[attr-defined]
        return [list(p) for batch in BasicSweeper.split_arguments(overrides, None) for p in batch]

    def _warn_coinciding(self, arguments: List[str]) -> None:
        points = self._points(arguments)
        if len(points) < 2 or len(points) > MAX_CHECKED:
            return
        loader = self.hydra_context.config_loader  # type: ignore[attr-defined]
        keys = [point_key(loader.load_sweep_config(self.config, p)) for p in points]  # type: ignore[attr-defined]
        for group in coinciding(keys):
            named = "; ".join(f"#{i} ({' '.join(points[i]) or 'no overrides'})" for i in group)
            log.warning(
                "sweep points %s are the same run: their configs differ only in values that derive to "
                "the same thing (e.g. a window pattern longer than the model is deep). All will run.",
                named,
            )
