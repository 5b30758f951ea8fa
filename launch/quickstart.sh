#!/usr/bin/env bash
# From nothing to a model you can talk to, on a CPU: tokenizer -> pretraining -> base evals ->
# SFT -> chat evals -> (--with rl: a few RL steps) -> one chat answer, then the report card and the
# commands to chat with the model and to serve it. Nothing is downloaded beyond PyPI packages.
#   bash launch/quickstart.sh                      # outputs/pipelines/quickstart/
#   bash launch/quickstart.sh --with rl            # also the optional RL step
#   bash launch/quickstart.sh --dir /tmp/qs --var base_args="experiment=quickstart steps=60"
# Re-running the same command skips the completed stages and resumes an interrupted one
# (conf/pipeline/quickstart.yaml lists the stages; docs/pipelines.md explains the rules).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  bash launch/setup.sh
fi
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(nproc)}"
exec .venv/bin/python -m chatlm.cli pipeline run quickstart "$@"
