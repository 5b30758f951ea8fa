"""`python -m chatlm.rl`: on-policy RL of a chat model on verifiable rewards (nanochat's chat_rl).

The recipe is `chatlm.training.rl.rl`; this module is the Hydra edge around it.
"""

from __future__ import annotations

from chatlm.config import RLConfig
from chatlm.hydra.app import run_stage
from chatlm.runtime.rundir import Run
from chatlm.training.rl import rl


def train_rl(cfg: RLConfig, run: Run) -> dict:
    return rl(cfg, run)


def main() -> None:
    run_stage("rl", train_rl)


if __name__ == "__main__":
    main()
