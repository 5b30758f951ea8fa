"""Training checkpoints: complete, atomic, world-size independent and loadable with weights_only.

Layout inside a run directory (DESIGN §4)::

    checkpoints/
      step_000100/
        model.pt     the model's state_dict (CPU tensors, no `_orig_mod.` prefixes)
        optim.pt     the optimizer's *full* state (`MuonAdamW.full_state_dict()`): independent of
                     the world size, so a run may resume on another number of GPUs
        loader.pt    [state of rank 0's loader, state of rank 1's loader, ...]
        rng.pt       [RNG states of rank 0, rank 1, ...] (`capture_rng_state()`)
        meta.json    step, world size, config hash, model config, derived values, loop state
                     (min val bpb, smoothed loss, training time), chatlm version, time, file sizes
      step_000200/ ...
      latest -> step_000200          (relative symlink)

What nanochat lacked (spec §17 items 4-5) and this module fixes: optimizer state tied to the world
size, no RNG state, resume that skips buffered documents (the loader states hold the packer's whole
buffer), meta formats that differ between stages, and no protection against a kill mid-write.

Atomicity: rank 0 writes everything into a hidden `checkpoints/.step_<N>.tmp-<pid>/`, fsyncs each
file and the directory, renames it to `step_<N>` and fsyncs `checkpoints/`; only then is `latest`
swapped (a symlink replaced by rename). A kill at any moment therefore leaves `latest` pointing at
a complete checkpoint, and a visible `step_<N>` directory is always complete. Hidden leftovers of
killed writes are removed by the next save.

Files are plain `torch.save` pickles restricted to tensors, numbers, strings, None, lists, tuples
and dicts, so `torch.load(..., weights_only=True)` reads every one of them. `save_checkpoint`
converts what the callers hand it: numpy arrays become tensors (unsigned integer arrays widen to
int64) and numpy scalars become Python numbers. Consumers of the loaded states must accept tensors
where numpy arrays were saved: `BestFitPacker.load_state_dict` and `PretrainLoader.load_state_dict`
pass `lengths`, `tokens` and `pending_rows` through `np.asarray(..., dtype=...)`, which takes CPU
tensors, and `position` (a tuple) comes back as a tuple. Loader and RNG states are therefore always
loaded onto the CPU, whatever `map_location` says.
"""

from __future__ import annotations

import collections
import datetime as dt
import errno
import json
import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch

from chatlm.errors import ChatlmError

log = logging.getLogger("chatlm")

FORMAT_VERSION = 1
CHECKPOINTS_DIR = "checkpoints"
LATEST = "latest"
FILES = ("model.pt", "optim.pt", "loader.pt", "rng.pt")
META = "meta.json"

_STEP_RE = re.compile(r"^step_(\d+)$")
# hidden names this module creates: temp dirs of writes, old dirs being replaced or deleted, link temps
_HIDDEN_RE = re.compile(r"^\.step_(\d+)\.(tmp|old|del)-(\d+)$")
_LINK_TMP_RE = re.compile(r"^\.latest\.(\d+)\.tmp$")

PathLike = Union[str, os.PathLike]


class CheckpointError(ChatlmError, RuntimeError):
    """A checkpoint cannot be found or read; the message says where and what to try instead."""


def step_dir_name(step: int) -> str:
    return f"step_{int(step):06d}"


def step_dir(run_dir: PathLike, step: int) -> Path:
    """`<run_dir>/checkpoints/step_<N>`."""
    return Path(run_dir) / CHECKPOINTS_DIR / step_dir_name(step)


# ----------------------------------------------------------------------------------------------
# making states safe for torch.load(weights_only=True)


