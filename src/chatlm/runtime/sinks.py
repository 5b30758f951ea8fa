"""Optional metric sinks (Weights & Biases, TensorBoard) and the console progress reporter.

metrics.jsonl (chatlm.runtime.metrics) is the source of truth and is always written; the sinks here
are extras chosen with `logger=`:

- `none`: nothing (the default).
- `wandb`: a W&B run whose files live in `<run dir>/wandb`. Offline by default (no account, no
  network; push later with `wandb sync <run dir>/wandb/offline-run-*`), `logger.wandb_mode=online`
  to stream. The run id is kept in `<run dir>/wandb_id.txt`, so a resumed or requeued run reuses
  it (`resume="allow"`). Note that W&B ignores `resume` in offline mode: each attempt of an
  offline run is its own `offline-run-*` directory carrying the same id.
- `tensorboard`: scalars in `<run dir>/tensorboard` (`tensorboard --logdir <run dir>`).

Only the main rank logs; on other ranks every sink is a no-op. A sink that fails mid-run (a W&B
service that died, a full disk) warns once and turns itself off instead of stopping the training.

`ProgressReporter` shows the training progress: a rich progress bar on a terminal, periodic plain
log lines otherwise (Slurm .out files, pipes).
"""

from __future__ import annotations

import logging
import math
import os
import secrets
import string
import sys
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

from chatlm.errors import ChatlmError
from chatlm.runtime.flops import format_mfu
from chatlm.runtime.rundir import atomic_write_text, read_json

log = logging.getLogger("chatlm")

WANDB_ID_FILE = "wandb_id.txt"
WANDB_DIR = "wandb"
TENSORBOARD_DIR = "tensorboard"
WANDB_INSTALL = "pip install 'chatlm[wandb]'"
TENSORBOARD_INSTALL = "pip install 'chatlm[tensorboard]'"


def _get(cfg: Any, key: str, default: Any = None) -> Any:
    """A field of a LoggerConfig dataclass, a DictConfig or a plain dict."""
    if cfg is None:
        return default
    if isinstance(cfg, Mapping):
        value = cfg.get(key, default)
    else:
        value = getattr(cfg, key, default)
    return default if value is None else value


def _enum_value(value: Any) -> str:
    return str(getattr(value, "value", value))


def _plain(value: Any) -> Any:
    """torch / numpy scalars to Python numbers (other values unchanged)."""
    if hasattr(value, "item") and callable(value.item):
        try:
            return value.item()
        except (ValueError, RuntimeError):  # a tensor with more than one element
            return value
    return value


# ----------------------------------------------------------------------------------------------
# sinks


class Sinks:
    """The no-op sink: what non-main ranks and `logger.kind=none` get. Subclasses do the work."""

    kind = "none"

    def __init__(self) -> None:
        self._closed = False

    @property
    def enabled(self) -> bool:
        return False

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        """Log one step's values (non-numeric values are dropped by sinks that only chart numbers)."""

    def summary(self, metrics: Mapping[str, Any]) -> None:
        """Record final values (W&B run summary; TensorBoard `summary/<key>` scalars)."""

    def close(self, exit_code: int = 0) -> None:
        """Flush and close; idempotent. `exit_code != 0` marks a W&B run as failed."""
        self._closed = True

    def __enter__(self) -> Sinks:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.close(exit_code=0 if exc_type is None else 1)


