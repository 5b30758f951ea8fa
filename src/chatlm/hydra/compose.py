"""Composing a stage's config in-process, without running it: the typed config (chat) and the
config hash a run would record (the pipeline runner's skip check)."""

from __future__ import annotations

from typing import Any, Optional

from chatlm.errors import ChatlmError, UsageError


def compose_stage(stage: str, overrides: list[str]) -> Any:
    """The composed DictConfig of `python -m chatlm.<stage> OVERRIDES` (hydra.* overrides ignored)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from chatlm.config.tree import conf_dir
    from chatlm.hydra import store  # noqa: F401 - registers the schemas and resolvers
    from chatlm.hydra.overrides import check_overrides

    overrides = [o for o in overrides if not o.startswith("hydra.")]
    check_overrides(stage, overrides)
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        try:
            return compose(config_name=stage, overrides=overrides)
        except ChatlmError:
            raise
        except Exception as e:  # Hydra's override and type errors: one line
            raise UsageError(str(e).splitlines()[0]) from None


def stage_config_hash(stage: str, overrides: list[str]) -> Optional[str]:
    """The config hash `run.json` would record for this command (None for apps without a run)."""
    from chatlm.hydra.app import resolved_container
    from chatlm.runtime.rundir import config_hash

    if stage == "chat":
        return None
    return config_hash(resolved_container(compose_stage(stage, overrides)))
