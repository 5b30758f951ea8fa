"""chatlm.runtime.sinks: W&B (offline) and TensorBoard sinks, and the progress reporter.

Nothing here touches the network: W&B runs offline with its config/cache dirs in tmp_path, and the
one online-mode test replaces wandb.login/wandb.init so nothing can connect.
"""

from __future__ import annotations

import glob
import io
import json
import logging
import struct
import sys
from pathlib import Path

import pytest

from chatlm.config import LoggerConfig, LoggerKind, WandbMode
from chatlm.errors import ChatlmError
from chatlm.runtime import sinks as S
from chatlm.runtime.sinks import ProgressReporter, Sinks, open_sinks


@pytest.fixture
def wandb_env(tmp_path, monkeypatch):
    """Offline W&B with every file it writes kept under tmp_path; no git, no stats, no network."""
    pytest.importorskip("wandb")
    home = tmp_path / "wandb_home"
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_ERROR_REPORTING", "false")
    monkeypatch.setenv("WANDB_DISABLE_GIT", "true")
    monkeypatch.setenv("WANDB_DISABLE_CODE", "true")
    monkeypatch.setenv("WANDB_X_DISABLE_STATS", "true")
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(home / "config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(home / "cache"))
    monkeypatch.setenv("WANDB_DATA_DIR", str(home / "data"))
    monkeypatch.setenv("WANDB_ARTIFACT_DIR", str(home / "artifacts"))
    monkeypatch.setenv("NETRC", str(home / "netrc"))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_BASE_URL", raising=False)
    yield
    import wandb

    if wandb.run is not None:  # a failed test must not leave a run behind for the next one
        wandb.run.finish()


# ----------------------------------------------------------------------------------------------
# reading an offline run's .wandb file (a LevelDB-style log of protobuf Records)


def read_wandb_records(path: Path) -> list:
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    ident, _magic, _version = struct.unpack("<4sHB", data[:7])
    assert ident == b":W&B", f"{path} is not a W&B transaction log"
    block, pos, pending, records = 32768, 7, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a record header is zero padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0 and length == 0:
            pos += left
            continue
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 2:  # FIRST
            pending = chunk
            continue
        if kind == 3:  # MIDDLE
            pending += chunk
            continue
        payload = chunk if kind == 1 else pending + chunk  # FULL or LAST
        pending = b""
        record = pb.Record()
        record.ParseFromString(payload)
        records.append(record)
    return records


def _items(items) -> dict:
    return {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in items}


def wandb_offline_run(run_dir: Path, run_id: str) -> dict:
    """history rows, summary values and the run record of the (single) offline run of run_id."""
    files = glob.glob(str(run_dir / "wandb" / f"offline-run-*-{run_id}*" / f"run-{run_id}.wandb"))
    assert len(files) == 1, files
    assert Path(files[0]).stat().st_size > 0
    history, summary, run = [], {}, None
    for r in read_wandb_records(Path(files[0])):
        kind = r.WhichOneof("record_type")
        if kind == "history":
            history.append(_items(r.history.item))
        elif kind == "summary":
            summary.update(_items(r.summary.update))
        elif kind == "run":
            run = r.run
    return {"history": history, "summary": summary, "run": run, "file": Path(files[0])}


def wandb_cfg(**kw) -> LoggerConfig:
    return LoggerConfig(**{"name": "wandb", "kind": LoggerKind.wandb, "wandb_mode": WandbMode.offline, **kw})


# ----------------------------------------------------------------------------------------------
# wandb


def test_wandb_offline_writes_history_summary_and_run_metadata(tmp_path, wandb_env):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "run.json").write_text(json.dumps({"stage": "train"}))
    config = {"model": {"depth": 4}, "run_name": "r1"}
    sinks = open_sinks(
        wandb_cfg(project="p", tags=["smoke", "cpu"]), run_dir, config, "r1", group="sweep-0930", is_main=True
    )
    assert sinks.kind == "wandb" and sinks.enabled
    for step in (1, 2, 3):
        sinks.log({"train/loss": 4.0 - step, "train/lrm": 1.0, "note": "text", "skip": None}, step=step)
    sinks.summary({"val_bpb": 0.875, "steps": 3})
    sinks.close()
    assert not sinks.enabled
    sinks.log({"train/loss": 0.0}, step=4)  # after close: ignored, no error

    run_id = (run_dir / "wandb_id.txt").read_text().strip()
    assert run_id == sinks.run_id and len(run_id) == 8
    got = wandb_offline_run(run_dir, run_id)
    rows = got["history"]
    assert [(r["_step"], r["train/loss"], r["train/lrm"]) for r in rows] == [
        (1, 3.0, 1.0),
        (2, 2.0, 1.0),
        (3, 1.0, 1.0),
    ]
    assert all("skip" not in r for r in rows)
    assert got["summary"]["val_bpb"] == 0.875 and got["summary"]["steps"] == 3
    run = got["run"]
    assert run.run_id == run_id and run.display_name == "r1" and run.run_group == "sweep-0930"
    assert run.project == "p" and list(run.tags) == ["smoke", "cpu"] and run.job_type == "train"
    assert _items(run.config.update)["model"] == {"depth": 4}


