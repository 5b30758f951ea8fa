#!/usr/bin/env bash
# Start a throw-away Slurm cluster on this machine, for development and for the test suite.
#
#   bash launch/slurm/up.sh [BASE]      # as root; default BASE=/tmp/chatlm-slurm
#   ... sbatch / srun / python -m chatlm.train cluster=slurm_cpu debug=smoke ...
#   bash launch/slurm/down.sh [BASE]
#
# What you get: Debian's Slurm (slurmctld + one slurmd per virtual node, all on 127.0.0.1),
# munge for authentication, and MariaDB + slurmdbd for accounting. Accounting is not optional:
# submitit learns that a job ended only through `sacct`, so without it a job that Slurm kills
# (time limit, scancel) would be waited for forever.
#
# Needs root on Debian/Ubuntu (apt). No systemd: every daemon is started by hand with its stdio on
# /dev/null (so a caller capturing output is never held open), and stopped by down.sh from its pid file.
#
# Knobs (environment):
#   CHATLM_SLURM_NODES  virtual nodes n1..nN (default 2)
#   CHATLM_SLURM_CPUS   CPUs declared per node; may exceed the real cores (default 4)
#   CHATLM_SLURM_GPUS   fake GPUs per node: char devices Slurm schedules as gres/gpu (default 2)
#   CHATLM_SLURM_MEM_MB memory declared per node, must not exceed the real memory (default 8000)
set -euo pipefail
BASE=${1:-/tmp/chatlm-slurm}
NODES=${CHATLM_SLURM_NODES:-2}
CPUS=${CHATLM_SLURM_CPUS:-4}
GPUS=${CHATLM_SLURM_GPUS:-2}
MEM_MB=${CHATLM_SLURM_MEM_MB:-8000}
HOST=$(hostname -s)
say() { echo "[slurm up $(date +%T)] $*" >&2; }
retry() {  # retry SECONDS COMMAND...: poll every 0.2 s until COMMAND succeeds
  local tries=$(( $1 * 5 )); shift
  for _ in $(seq "$tries"); do "$@" >/dev/null 2>&1 && return 0; sleep 0.2; done
  return 1
}
[ "$(id -u)" = 0 ] || { echo "launch/slurm/up.sh must run as root (it installs packages and starts daemons)" >&2; exit 1; }

# 1. packages (launch/slurm/install.sh; .ci/run calls it too) -------------------------------
bash "$(dirname "$0")/install.sh"

# 2. names: slurmd finds its node by `hostname -s`, jobs find the master rank through the node list
getent hosts "$HOST" >/dev/null || echo "127.0.0.1 $HOST" >> /etc/hosts
NODE_NAMES=$(seq -f 'n%g' 1 "$NODES" | tr '\n' ' ')
for n in $NODE_NAMES; do getent hosts "$n" >/dev/null || echo "127.0.0.1 $n" >> /etc/hosts; done
mkdir -p "$BASE"/{log,run,state/ctld,state/d,dev,db} /etc/slurm

# 3. munge ---------------------------------------------------------------------------------
if [ ! -s /etc/munge/munge.key ]; then
  mungekey --create --keyfile /etc/munge/munge.key
  chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
fi
mkdir -p /run/munge /var/log/munge /var/lib/munge
chown munge:munge /run/munge /var/log/munge /var/lib/munge && chmod 755 /run/munge
if ! (munge -n </dev/null | unmunge) >/dev/null 2>&1; then
  say "munged"
  rm -f /run/munge/munge.socket.2*
  runuser -u munge -- /usr/sbin/munged </dev/null >/dev/null 2>&1
  retry 10 sh -c 'munge -n </dev/null | unmunge'
fi

# 4. accounting: MariaDB (does not fork: setsid it) + slurmdbd ------------------------------
chown mysql:mysql "$BASE/db"
mkdir -p /run/mysqld && chown mysql:mysql /run/mysqld
[ -d /var/lib/mysql/mysql ] || mariadb-install-db --user=mysql >/dev/null
if ! mariadb -e 'select 1' >/dev/null 2>&1; then
  say "mariadbd"
  rm -f /run/mysqld/mysqld.sock
  setsid /usr/sbin/mariadbd --user=mysql --skip-networking --innodb-buffer-pool-size=64M \
    --log-error="$BASE/db/mariadb.err" --pid-file="$BASE/db/mariadb.pid" </dev/null >/dev/null 2>&1 &
  retry 30 mariadb -e 'select 1' || { cat "$BASE/db/mariadb.err" >&2; exit 1; }
