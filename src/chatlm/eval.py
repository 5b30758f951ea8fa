"""`python -m chatlm.eval ckpt=<run dir | checkpoint>`: score a checkpoint (body: chatlm.evals.runner)."""

from __future__ import annotations

from chatlm.evals.runner import evaluate
from chatlm.hydra.app import run_stage


def main() -> None:
    run_stage("eval", evaluate)


if __name__ == "__main__":
    main()