def test_wandb_id_is_reused_by_the_next_attempt(tmp_path, wandb_env):
    run_dir = tmp_path / "run"
    first = open_sinks(wandb_cfg(group="from-config"), run_dir, {}, "r", group=None, is_main=True)
    first.log({"loss": 1.0}, step=1)
    first.close()
    second = open_sinks(wandb_cfg(group="from-config"), run_dir, {}, "r", group=None, is_main=True)
    second.log({"loss": 0.5}, step=2)
    second.close()
    assert first.run_id == second.run_id == (run_dir / "wandb_id.txt").read_text().strip()
    logs = sorted(glob.glob(str(run_dir / "wandb" / "offline-run-*" / f"run-{first.run_id}.wandb")))
    assert len(logs) == 2  # W&B ignores resume offline: one folder per attempt, the same run id
    groups = {
        r.run.run_group for f in logs for r in read_wandb_records(Path(f)) if r.WhichOneof("record_type") == "run"
    }
    assert groups == {"from-config"}


def test_wandb_online_without_credentials_is_refused_before_init(tmp_path, wandb_env, monkeypatch):
    import wandb

    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.setattr(wandb, "login", lambda **kw: False)

    def no_init(**kw):
        raise AssertionError("wandb.init must not run without credentials")

    monkeypatch.setattr(wandb, "init", no_init)
    with pytest.raises(ChatlmError, match="wandb login"):
        open_sinks(wandb_cfg(wandb_mode=WandbMode.online), tmp_path / "run", {}, "r", None, is_main=True)


def test_wandb_mode_env_overrides_config(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "dryrun")
    assert S._wandb_mode(wandb_cfg(wandb_mode=WandbMode.online)) == "offline"
    monkeypatch.delenv("WANDB_MODE")
    assert S._wandb_mode(wandb_cfg(wandb_mode=WandbMode.online)) == "online"
    assert S._wandb_mode({"wandb_mode": "disabled"}) == "disabled"