def to_safe(obj: Any, where: str = "state") -> Any:
    """A copy of `obj` that `torch.load(weights_only=True)` can read back.

    Tensors are detached and moved to the CPU; numpy arrays become tensors (uint16/32/64 widen to
    int64, which every torch version stores and loads); numpy scalars become Python numbers;
    dicts (OrderedDicts keep their class and `_metadata`), lists and tuples are converted
    recursively; `torch.Size` becomes a tuple. Anything else raises TypeError naming the key path.
    """
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, np.ndarray):
        arr = obj
        if arr.dtype.kind == "u" and arr.dtype.itemsize > 1:
            arr = arr.astype(np.int64)
        elif arr.dtype.kind not in "biuf":
            raise TypeError(f"{where}: numpy array of dtype {arr.dtype} cannot be stored in a checkpoint")
        return torch.from_numpy(np.ascontiguousarray(arr).copy())
    if isinstance(obj, np.generic):
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str, bytes, torch.dtype, torch.device)):
        return obj
    if isinstance(obj, dict):
        items = [(k.item() if isinstance(k, np.generic) else k, to_safe(v, f"{where}[{k!r}]")) for k, v in obj.items()]
        if isinstance(obj, collections.OrderedDict):
            out = collections.OrderedDict(items)
            metadata = getattr(obj, "_metadata", None)
            if metadata is not None:
                out._metadata = to_safe(metadata, f"{where}._metadata")  # type: ignore[attr-defined]
            return out
        return dict(items)
    if isinstance(obj, torch.Size):
        return tuple(int(d) for d in obj)
    if isinstance(obj, tuple):
        return tuple(to_safe(v, f"{where}[{i}]") for i, v in enumerate(obj))
    if isinstance(obj, list):
        return [to_safe(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    raise TypeError(
        f"{where}: a {type(obj).__name__} cannot be stored in a weights_only checkpoint; "
        "convert it to tensors, numbers, strings, lists or dicts first"
    )


def _model_state(state: dict) -> dict:
    """The model state dict as CPU tensors, without the `_orig_mod.` prefix torch.compile adds."""
    safe = to_safe(state, "model")
    if any(k.startswith("_orig_mod.") for k in safe):
        cls = type(safe)
        stripped = cls(
            (k.replace("_orig_mod.", "", 1) if k.startswith("_orig_mod.") else k, v) for k, v in safe.items()
        )
        if hasattr(safe, "_metadata"):
            stripped._metadata = {
                ("" if k == "_orig_mod" else k[len("_orig_mod.") :] if k.startswith("_orig_mod.") else k): v
                for k, v in safe._metadata.items()
            }
        safe = stripped
    return safe


# ----------------------------------------------------------------------------------------------
# RNG state of this process


def capture_rng_state() -> dict:
    """This process's RNG states (python `random`, numpy's global RNG, torch CPU and, when CUDA is in
    use, the current CUDA device) as tensors and numbers, ready for `torch.save`."""
    version, internal, gauss_next = random.getstate()
    np_state: tuple = np.random.get_state(legacy=True)  # type: ignore[assignment]  # a tuple when legacy=True
    state: dict[str, Any] = {
        "python": {
            "version": int(version),
            "state": torch.tensor(internal, dtype=torch.int64),
            "gauss_next": gauss_next,
        },
        "numpy": {
            "name": str(np_state[0]),
            "keys": torch.from_numpy(np.asarray(np_state[1]).astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
    }
    # only once CUDA is initialized: querying it otherwise would create a context for nothing
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
        state["cuda_device"] = torch.cuda.current_device()
    return state


def restore_rng_state(state: dict) -> None:
    """Put back what `capture_rng_state()` returned (possibly after a save/load round trip).

    The CUDA state, if saved, goes to the current CUDA device; it is skipped (with a warning) on a
    machine without CUDA."""
    py = state["python"]
    internal = tuple(int(x) for x in torch.as_tensor(py["state"]).tolist())
    random.setstate((int(py["version"]), internal, py["gauss_next"]))
    npst = state["numpy"]
    keys = np.asarray(torch.as_tensor(npst["keys"]).cpu().numpy(), dtype=np.uint32)
    np.random.set_state((npst["name"], keys, int(npst["pos"]), int(npst["has_gauss"]), float(npst["cached_gaussian"])))
    torch.set_rng_state(torch.as_tensor(state["torch"]).cpu().to(torch.uint8))
    if "cuda" in state:
        if torch.cuda.is_available():
            torch.cuda.set_rng_state(torch.as_tensor(state["cuda"]).cpu().to(torch.uint8))
        else:
            log.warning("the checkpoint holds a CUDA RNG state but CUDA is not available: not restored")


# ----------------------------------------------------------------------------------------------
# filesystem helpers


def _fsync_dir(path: Path) -> None:
    """fsync a directory so renames in it are durable; filesystems that refuse (some network
    filesystems) are tolerated."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.EBADF, errno.ENOTSUP, errno.EROFS, errno.EIO):
            raise
    finally:
        os.close(fd)


def _save_file(obj: Any, path: Path) -> int:
    """torch.save + flush + fsync; returns the file size."""
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
        return f.tell()


def _write_text(path: Path, text: str) -> int:
    data = text.encode()
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return len(data)


def _remove_tree(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


def _swap_link(link: Path, target_name: str) -> None:
    """Point `link` at the sibling `target_name` (relative), replacing it atomically by rename."""
    tmp = link.parent / f".{link.name}.{os.getpid()}.tmp"
    tmp.unlink(missing_ok=True)
    os.symlink(target_name, tmp)
    os.replace(tmp, link)


def list_checkpoints(ckpt_dir: PathLike) -> list[tuple[int, Path]]:
    """(step, path) of every visible `step_<N>` directory in `ckpt_dir`, oldest first."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    out = []
    for p in ckpt_dir.iterdir():
        m = _STEP_RE.match(p.name)
        if m and p.is_dir() and not p.is_symlink():
            out.append((int(m.group(1)), p))
    return sorted(out)


def _latest_target(ckpt_dir: Path) -> Optional[Path]:
    """The step directory `latest` points to, or None if there is no link or it dangles."""
    link = ckpt_dir / LATEST
    if not (link.is_symlink() or link.exists()):
        return None
    target = link.resolve()
    return target if target.is_dir() else None


def _clean_leftovers(ckpt_dir: Path) -> list[Path]:
    """Remove what killed writes left behind: hidden temp dirs, half-deleted dirs, link temps.

    A `.step_<N>.old-<pid>` whose `step_<N>` is missing (a kill between the two renames of a
    same-step replacement) is renamed back instead of deleted."""
    removed = []
    for p in list(ckpt_dir.iterdir()):
        m = _HIDDEN_RE.match(p.name)
        if m is not None:
            final = ckpt_dir / step_dir_name(int(m.group(1)))
            if m.group(2) == "old" and not final.exists() and (p / META).is_file():
                os.replace(p, final)
                log.warning("checkpoint: restored %s from an interrupted replacement", final)
                continue
            _remove_tree(p)
            removed.append(p)
        elif _LINK_TMP_RE.match(p.name) and p.is_symlink():
            p.unlink(missing_ok=True)
            removed.append(p)
    if removed:
        log.info("checkpoint: removed leftovers of interrupted writes: %s", ", ".join(p.name for p in removed))
    return removed


# ----------------------------------------------------------------------------------------------
# saving


def save_checkpoint(
    run_dir: PathLike,
    step: int,
    *,
    model_state: dict,
    optim_state: dict,
    loader_states: Sequence[dict],
    rng_states: Sequence[dict],
    meta: dict,
    keep_last: Optional[int] = None,
) -> Path:
    """Write `<run_dir>/checkpoints/step_<N>/` atomically and point `checkpoints/latest` at it.

    Rank 0 only: the caller gathers the per-rank states first (the optimizer's full state is a
    collective, loader and RNG states an all-gather) and passes them here; `loader_states[r]` and
    `rng_states[r]` belong to rank r. `meta` is stored as meta.json after adding `format_version`,
    `step`, `world_size` (from `meta` or else the number of loader states), `chatlm_version`,
    `time` and the size of every file; expected caller keys are `config_hash`, `model_config`,
    derived values and `loop` (min_val_bpb, smoothed loss, training time). JSON carries inf/nan as
    `Infinity`/`NaN`, which Python reads back.

    An existing `step_<N>` (a second save of the same step) is replaced without a moment where
    neither version is complete. `keep_last=k` then deletes the older step directories beyond the
    newest k, never the one `latest` points to. Returns the step directory.
    """
    run_dir = Path(run_dir)
    step = int(step)
    if len(loader_states) != len(rng_states):
        raise ValueError(f"{len(loader_states)} loader states but {len(rng_states)} RNG states: one each per rank")
    world_size = int(meta.get("world_size", len(loader_states)))
    if world_size != len(loader_states):
        raise ValueError(f"meta says world_size {world_size} but {len(loader_states)} loader states were given")
    if keep_last is not None and keep_last < 1:
        raise ValueError(f"keep_last must be >= 1 or None, not {keep_last}")

    ckpt_dir = run_dir / CHECKPOINTS_DIR
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    name = step_dir_name(step)
    final = ckpt_dir / name
    pid = os.getpid()
    tmp = ckpt_dir / f".{name}.tmp-{pid}"
    _clean_leftovers(ckpt_dir)

    # convert before touching the disk: a state that cannot be stored fails here, not half-written
    payloads = {
        "model.pt": _model_state(model_state),
        "optim.pt": to_safe(optim_state, "optim"),
        "loader.pt": [to_safe(s, f"loader[{r}]") for r, s in enumerate(loader_states)],
        "rng.pt": [to_safe(s, f"rng[{r}]") for r, s in enumerate(rng_states)],
    }
    from chatlm import __version__

    meta_out = json.loads(json.dumps(meta, default=str))  # a JSON-clean copy (tuples -> lists etc.)
    meta_out.update(
        format_version=FORMAT_VERSION,
        step=step,
        world_size=world_size,
        chatlm_version=__version__,
        time=dt.datetime.now(dt.UTC).astimezone().isoformat(timespec="seconds"),
    )

    _remove_tree(tmp)
    tmp.mkdir()
    try:
        sizes = {}
        for fname in FILES:
            sizes[fname] = _save_file(payloads[fname], tmp / fname)
        meta_out["files"] = sizes
        _write_text(tmp / META, json.dumps(meta_out, indent=2) + "\n")  # last: its presence marks completion
        _fsync_dir(tmp)
        if final.exists():
            # replace a same-step directory: move it aside (hidden), move the new one in, drop the old
            old = ckpt_dir / f".{name}.old-{pid}"
            _remove_tree(old)
            os.replace(final, old)
            os.replace(tmp, final)
            _fsync_dir(ckpt_dir)
            _remove_tree(old)
        else:
            os.replace(tmp, final)
        _fsync_dir(ckpt_dir)
    except BaseException:
        _remove_tree(tmp)
        raise
    _swap_link(ckpt_dir / LATEST, name)
    _fsync_dir(ckpt_dir)
    if keep_last is not None:
        prune_checkpoints(ckpt_dir, keep_last)
    return final


def prune_checkpoints(ckpt_dir: PathLike, keep_last: int) -> list[Path]:
    """Delete step directories older than the newest `keep_last`, never the one `latest` points
    to. Each is first renamed to a hidden name, so no half-deleted `step_<N>` is ever visible."""
    ckpt_dir = Path(ckpt_dir)
    steps = list_checkpoints(ckpt_dir)
    latest = _latest_target(ckpt_dir)
    keep = {p for _, p in steps[-keep_last:]} if keep_last > 0 else set()
    removed = []
    for _, path in steps:
        if path in keep or (latest is not None and path.resolve() == latest):
            continue
        doomed = ckpt_dir / f".{path.name}.del-{os.getpid()}"
        _remove_tree(doomed)
        os.replace(path, doomed)
        _remove_tree(doomed)
        removed.append(path)
    if removed:
        _fsync_dir(ckpt_dir)
        log.info("checkpoint: removed %s (keep_last=%d)", ", ".join(p.name for p in removed), keep_last)
    return removed


# ----------------------------------------------------------------------------------------------
# finding and loading


def _damaged(step_dir: Path, what: str) -> CheckpointError:
    """A CheckpointError for a damaged step directory that lists the other steps to resume from."""
    ckpt_dir = step_dir.parent
    others = [(s, p) for s, p in list_checkpoints(ckpt_dir) if p.resolve() != step_dir.resolve()]
    m = _STEP_RE.match(step_dir.name)
    this = int(m.group(1)) if m else None
    earlier = [p for s, p in others if this is None or s < this]
    hint = (
        f"resume from the previous one with resume={earlier[-1]}"
        if earlier
        else "no earlier checkpoint exists; start the run again (resume=never) or pick another checkpoint"
    )
    return CheckpointError(
        f"{what}: the checkpoint {step_dir} is damaged. Other checkpoints in {ckpt_dir}: "
        f"{', '.join(p.name for _, p in others) or 'none'}; {hint}"
    )


def _is_step_dir(p: Path) -> bool:
    return p.is_dir() and (_STEP_RE.match(p.name) is not None or (p / META).exists() or (p / "model.pt").exists())


def latest_checkpoint(run_or_ckpt_dir: PathLike) -> Optional[Path]:
    """The step directory a resume would use, or None when there is none (no error)."""
    try:
        return find_checkpoint(run_or_ckpt_dir)
    except CheckpointError:
        return None


def find_checkpoint(path: PathLike) -> Path:
    """The step directory meant by `path`: a run directory (its `checkpoints/latest`), a
    `checkpoints/` directory (its `latest`), a `latest` link or a `step_<N>` directory.

    If `latest` is missing or dangles but complete step directories exist, the newest one is used
    (with a warning)."""
    p = Path(path).expanduser()
    if not p.exists():
        if p.is_symlink():
            raise CheckpointError(f"{p} is a link to {os.readlink(p)}, which does not exist")
        raise CheckpointError(f"no checkpoint at {p}: the path does not exist")
    if not p.is_dir():
        raise CheckpointError(
            f"{p} is a file, not a checkpoint: pass a run directory, its checkpoints/ directory or a step_<N> directory"
        )
    if p.is_symlink() or _is_step_dir(p):
        p = p.resolve()
        if _is_step_dir(p):
            return p
    if (p / CHECKPOINTS_DIR).is_dir():
        ckpt_dir = p / CHECKPOINTS_DIR
    elif p.name == CHECKPOINTS_DIR or (p / LATEST).is_symlink() or list_checkpoints(p):
        ckpt_dir = p
    else:
        raise CheckpointError(
            f"no checkpoint found: looked for {p / CHECKPOINTS_DIR / LATEST} and "
            f"{p / CHECKPOINTS_DIR}/step_<N>/; this run has not saved a checkpoint yet "
            "(checkpoints are written every save_every steps and at the end)"
        )
    target = _latest_target(ckpt_dir)
    if target is not None:
        return target
    complete = [d for _, d in list_checkpoints(ckpt_dir) if (d / META).is_file()]
    if complete:
        log.warning(
            "checkpoint: %s is missing or broken; using the newest complete checkpoint %s",
            ckpt_dir / LATEST,
            complete[-1],
        )
        return complete[-1].resolve()
    raise CheckpointError(
        f"no checkpoint found in {ckpt_dir}: no valid '{LATEST}' link and no step_<N> directories with a meta.json"
    )


def read_meta(step_dir: PathLike) -> dict:
    """meta.json of a step directory (CheckpointError if missing or unreadable)."""
    step_dir = Path(step_dir)
    path = step_dir / META
    if not path.is_file():
        raise _damaged(step_dir, f"{path} is missing")
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _damaged(step_dir, f"{path} is unreadable ({type(e).__name__}: {e})") from e
    if not isinstance(meta, dict) or "step" not in meta:
        raise _damaged(step_dir, f"{path} is not a chatlm checkpoint meta (no 'step' key)")
    if int(meta.get("format_version", FORMAT_VERSION)) > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format {meta['format_version']}, newer than this chatlm "
            f"({FORMAT_VERSION}) reads: upgrade chatlm"
        )
    return meta


def _load_file(step_dir: Path, fname: str, meta: dict, map_location: Any) -> Any:
    path = step_dir / fname
    if not path.is_file():
        raise _damaged(step_dir, f"{path} is missing")
    expected = (meta.get("files") or {}).get(fname)
    size = path.stat().st_size
    if expected is not None and size != int(expected):
        raise _damaged(step_dir, f"{path} is truncated or altered ({size} bytes, meta.json says {expected})")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # zipfile/pickle/EOF/RuntimeError: all mean "this file is not what we wrote"
        first_line = (str(e).splitlines() or [""])[0][:200]
        raise _damaged(step_dir, f"{path} cannot be loaded ({type(e).__name__}: {first_line})") from e


def load_checkpoint(
    path: PathLike, map_location: Any = "cpu", *, parts: Sequence[str] = ("model", "optim", "loader", "rng")
) -> dict:
    """Load a checkpoint: {'model', 'optim', 'loader', 'rng', 'meta', 'path'}.

    `path` is anything `find_checkpoint` accepts. `map_location` applies to the model and optimizer
    tensors; loader and RNG states are always loaded onto the CPU (numpy and the RNG setters need
    host memory). `parts` selects which .pt files to read (e.g. ('model',) for init_from or
    evaluation); the others are None. Every file is read with `weights_only=True`."""
    step_dir = find_checkpoint(path)
    meta = read_meta(step_dir)
    out: dict[str, Any] = {"model": None, "optim": None, "loader": None, "rng": None, "meta": meta, "path": step_dir}
    for part in parts:
        if part not in ("model", "optim", "loader", "rng"):
            raise ValueError(f"unknown checkpoint part {part!r}")
        loc = map_location if part in ("model", "optim") else "cpu"
        out[part] = _load_file(step_dir, f"{part}.pt", meta, loc)
    for part in ("loader", "rng"):
        states = out[part]
        if states is not None and len(states) != int(meta["world_size"]):
            raise _damaged(
                step_dir,
                f"{step_dir / (part + '.pt')} holds {len(states)} rank states but meta.json "
                f"says world_size {meta['world_size']}",
            )
    return out