class _GuardedSinks(Sinks):
    """Runs the backend calls and, when one raises, warns once and stops using the backend."""

    def __init__(self) -> None:
        super().__init__()
        self._failed = False

    @property
    def enabled(self) -> bool:
        return not (self._closed or self._failed)

    def _guard(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> None:
        if not self.enabled:
            return
        try:
            fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - a tracker must never stop a training run
            self._failed = True
            log.warning(
                "%s %s failed (%s: %s); continuing without %s (metrics.jsonl is unaffected)",
                self.kind,
                what,
                type(e).__name__,
                e,
                self.kind,
            )

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        self._guard("log", self._log, metrics, int(step))

    def summary(self, metrics: Mapping[str, Any]) -> None:
        self._guard("summary", self._summary, metrics)

    def close(self, exit_code: int = 0) -> None:
        if self._closed:
            return
        if not self._failed:
            self._guard("close", self._close, exit_code)
        self._closed = True

    def _log(self, metrics: Mapping[str, Any], step: int) -> None:
        raise NotImplementedError

    def _summary(self, metrics: Mapping[str, Any]) -> None:
        raise NotImplementedError

    def _close(self, exit_code: int) -> None:
        raise NotImplementedError


# -- Weights & Biases ----------------------------------------------------------------------------


def _new_wandb_id() -> str:
    """8 lowercase base-36 characters, the shape of the ids W&B generates itself."""
    alphabet = string.ascii_lowercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(8))


def wandb_run_id(run_dir: Path) -> str:
    """The W&B run id of a run directory: read from wandb_id.txt, or created and stored there."""
    path = Path(run_dir) / WANDB_ID_FILE
    try:
        existing = path.read_text().strip()
    except OSError:
        existing = ""
    if existing:
        return existing
    run_id = _new_wandb_id()
    atomic_write_text(path, run_id + "\n")
    return run_id


def _import_wandb() -> Any:
    try:
        import wandb
    except ImportError as e:
        raise ChatlmError(
            f"logger.kind=wandb needs the wandb package, which is not installed: "
            f"{WANDB_INSTALL} (or choose logger=none / logger=tensorboard)"
        ) from e
    return wandb


class WandbSinks(_GuardedSinks):
    kind = "wandb"

    def __init__(self, run: Any, mode: str):
        super().__init__()
        self.run = run
        self.mode = mode

    @property
    def run_id(self) -> str:
        return self.run.id

    def _log(self, metrics: Mapping[str, Any], step: int) -> None:
        row = {k: _plain(v) for k, v in metrics.items() if v is not None}
        if row:
            self.run.log(row, step=step)

    def _summary(self, metrics: Mapping[str, Any]) -> None:
        for key, value in metrics.items():
            if value is not None:
                self.run.summary[key] = _plain(value)

    def _close(self, exit_code: int) -> None:
        self.run.finish(exit_code=exit_code)


def _wandb_mode(logger_cfg: Any) -> str:
    """logger.wandb_mode, unless WANDB_MODE is set in the environment (a node-wide 'no network')."""
    mode = _enum_value(_get(logger_cfg, "wandb_mode", "offline"))
    env = os.environ.get("WANDB_MODE", "").strip().lower()
    if env:
        env = "offline" if env == "dryrun" else env
        if env in ("offline", "online", "disabled") and env != mode:
            log.info("wandb: WANDB_MODE=%s in the environment overrides logger.wandb_mode=%s", env, mode)
            mode = env
    return mode


def _open_wandb(
    logger_cfg: Any, run_dir: Path, config: dict, run_name: str, group: Optional[str], job_type: Optional[str]
) -> Sinks:
    mode = _wandb_mode(logger_cfg)
    if mode == "disabled":
        log.info("wandb: logger.wandb_mode=disabled, nothing is logged to W&B")
        return Sinks()
    wandb = _import_wandb()
    os.environ.setdefault("WANDB_SILENT", "true")  # before wandb reads its settings
    if mode == "online" and not wandb.login(prompt=False, verify=False):
        raise ChatlmError(
            "logger.wandb_mode=online needs W&B credentials and none were found: run "
            "`wandb login` or set WANDB_API_KEY, or use logger.wandb_mode=offline and "
            "`wandb sync` the run directory's wandb/offline-run-* folder later"
        )
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    run_id = wandb_run_id(run_dir)
    if job_type is None:
        job_type = (read_json(run_dir / "run.json") or {}).get("stage")
    settings = wandb.Settings(console="off", silent=True)
    try:
        run = wandb.init(
            project=_get(logger_cfg, "project", "chatlm"),
            entity=_get(logger_cfg, "entity"),
            group=group or _get(logger_cfg, "group"),
            job_type=job_type,
            name=run_name,
            id=run_id,
            resume="allow",
            tags=[str(t) for t in _get(logger_cfg, "tags", [])] or None,
            config=config,
            dir=str(run_dir),
            mode=mode,
            reinit="finish_previous",
            settings=settings,
        )
    except Exception as e:  # noqa: BLE001 - network, auth, bad entity...: say what to do
        hint = " (logger.wandb_mode=offline needs no network)" if mode == "online" else ""
        raise ChatlmError(f"wandb.init failed ({type(e).__name__}: {e}){hint}") from e
    where = run_dir / WANDB_DIR
    if mode == "offline":
        log.info("wandb: offline run %s in %s; upload later with `wandb sync %s/offline-run-*`", run_id, where, where)
    else:
        log.info("wandb: run %s (%s)", run_id, getattr(run, "url", None) or mode)
    return WandbSinks(run, mode)


