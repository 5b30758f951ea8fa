"""Where the YAML lives: the `conf/` tree, its groups and their options (plain files, no Hydra)."""

from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent.parent  # src/chatlm (or site-packages/chatlm)


def conf_dir() -> Path:
    """The `conf/` tree: shipped as `chatlm/conf` in a wheel, at the repository root in a checkout."""
    for candidate in (_PACKAGE / "conf", _PACKAGE.parent.parent / "conf"):
        if (candidate / "train.yaml").is_file():
            return candidate
    raise FileNotFoundError(
        f"chatlm's conf/ directory was not found next to {_PACKAGE} (wheel) or at the repository root "
        "(editable install). Reinstall with `pip install .` or `pip install -e .`."
    )


def group_options(group: str) -> list[str]:
    """The option names of a config group (`model` -> ['d12', 'd20', ...])."""
    folder = conf_dir() / group
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []


def config_groups() -> list[str]:
    """Every config group under conf/ (nested ones as 'hydra/launcher')."""
    root = conf_dir()
    return sorted({str(p.parent.relative_to(root)) for p in root.rglob("*.yaml") if p.parent != root})


def stage_names() -> list[str]:
    """The stages with a primary config (`conf/<stage>.yaml`)."""
    return sorted(p.stem for p in conf_dir().glob("*.yaml"))
