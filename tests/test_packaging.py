"""`pip install .` works: the wheel ships conf/ as chatlm/conf and composes configs outside the repo."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from tests.conftest import REPO, stage_env


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(out), str(REPO)],
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    )
    (whl,) = out.glob("chatlm-*.whl")
    return whl


def test_wheel_contains_the_conf_tree(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    conf = sorted(p.relative_to(REPO / "conf").as_posix() for p in (REPO / "conf").rglob("*.yaml"))
    assert conf and all(f"chatlm/conf/{c}" in names for c in conf)
    assert "chatlm/hydra/app.py" in names and not any(n.startswith("tests/") for n in names)
    static = sorted(p.relative_to(REPO / "src").as_posix() for p in (REPO / "src/chatlm/server/static").iterdir())
    assert "chatlm/server/static/index.html" in static and all(s in names for s in static)  # the web chat page


def test_installed_wheel_composes_and_runs_outside_the_repo(wheel, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    subprocess.run(
        [str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
        check=True,
        timeout=300,
        capture_output=True,
    )
    # dependencies come from the test environment; chatlm itself only from the wheel
    fresh_site = subprocess.run(
        [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    Path(fresh_site, "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env = stage_env(tmp_path)
    env.pop("PYTHONPATH", None)
    work = tmp_path / "elsewhere"
    work.mkdir()

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(py), *args], cwd=work, env=env, capture_output=True, text=True, timeout=180)

    where = run("-c", "import chatlm, chatlm.config.tree as t; print(chatlm.__file__); print(t.conf_dir())")
    assert where.returncode == 0, where.stderr
    module_file, conf = where.stdout.split()
    assert module_file.startswith(str(venv)) and conf == str(Path(module_file).parent / "conf")
    cfg = run("-m", "chatlm.check", "--cfg", "job", "--resolve", "hardware=cpu2")
    assert cfg.returncode == 0, cfg.stderr
    assert "nproc_per_node: 2" in cfg.stdout and "${" not in cfg.stdout
    done = run("-m", "chatlm.check", "matmul_size=8")
    assert done.returncode == 0, done.stderr
    assert list((tmp_path / "outputs" / "check").glob("*/*/run.json"))
    groups = subprocess.run(
        [str(venv / "bin" / "chatlm"), "groups", "model"], cwd=work, env=env, capture_output=True, text=True, timeout=60
    )
    assert groups.returncode == 0 and groups.stdout.startswith("model: d12, d16")
