#!/usr/bin/env bash
# A private single-node Slurm cluster for tests and benchmarks, from Debian's
# packages (scripts/setup_slurm.sh installs them), started without systemd:
# its own munged (own key and socket, run as the munge user), slurmctld and
# slurmd on 127.0.0.1 with free ports, accounting off. Everything it writes
# lives in DIR, so two clusters (two test runs) never share anything.
#
#   scripts/slurm_cluster.sh start DIR   # prints `export SLURM_CONF=DIR/slurm.conf`
#   scripts/slurm_cluster.sh stop DIR    # cancels every job, stops the daemons
#
# Exit 3 from `start`: this machine cannot run one (not root, or the packages
# are absent); the message says which. Clients (sbatch, squeue, recflow) find
# the cluster through SLURM_CONF.
set -euo pipefail

die() { echo "slurm_cluster: $*" >&2; exit "${2:-1}"; }

cmd="${1:-}"
dir="${2:-}"
[ -n "$cmd" ] && [ -n "$dir" ] || die "usage: $0 start|stop DIR" 2

pid_of() { [ -f "$1" ] && cat "$1" 2>/dev/null || true; }

# Waits up to $2 seconds for the process in pid file $1 to end.
wait_gone() {
  local pid t=0
  pid="$(pid_of "$1")"
  [ -n "$pid" ] || return 0
  while kill -0 "$pid" 2>/dev/null && [ "$t" -lt $(( $2 * 10 )) ]; do sleep 0.1; t=$((t + 1)); done
  if kill -0 "$pid" 2>/dev/null; then kill -KILL "$pid" 2>/dev/null || true; fi
}

stop() {
  export SLURM_CONF="$dir/slurm.conf"
  if [ -f "$SLURM_CONF" ] && [ -n "$(pid_of "$dir/slurmctld.pid")" ]; then
    # Jobs first, so no slurmstepd (and no stage) outlives its slurmd.
    scancel --full --quiet --user="$(id -un)" 2>/dev/null || true
    for _ in $(seq 1 100); do
      [ -z "$(squeue -h -o %i 2>/dev/null)" ] && break
      sleep 0.1
    done
  fi
  for d in slurmd slurmctld; do
    pid="$(pid_of "$dir/$d.pid")"
    [ -n "$pid" ] && kill -TERM "$pid" 2>/dev/null || true
  done
  wait_gone "$dir/slurmd.pid" 10
  wait_gone "$dir/slurmctld.pid" 10
  pid="$(pid_of "$dir/munge/munged.pid")"
  [ -n "$pid" ] && kill -TERM "$pid" 2>/dev/null || true
  wait_gone "$dir/munge/munged.pid" 5
  rm -f "$dir/slurmd.pid" "$dir/slurmctld.pid"
}

free_port() {
  local p
  for _ in $(seq 1 200); do
    p=$(( 20000 + RANDOM % 30000 ))
    if ! ss -Htln "sport = :$p" 2>/dev/null | grep -q .; then echo "$p"; return; fi
  done
  die "no free TCP port found"
}

start() {
  [ "$(id -u)" = 0 ] || die "needs root (slurmd and a munged run as the munge user)" 3
  for b in munged mungekey slurmctld slurmd sbatch squeue scontrol scancel sinfo; do
    command -v "$b" >/dev/null || die "\`$b\` not found: run scripts/setup_slurm.sh (Debian packages munge slurmctld slurmd slurm-client)" 3
  done
  id munge >/dev/null 2>&1 || die "no \`munge\` user: reinstall the munge package" 3
  mkdir -p "$dir"
  dir="$(cd "$dir" && pwd)"
  chmod 0755 "$dir"
  mkdir -p "$dir/state" "$dir/spool" "$dir/munge"
  chown munge:munge "$dir/munge"
  # Clients need to reach the socket: execute for all, listing for none.
  chmod 0711 "$dir/munge"

  # munge: own key and socket, so the machine's munged (if any) is untouched.
  local m="$dir/munge"
  if [ ! -f "$m/munge.key" ]; then
    runuser -u munge -- mungekey --create --keyfile="$m/munge.key" >/dev/null
  fi
  runuser -u munge -- munged --socket="$m/munge.sock" --key-file="$m/munge.key" \
    --pid-file="$m/munged.pid" --log-file="$m/munged.log" --seed-file="$m/munged.seed" \
    || die "munged did not start (see $m/munged.log)"

  local host ctl_port d_port cpus mem
  host="$(hostname -s)"
  ctl_port="$(free_port)"
  d_port="$(free_port)"
  cpus="$(nproc)"
  mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 / 2 ))
  cat >"$dir/slurm.conf" <<EOF
# Written by scripts/slurm_cluster.sh: a private test cluster.
ClusterName=recflowtest
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$ctl_port
SlurmdPort=$d_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$m/munge.sock
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.log
ProctrackType=proctrack/pgid
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
# Short waits: a test cluster, not a production one.
SchedulerParameters=defer_batch,sched_min_interval=100000
MessageTimeout=10
KillWait=5
MinJobAge=300
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
  export SLURM_CONF="$dir/slurm.conf"
  slurmctld -f "$SLURM_CONF" -i || die "slurmctld did not start (see $dir/slurmctld.log)"
  slurmd -f "$SLURM_CONF" || die "slurmd did not start (see $dir/slurmd.log)"
  for _ in $(seq 1 300); do
    state="$(sinfo -h -o %T 2>/dev/null | head -1 || true)"
    case "$state" in idle|mixed|allocated) echo "export SLURM_CONF=$SLURM_CONF"; return 0 ;; esac
    sleep 0.1
  done
  echo "slurm_cluster: the node did not become idle in 30 s (state: ${state:-none}); logs:" >&2
  tail -n 20 "$dir/slurmctld.log" "$dir/slurmd.log" >&2 || true
  stop
  exit 1
}

case "$cmd" in
  start) start ;;
  stop) stop ;;
  *) die "usage: $0 start|stop DIR" 2 ;;
esac
