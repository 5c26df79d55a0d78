#!/usr/bin/env bash
# Installs what the Slurm executor's tests and benchmark need: Debian's
# munge, slurmctld, slurmd and slurm-client (a single-node cluster is then
# configured and started by scripts/slurm_cluster.sh, without systemd).
# Idempotent and quiet when everything is there. Without root or apt-get it
# only says so: the Slurm tests then report that they cannot run (and fail
# under RECFLOW_REQUIRE_SLURM=1, as CI sets it).
# Sourced by scripts/setup.sh; also runnable on its own.

slurm_setup_log() { printf '[setup] %s\n' "$*" >&2; }

slurm_setup_missing() {
  local b
  for b in munged mungekey slurmctld slurmd sbatch squeue scontrol scancel sinfo; do
    command -v "$b" >/dev/null 2>&1 || { echo "$b"; return; }
  done
}

if [ -n "$(slurm_setup_missing)" ]; then
  if [ "$(id -u)" != 0 ]; then
    slurm_setup_log "Slurm test cluster: \`$(slurm_setup_missing)\` missing and not root: the Slurm tests will be skipped (install munge slurmctld slurmd slurm-client as root)"
  elif ! command -v apt-get >/dev/null 2>&1; then
    slurm_setup_log "Slurm test cluster: \`$(slurm_setup_missing)\` missing and no apt-get: the Slurm tests will be skipped"
  else
    slurm_setup_log "installing munge slurmctld slurmd slurm-client (Debian packages) for the Slurm executor's tests"
    export DEBIAN_FRONTEND=noninteractive
    # The packages' service starts fail harmlessly without systemd; the
    # tests start their own daemons.
    apt-get update -qq >/dev/null
    apt-get install -y -qq --no-install-recommends munge slurmctld slurmd slurm-client >/dev/null
  fi
fi
unset -f slurm_setup_log slurm_setup_missing