# -- TensorBoard ---------------------------------------------------------------------------------


def _scalars(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """The numeric leaves of a (possibly nested) dict, keyed 'a/b'; strings, None, lists dropped."""
    out: dict[str, float] = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_scalars(value, prefix=f"{name}/"))
            continue
        value = _plain(value)
        if isinstance(value, bool):
            out[name] = float(value)
        elif isinstance(value, (int, float)):
            out[name] = float(value)
    return out


class TensorBoardSinks(_GuardedSinks):
    kind = "tensorboard"

    def __init__(self, writer: Any):
        super().__init__()
        self.writer = writer
        self._last_step = 0

    @property
    def log_dir(self) -> Path:
        return Path(self.writer.log_dir)

    def _log(self, metrics: Mapping[str, Any], step: int) -> None:
        for key, value in _scalars(metrics).items():
            self.writer.add_scalar(key, value, global_step=step)
        self._last_step = max(self._last_step, step)

    def _summary(self, metrics: Mapping[str, Any]) -> None:
        for key, value in _scalars(metrics).items():
            self.writer.add_scalar(f"summary/{key}", value, global_step=self._last_step)
        self.writer.flush()

    def _close(self, exit_code: int) -> None:
        self.writer.flush()
        self.writer.close()


def _open_tensorboard(run_dir: Path, config: dict, resume_step: Optional[int]) -> Sinks:
    try:
        import tensorboard  # noqa: F401 - torch's SummaryWriter needs it; fail with our message
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        raise ChatlmError(
            f"logger.kind=tensorboard needs the tensorboard package, which is not installed: "
            f"{TENSORBOARD_INSTALL} (or choose logger=none)"
        ) from e
    log_dir = Path(run_dir) / TENSORBOARD_DIR
    log_dir.mkdir(parents=True, exist_ok=True)
    # purge_step hides the events a crashed attempt wrote after the checkpoint we resume from
    writer = SummaryWriter(log_dir=str(log_dir), purge_step=resume_step or None, flush_secs=30)
    if config:
        import json

        text = json.dumps(config, indent=2, default=str)
        writer.add_text("config", "\n".join("    " + line for line in text.splitlines()), global_step=0)
    log.info("tensorboard: scalars in %s (tensorboard --logdir %s)", log_dir, run_dir)
    return TensorBoardSinks(writer)


# -- the entry point -----------------------------------------------------------------------------


