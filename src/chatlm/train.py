"""`python -m chatlm.train`: pretrain a base model with nanochat's recipe (its base_train).

The recipe is `chatlm.training.pretrain.pretrain`; this module is the Hydra edge around it.
`--plan` prints the sizes, batch and horizon a run would derive, without training.
"""

from __future__ import annotations

from chatlm.config import TrainConfig
from chatlm.hydra.app import run_stage
from chatlm.runtime.rundir import Run
from chatlm.training.pretrain import describe_run, pretrain


def train(cfg: TrainConfig, run: Run) -> dict:
    return pretrain(cfg, run)


def main() -> None:
    run_stage("train", train, plan=describe_run)


if __name__ == "__main__":
    main()
