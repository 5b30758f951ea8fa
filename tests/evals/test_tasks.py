"""The eval-only registry: every split an evaluator reads is refused as a training source."""

from __future__ import annotations

import pytest

from chatlm.errors import ConfigError
from chatlm.evals import chat, core
from chatlm.evals.tasks import SPLITS, eval_only_split, refuse_eval_only


def test_every_scored_task_is_registered_eval_only():
    names = {s.task for s in SPLITS if s.eval_only}
    assert set(chat.CATEGORICAL + chat.GENERATIVE) <= names and set(core.CORE_LABELS) <= names


@pytest.mark.parametrize(
    "source",
    [
        "gsm8k",
        "mmlu",
        "hellaswag",
        "/home/me/.cache/chatlm/evals/chat/gsm8k.jsonl",
        "evals/chat/humaneval.jsonl",
        "/data/eval_bundle/core/eval_data/world_knowledge/arc_easy.jsonl",
        "GSM8K",
        "ARC-Easy",
        "/data/sft/../evals/chat/mmlu.jsonl/",
    ],
)
def test_eval_splits_are_refused_with_the_key(source):
    assert eval_only_split(source) is not None
    with pytest.raises(ConfigError, match=r"sft\.mixture\.0\.path: .* which chatlm\.eval scores"):
        refuse_eval_only(source, "sft.mixture.0.path")


@pytest.mark.parametrize("source", ["smoltalk", "/data/chitchat/talk.jsonl", "arc_easy_train", "gsm8k_train.jsonl"])
def test_other_sources_pass(source):
    assert eval_only_split(source) is None
    refuse_eval_only(source, "sft.mixture.0.path")


def test_a_symlink_to_eval_data_is_refused(tmp_path):
    target = tmp_path / "evals" / "chat" / "gsm8k.jsonl"
    target.parent.mkdir(parents=True)
    target.write_text("{}\n")
    link = tmp_path / "my_math.jsonl"
    link.symlink_to(target)
    assert eval_only_split(str(link)).task == "gsm8k"
