#!/usr/bin/env bash
# Stop the cluster launch/slurm/up.sh started: only the daemons named in its pid files.
#   bash launch/slurm/down.sh [BASE]      # as root; default BASE=/tmp/chatlm-slurm
BASE=${1:-/tmp/chatlm-slurm}
stop() {  # stop PIDFILE...: SIGTERM together, wait up to 15 s, then SIGKILL what is left
  local pids=() f pid alive
  for f in "$@"; do
    [ -s "$f" ] || continue
    pid=$(cat "$f"); rm -f "$f"
    kill -TERM "$pid" 2>/dev/null && pids+=("$pid")
  done
  [ ${#pids[@]} = 0 ] && return 0
  for _ in $(seq 300); do
    alive=0
    for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
    [ $alive = 0 ] && return 0
    sleep 0.05
  done
  for pid in "${pids[@]}"; do kill -KILL "$pid" 2>/dev/null && echo "[slurm down] killed $pid" >&2; done
}
# cancel what is still queued or running first, so job processes end with their daemons
if [ -s "$BASE/run/slurmctld.pid" ] && kill -0 "$(cat "$BASE/run/slurmctld.pid")" 2>/dev/null; then
  scancel --user=root 2>/dev/null && sleep 1
fi
stop "$BASE"/run/slurmd-*.pid "$BASE/run/slurmctld.pid"
stop "$BASE/run/slurmdbd.pid" "$BASE/db/mariadb.pid"
stop /run/munge/munged.pid
