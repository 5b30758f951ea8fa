#!/usr/bin/env bash
# Install what launch/slurm/up.sh needs from Debian's apt: Slurm 22.05 (controller, node daemon,
# client tools, accounting daemon), munge and MariaDB. Root only; does nothing when all are present.
set -euo pipefail
want="slurmctld slurmd slurm-client munge slurmdbd mariadb-server"
missing=""
for p in $want; do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done
[ -z "$missing" ] && exit 0
[ "$(id -u)" = 0 ] || { echo "installing$missing needs root" >&2; exit 1; }
echo "[slurm install] apt-get install$missing" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# the packages' postinst scripts try to start services; without systemd that is refused, harmlessly
apt-get install -y -qq --no-install-recommends $missing >/dev/null