def test_wandb_disabled_mode_is_a_no_op(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setitem(sys.modules, "wandb", None)  # disabled must not even need the package
    sinks = open_sinks(wandb_cfg(wandb_mode=WandbMode.disabled), tmp_path, {}, "r", None, is_main=True)
    assert type(sinks) is Sinks and not sinks.enabled
    assert list(tmp_path.iterdir()) == []


def test_missing_wandb_package_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(ChatlmError, match=r"pip install 'chatlm\[wandb\]'"):
        open_sinks(wandb_cfg(), tmp_path, {}, "r", None, is_main=True)


def test_a_failing_backend_warns_once_and_turns_off(caplog):
    class Broken:
        id = "x"

        def log(self, *a, **k):
            raise OSError("disk full")

        def finish(self, **k):
            raise AssertionError("not called after a failure")

    sinks = S.WandbSinks(Broken(), "offline")
    with caplog.at_level(logging.WARNING, logger="chatlm"):
        sinks.log({"loss": 1.0}, step=1)
        sinks.log({"loss": 1.0}, step=2)
        sinks.close()
    assert [r.getMessage() for r in caplog.records if "disk full" in r.getMessage()] and len(caplog.records) == 1
    assert not sinks.enabled


# ----------------------------------------------------------------------------------------------
# tensorboard


def _scalars(log_dir: Path) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_writes_scalars_only(tmp_path):
    pytest.importorskip("tensorboard")
    cfg = {"kind": "tensorboard"}  # a plain dict works as well as a LoggerConfig / DictConfig
    sinks = open_sinks(cfg, tmp_path, {"model": {"depth": 4}}, "r", None, is_main=True)
    assert sinks.kind == "tensorboard"
    for step in (1, 2, 3):
        sinks.log(
            {"train/loss": 0.5 * step, "train/mfu": None, "note": "text", "ok": True, "nested": {"a": step}}, step=step
        )
    sinks.summary({"val_bpb": 0.75, "label": "x"})
    sinks.close()
    sinks.close()
    scalars = _scalars(tmp_path / "tensorboard")
    assert set(scalars) == {"train/loss", "ok", "nested/a", "summary/val_bpb"}
    assert scalars["train/loss"] == [(1, 0.5), (2, 1.0), (3, 1.5)]
    assert scalars["nested/a"] == [(1, 1.0), (2, 2.0), (3, 3.0)]
    assert scalars["summary/val_bpb"] == [(3, 0.75)]


def test_tensorboard_resume_step_purges_the_previous_attempts_tail(tmp_path):
    pytest.importorskip("tensorboard")
    first = open_sinks(LoggerConfig(kind=LoggerKind.tensorboard), tmp_path, {}, "r", None, is_main=True)
    for step in range(1, 6):
        first.log({"loss": float(step)}, step=step)
    first.close()
    second = open_sinks(LoggerConfig(kind=LoggerKind.tensorboard), tmp_path, {}, "r", None, is_main=True, resume_step=3)
    for step in (3, 4):
        second.log({"loss": 10.0 * step}, step=step)
    second.close()
    assert _scalars(tmp_path / "tensorboard")["loss"] == [(1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0)]


def test_missing_tensorboard_package_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    with pytest.raises(ChatlmError, match=r"pip install 'chatlm\[tensorboard\]'"):
        open_sinks({"kind": "tensorboard"}, tmp_path, {}, "r", None, is_main=True)


# ----------------------------------------------------------------------------------------------
# none / non-main


@pytest.mark.parametrize("kind", ["none", "wandb", "tensorboard"])
def test_non_main_ranks_and_kind_none_do_nothing(tmp_path, monkeypatch, kind):
    monkeypatch.setitem(sys.modules, "wandb", None)  # would raise if a non-main rank tried to use it
    main = kind == "none"
    sinks = open_sinks(LoggerConfig(kind=LoggerKind(kind)), tmp_path, {}, "r", "g", is_main=main)
    assert type(sinks) is Sinks and not sinks.enabled
    with sinks:
        sinks.log({"loss": 1.0}, step=1)
        sinks.summary({"loss": 1.0})
    sinks.close()
    assert list(tmp_path.iterdir()) == []


def test_unknown_kind_is_an_error(tmp_path):
    with pytest.raises(ChatlmError, match="logger.kind"):
        open_sinks({"kind": "mlflow"}, tmp_path, {}, "r", None, is_main=True)


# ----------------------------------------------------------------------------------------------
# progress


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def _lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "chatlm"]


def test_progress_plain_line_format(caplog):
    clock = Clock()
    caplog.set_level(logging.INFO, logger="chatlm")
    p = ProgressReporter(1000, is_main=True, interactive=False, every_steps=20, every_seconds=1e9, clock=clock)
    assert not p.interactive
    p.update(100, loss=3.5, lrm=1.0, dt_ms=600.0, tok_per_s=40000.0, mfu=0.3)
    clock.t += 12.0  # 20 steps in 12 s: 0.6 s/step, 880 steps left -> 528 s
    p.update(120, loss=3.12341, lrm=1.0, dt_ms=612.4, tok_per_s=41234.2, mfu=0.312)
    p.close()
    assert _lines(caplog) == [
        "step 100/1000 (10.0%) | loss 3.5000 | lrm 1.00 | 600 ms | 40,000 tok/s | mfu 30.0% | eta 9.0 min",
        "step 120/1000 (12.0%) | loss 3.1234 | lrm 1.00 | 612 ms | 41,234 tok/s | mfu 31.2% | eta 8.8 min",
    ]