fi
# A fresh database each time: job ids restart at 1 with a fresh controller state, and `sacct -j N`
# would otherwise report an old job N from an earlier cluster as already finished.
mariadb -e "DROP DATABASE IF EXISTS slurm_acct_db;
            CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'slurm';
            GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost'; FLUSH PRIVILEGES;"
cat > /etc/slurm/slurmdbd.conf <<CONF
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=6819
SlurmUser=root
PidFile=$BASE/run/slurmdbd.pid
LogFile=$BASE/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=slurm
StorageLoc=slurm_acct_db
CONF
chmod 600 /etc/slurm/slurmdbd.conf   # slurmdbd refuses a readable one

# 5. slurm.conf and gres.conf (fake GPUs are char devices 1,3 = /dev/null) ---------------------
: > /etc/slurm/gres.conf
GRES_TYPES="" NODE_GRES=""
if [ "$GPUS" -gt 0 ]; then
  for i in $(seq 0 $((GPUS - 1))); do [ -e "$BASE/dev/gpu$i" ] || mknod "$BASE/dev/gpu$i" c 1 3; done
  echo "NodeName=n[1-$NODES] Name=gpu File=$BASE/dev/gpu[0-$((GPUS - 1))]" > /etc/slurm/gres.conf
  GRES_TYPES="GresTypes=gpu" NODE_GRES="Gres=gpu:$GPUS"
fi
cat > /etc/slurm/slurm.conf <<CONF
ClusterName=chatlm
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# a requeued job may start again after cred_expire seconds (Slurm's default: 120)
AuthInfo=cred_expire=10
MpiDefault=none
# plain /proc process tracking, no cgroups and no CPU binding
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=6819
JobAcctGatherType=jobacct_gather/linux
SlurmctldPidFile=$BASE/run/slurmctld.pid
SlurmdPidFile=$BASE/run/slurmd-%n.pid
SlurmctldLogFile=$BASE/log/slurmctld.log
SlurmdLogFile=$BASE/log/slurmd-%n.log
StateSaveLocation=$BASE/state/ctld
SlurmdSpoolDir=$BASE/state/d/%n
SlurmctldPort=6817
SlurmdPort=6818
ReturnToService=2
SchedulerType=sched/backfill
# schedule every 2 s instead of every 30-60 s: requeued jobs restart quickly
SchedulerParameters=bf_interval=2,sched_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
# let a node declare more CPUs than the machine has
SlurmdParameters=config_overrides
MinJobAge=300
KillWait=5
InactiveLimit=0
$GRES_TYPES
NodeName=n[1-$NODES] NodeHostname=$HOST NodeAddr=127.0.0.1 Port=[17001-$((17000 + NODES))] CPUs=$CPUS RealMemory=$MEM_MB $NODE_GRES State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF

# 6. daemons ---------------------------------------------------------------------------------
say "slurmdbd"
/usr/sbin/slurmdbd </dev/null >/dev/null 2>&1
retry 30 sacctmgr -n list cluster || { tail -20 "$BASE/log/slurmdbd.log" >&2; exit 1; }
sacctmgr -n -P list cluster format=cluster | grep -qx chatlm || sacctmgr -i add cluster chatlm >/dev/null
say "slurmctld + $NODES slurmd"
rm -rf "$BASE/state/ctld"/*
/usr/sbin/slurmctld -c </dev/null >/dev/null 2>&1   # -c: start clean, job ids from 1
for n in $NODE_NAMES; do
  mkdir -p "$BASE/state/d/$n"
  /usr/sbin/slurmd -N "$n" </dev/null >/dev/null 2>&1
done
if ! retry 30 sh -c "[ \$(sinfo -h -N -o %t | grep -cx idle) = $NODES ]"; then
  sinfo -N -o '%N %t %E' >&2; tail -20 "$BASE"/log/slurm*.log >&2; exit 1
fi
say "up: $(sinfo -h -N -o '%N:%t:cpus=%c:gres=%G' | tr '\n' ' ')"
