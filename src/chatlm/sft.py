"""`python -m chatlm.sft`: fine-tune a pretrained checkpoint into a chat model (nanochat's chat_sft).

The recipe is `chatlm.training.sft.sft`; this module is the Hydra edge around it.
"""

from __future__ import annotations

from chatlm.config import SFTConfig
from chatlm.hydra.app import run_stage
from chatlm.runtime.rundir import Run
from chatlm.training.sft import sft


def train_sft(cfg: SFTConfig, run: Run) -> dict:
    return sft(cfg, run)


def main() -> None:
    run_stage("sft", train_sft)


if __name__ == "__main__":
    main()
