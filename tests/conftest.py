"""Shared fixtures: composing configs in-process and running stage apps as real subprocesses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def compose():
    """compose(stage, overrides) -> DictConfig, through Hydra's compose API on the real conf/."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from chatlm.config.tree import conf_dir

    def _compose(stage: str, overrides: list[str] | None = None, hydra_node: bool = False):
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
            return hydra_compose(config_name=stage, overrides=list(overrides or []), return_hydra_config=hydra_node)

    yield _compose
    GlobalHydra.instance().clear()


def stage_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SLURM_", "SUBMITIT_", "TORCHELASTIC_"))
        and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    }
    env.update(
        CHATLM_OUTPUT_ROOT=str(tmp_path / "outputs"),
        CHATLM_CACHE_DIR=str(tmp_path / "cache"),
        PYTHONUNBUFFERED="1",
        OMP_NUM_THREADS="1",
    )
    env.update(extra)
    return env


@pytest.fixture
def run_stage(tmp_path):
    """run_stage('check', 'a=1', ...) -> CompletedProcess of `python -m chatlm.<stage> ...` in tmp_path."""

    def _run(stage: str, *args: str, timeout: float = 180, env: dict | None = None, prefix: list[str] | None = None):
        cmd = (prefix or [sys.executable, "-m"]) + [f"chatlm.{stage}", *args]
        return subprocess.run(
            cmd, cwd=tmp_path, env=env or stage_env(tmp_path), capture_output=True, text=True, timeout=timeout
        )

    return _run


SMOKE = ["debug=smoke", "eval_tokens=1024"]  # the smallest real training run, for stage tests


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One tokenizer/data cache per test module, so its runs share the prepared shards."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture
def env(tmp_path, cache):
    """Environment for a stage subprocess run in tmp_path with the module's cache."""
    return stage_env(tmp_path, CHATLM_CACHE_DIR=str(cache))


def losses(run_dir: Path) -> dict[int, float]:
    """step -> training loss; for steps logged twice (a re-done step after a kill) the last wins."""
    from chatlm.runtime.metrics import read_metrics

    return {r["step"]: r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r}


@pytest.fixture(scope="session")
def smoke_train_run(tmp_path_factory):
    """One 5-step smoke pretraining run of today's code, shared by the tests that only read it:
    (run dir, env, root)."""
    root = tmp_path_factory.mktemp("smoke_train")
    env = stage_env(root)
    return train_once(root, env, *SMOKE), env, root


def train_once(cwd: Path, env: dict, *args: str, timeout: int = 300) -> Path:
    """Run `python -m chatlm.train ARGS` in cwd; it must succeed and write the only train run there."""
    r = subprocess.run(
        [sys.executable, "-m", "chatlm.train", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert r.returncode == 0, r.stderr[-3000:]
    (run,) = run_dirs(cwd / "outputs", "train")
    return run


def run_dirs(root: Path, stage: str) -> list[Path]:
    """Run directories (those holding run.json) under <root>/<stage>/<date>/."""
    return sorted(p.parent for p in (root / stage).glob("*/*/run.json"))


def load_record(run_dir: Path) -> dict:
    return json.loads((run_dir / "run.json").read_text())


# ----------------------------------------------------------------------------------------------
# a real Slurm cluster on this machine (launch/slurm/up.sh), started once per test session

SLURM_BASE = "/tmp/chatlm-slurm"


def _slurmctld_alive() -> bool:
    # (not `sinfo`: without a controller it retries for ~10 s before failing)
    try:
        os.kill(int(Path(SLURM_BASE, "run", "slurmctld.pid").read_text()), 0)
        return True
    except (OSError, ValueError):
        return False


@pytest.fixture(scope="session")
def slurm_cluster():
    """Slurm 22.05 from Debian's packages: 2 virtual nodes x 4 CPUs x 2 fake GPUs, with accounting.

    Needs root and apt (dev and CI machines have both); elsewhere the Slurm tests are skipped.
    A cluster that is already up (a developer ran launch/slurm/up.sh) is used and left running."""
    import shutil

    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip("starting a local Slurm cluster needs root and apt-get")
    started = not _slurmctld_alive()
    if started:
        p = subprocess.run(
            ["bash", str(REPO / "launch" / "slurm" / "up.sh"), SLURM_BASE], capture_output=True, text=True, timeout=600
        )
        assert p.returncode == 0, f"launch/slurm/up.sh failed:\n{p.stderr[-4000:]}"
    yield SLURM_BASE
    if started:
        subprocess.run(
            ["bash", str(REPO / "launch" / "slurm" / "down.sh"), SLURM_BASE], capture_output=True, timeout=120
        )