def open_sinks(
    logger_cfg: Any,
    run_dir: Path,
    config: dict,
    run_name: str,
    group: Optional[str] = None,
    is_main: bool = True,
    *,
    job_type: Optional[str] = None,
    resume_step: Optional[int] = None,
) -> Sinks:
    """The sinks of `logger_cfg` (a LoggerConfig, DictConfig or dict) for one run directory.

    `group` (the sweep directory's name for sweep jobs) wins over `logger.group`. `job_type`
    defaults to the stage in run.json. `resume_step`: the step a resumed run restarts from
    (TensorBoard then hides the events a previous attempt logged at or after it).
    """
    if not is_main:
        return Sinks()
    kind = _enum_value(_get(logger_cfg, "kind", "none"))
    if kind == "none":
        return Sinks()
    if kind == "wandb":
        return _open_wandb(logger_cfg, Path(run_dir), config, run_name, group, job_type)
    if kind == "tensorboard":
        return _open_tensorboard(Path(run_dir), config, resume_step)
    raise ChatlmError(f"logger.kind: unknown sink {kind!r} (expected none, wandb or tensorboard)")


# ----------------------------------------------------------------------------------------------
# progress


def format_duration(seconds: Optional[float]) -> str:
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "n/a"
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:,.0f} days"


def _fmt_generic(value: Any) -> str:
    value = _plain(value)
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _fmt_known(key: str, value: Any) -> str:
    value = _plain(value)
    if key == "mfu":
        return f"mfu {format_mfu(value)}"
    if value is None:
        return f"{key} n/a"
    if key == "loss":
        return f"loss {value:.4f}"
    if key == "lrm":
        return f"lrm {value:.2f}"
    if key == "dt_ms":
        return f"{value:,.0f} ms"
    if key == "tok_per_s":
        return f"{value:,.0f} tok/s"
    raise KeyError(key)


# the order of the known metrics in a progress line; anything else follows as "key value"
_KNOWN = ("loss", "lrm", "dt_ms", "tok_per_s", "mfu")


def format_metrics(metrics: Mapping[str, Any]) -> list[str]:
    parts = [_fmt_known(k, metrics[k]) for k in _KNOWN if k in metrics]
    parts += [f"{k} {_fmt_generic(v)}" for k, v in metrics.items() if k not in _KNOWN]
    return parts


class _ConsoleStream:
    """A file-like object for logging handlers: lines go through a rich console (above a live bar)."""

    def __init__(self, console: Any):
        self.console = console
        self._buf = ""

    def write(self, text: str) -> int:
        self._buf += text
        while "\n" in self._buf:
            line, self._buf = self._buf.split("\n", 1)
            self.console.print(line, markup=False, highlight=False, emoji=False, soft_wrap=True)
        return len(text)

    def flush(self) -> None:
        if self._buf:
            self.write("\n")