def test_progress_plain_cadence_none_mfu_extras_and_final_line(caplog):
    clock = Clock()
    caplog.set_level(logging.INFO, logger="chatlm")
    p = ProgressReporter(50, is_main=True, interactive=False, every_steps=10, every_seconds=30, clock=clock)
    for step in range(1, 48):
        clock.t += 0.1
        if step == 25:
            clock.t += 31  # a slow step (an eval, say): the 30 s rule logs step 25
        p.update(step, loss=2.0, mfu=None, val_bpb=0.91234, tokens=123456)
    p.close()
    p.close()
    p.update(48, loss=1.0)  # after close: ignored
    lines = _lines(caplog)
    assert [int(line.split()[1].split("/")[0]) for line in lines] == [1, 11, 21, 25, 35, 45, 47]
    assert lines[0].startswith("step 1/50 (2.0%) | loss 2.0000 | mfu n/a | val_bpb 0.9123 | tokens 123,456 | eta")
    assert lines[0].endswith("eta n/a")  # one update, no dt_ms: nothing to estimate from
    assert lines[-1].endswith("| eta 2 s")  # 46 steps in 35.6 s, 3 left


def test_progress_eta_from_dt_ms_then_wall_clock(caplog):
    clock = Clock()
    caplog.set_level(logging.INFO, logger="chatlm")
    p = ProgressReporter(10, is_main=True, interactive=False, every_steps=1, clock=clock)
    p.update(1, dt_ms=2000.0)  # 9 steps left at 2 s
    clock.t += 10
    p.update(2, dt_ms=2000.0)  # wall clock: 10 s/step (an eval, say), 8 left
    clock.t += 10
    p.update(10)
    assert [line.rsplit("| ", 1)[1] for line in _lines(caplog)] == ["eta 18 s", "eta 1.3 min", "eta 0 s"]
    assert S.format_duration(7200) == "2.0 h"


def test_progress_non_main_is_silent(caplog):
    caplog.set_level(logging.INFO, logger="chatlm")
    console_file = io.StringIO()
    from rich.console import Console

    p = ProgressReporter(10, is_main=False, interactive=True, console=Console(file=console_file, force_terminal=True))
    for step in range(1, 11):
        p.update(step, loss=1.0)
    p.close()
    assert _lines(caplog) == [] and console_file.getvalue() == ""


def test_progress_rich_bar_on_a_terminal(caplog):
    from rich.console import Console

    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=160, color_system=None)
    handler = logging.StreamHandler(sys.stdout)  # a console log handler, like Hydra's
    chatlm_log = logging.getLogger("chatlm")
    chatlm_log.addHandler(handler)
    try:
        caplog.set_level(logging.INFO, logger="chatlm")
        p = ProgressReporter(8, is_main=True, console=console)  # interactive: auto from the console
        assert p.interactive
        for step in range(1, 9):
            p.update(step, loss=1.23456, lrm=0.5, dt_ms=10.0, tok_per_s=54321.0, mfu=0.25)
            if step == 4:
                chatlm_log.info("step 4 | val bpb 1.0000")
        assert handler.stream is not sys.stdout  # routed through the console while the bar is live
        p.close()
        assert handler.stream is sys.stdout
    finally:
        chatlm_log.removeHandler(handler)
    text = out.getvalue()
    assert "8/8" in text and "100%" in text
    assert "loss 1.2346 | 54,321 tok/s | mfu 25.0%" in text
    assert "step 4 | val bpb 1.0000" in text  # the log line printed above the bar
    # the bar replaces the log lines: nothing but the one explicit line went to the logger
    assert _lines(caplog) == ["step 4 | val bpb 1.0000"]
