"""RL on verifiable rewards (the library side of `python -m chatlm.rl`): tasks and their rewards
(`tasks`, `problems`), sampling rollouts with the engine and the rows they train (`sampling`), the
policy-gradient objective (`objective`) and pass@k (`evaluation`). The stage is assembled in
`chatlm.training.rl`. (The package is not called `rl`: `chatlm.rl` is the stage app.)"""

from chatlm.rollouts.objective import MicroBatch, group_advantages, policy_gradient_loss, token_level_loss
from chatlm.rollouts.problems import Problem
from chatlm.rollouts.tasks import ProblemTask, Task, build_task, check_countdown, check_number

__all__ = [
    "MicroBatch",
    "Problem",
    "ProblemTask",
    "Task",
    "build_task",
    "check_countdown",
    "check_number",
    "group_advantages",
    "policy_gradient_loss",
    "token_level_loss",
]