class ProgressReporter:
    """Training progress: a rich bar on a terminal, or a plain log line every `every_steps` steps
    or `every_seconds` seconds (whichever comes first, plus the first and the last step).

    `update(step, **metrics)` takes the number of steps done so far (1..total) and the latest
    values; `loss`, `lrm`, `dt_ms`, `tok_per_s` and `mfu` (a fraction; None prints n/a) get fixed
    formats, other keys follow as "key value". A no-op on non-main ranks.
    """

    def __init__(
        self,
        total_steps: int,
        is_main: bool = True,
        interactive: Optional[bool] = None,
        *,
        every_steps: Optional[int] = None,
        every_seconds: float = 30.0,
        console: Any = None,
        description: str = "train",
        clock: Callable[[], float] = time.monotonic,
    ):
        self.total = max(0, int(total_steps))
        self.is_main = is_main
        self.every_steps = every_steps or max(1, min(100, self.total // 20))
        self.every_seconds = every_seconds
        self.description = description
        self.clock = clock
        self._first: Optional[tuple[float, int]] = None  # (time, step) of the first update
        self._last_logged_step: Optional[int] = None
        self._last_log_time = 0.0
        self._last: Optional[tuple[int, dict]] = None
        self._progress: Any = None
        self._task: Any = None
        self._redirected: list[tuple[logging.StreamHandler, Any]] = []
        self._closed = False
        if not is_main:
            self.interactive = False
            return
        if interactive is None:
            interactive = console.is_terminal if console is not None else _stdout_is_tty()
        self.interactive = bool(interactive)
        if self.interactive:
            self._start_rich(console)

    # -- rich ----------------------------------------------------------------------------------

    def _start_rich(self, console: Any) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TaskProgressColumn,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        console = console or Console()
        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(bar_width=24),
            MofNCompleteColumn(),
            TaskProgressColumn(),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            TextColumn("{task.fields[info]}"),
            console=console,
            refresh_per_second=2,
            transient=False,
        )
        self._task = self._progress.add_task(self.description, total=self.total or None, info="")
        # the standard streams as they are before the live display swaps them for its own proxies
        streams = {id(s) for s in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__) if s is not None}
        self._progress.start()
        if console.is_terminal:
            self._redirect_log_handlers(console, streams)

    def _redirect_log_handlers(self, console: Any, streams: set[int]) -> None:
        """Console log handlers would tear the live bar: route their lines through the rich console."""
        proxy = _ConsoleStream(console)
        for logger in (logging.getLogger(), log):
            for handler in logger.handlers:
                if type(handler) is logging.StreamHandler and id(handler.stream) in streams:
                    self._redirected.append((handler, handler.setStream(proxy)))

    def _restore_log_handlers(self) -> None:
        for handler, stream in self._redirected:
            handler.flush()
            handler.setStream(stream)
        self._redirected.clear()

    # -- both ----------------------------------------------------------------------------------

    def eta_seconds(self, step: int, metrics: Mapping[str, Any]) -> Optional[float]:
        """From the wall-clock rate since the first update (so step 1's compile is excluded); before
        a second update, from `dt_ms` when given."""
        remaining = max(0, self.total - step)
        if remaining == 0:
            return 0.0
        if self._first is not None and step > self._first[1]:
            rate = (self.clock() - self._first[0]) / (step - self._first[1])
            return remaining * rate
        dt_ms = _plain(metrics.get("dt_ms"))
        if isinstance(dt_ms, (int, float)) and math.isfinite(dt_ms) and dt_ms > 0:
            return remaining * dt_ms / 1000
        return None

    def format_line(self, step: int, metrics: Mapping[str, Any], eta: Optional[float]) -> str:
        pct = f" ({100 * step / self.total:.1f}%)" if self.total else ""
        what = "step" if self.description == "train" else self.description
        parts = [f"{what} {step}/{self.total}{pct}", *format_metrics(metrics), f"eta {format_duration(eta)}"]
        return " | ".join(parts)

    def update(self, step: int, **metrics: Any) -> None:
        if not self.is_main or self._closed:
            return
        step = int(step)
        now = self.clock()
        eta = self.eta_seconds(step, metrics)
        if self._first is None:
            self._first = (now, step)
        self._last = (step, metrics)
        if self._progress is not None:
            info = " | ".join(format_metrics({k: metrics[k] for k in ("loss", "tok_per_s", "mfu") if k in metrics}))
            self._progress.update(self._task, completed=step, info=info)
            return
        due = (
            self._last_logged_step is None
            or step >= self.total
            or step - self._last_logged_step >= self.every_steps
            or now - self._last_log_time >= self.every_seconds
        )
        if due and step != self._last_logged_step:
            self._emit(step, metrics, eta, now)

    def _emit(self, step: int, metrics: Mapping[str, Any], eta: Optional[float], now: float) -> None:
        log.info("%s", self.format_line(step, metrics, eta))
        self._last_logged_step = step
        self._last_log_time = now

    def close(self) -> None:
        """Stop the bar (plain mode: log the last step if it was not logged yet). Idempotent."""
        if self._closed or not self.is_main:
            self._closed = True
            return
        self._closed = True
        if self._progress is not None:
            self._restore_log_handlers()
            self._progress.stop()
            self._progress = None
        elif self._last is not None and self._last[0] != self._last_logged_step:
            step, metrics = self._last
            self._emit(step, metrics, self.eta_seconds(step, metrics), self.clock())

    def __enter__(self) -> ProgressReporter:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _stdout_is_tty() -> bool:
    try:
        return sys.stdout.isatty()
    except (AttributeError, ValueError):
        return False
