#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, for trying slurm/*.sbatch without a real cluster
# (the tests use it). Needs root and Debian's slurmctld, slurmd, slurm-client and munge.
#
#   slurm/local-cluster.sh start     # prints `export SLURM_CONF=...` for the client commands
#   SLURM_CONF=/tmp/distres-slurm/slurm.conf sbatch slurm/train-cpu.sbatch ...
#   slurm/local-cluster.sh stop
#
# Environment (defaults): DISTRES_SLURM_DIR (/tmp/distres-slurm) holds the config, state,
# logs and pid files. No systemd and no cgroups are needed: processes are tracked through
# /proc and jobs run as the submitting user (root).
set -euo pipefail
DIR=${DISTRES_SLURM_DIR:-/tmp/distres-slurm}
CONF=$DIR/slurm.conf
export SLURM_CONF=$CONF

up() { [[ -f $CONF ]] && timeout 5 scontrol ping 2>/dev/null | grep -q "is UP"; }

start() {
  if up; then echo "export SLURM_CONF=$CONF"; return 0; fi
  [[ $(id -u) == 0 ]] || { echo "local-cluster: needs root (slurmd runs jobs as their users)" >&2; exit 1; }
  if pgrep -x slurmctld >/dev/null || pgrep -x slurmd >/dev/null; then
    echo "local-cluster: a SLURM daemon with another configuration is running; stop it or use its SLURM_CONF" >&2
    exit 1
  fi
  for bin in slurmctld slurmd sbatch munged; do
    command -v "$bin" >/dev/null || { echo "local-cluster: $bin missing; apt-get install slurmctld slurmd slurm-client munge" >&2; exit 1; }
  done
  local host cpus mem
  host=$(hostname -s)
  cpus=$(nproc)
  mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 1024 ))
  mkdir -p "$DIR/state" "$DIR/spool"
  chmod 0755 "$DIR" "$DIR/spool"  # slurmd refuses a spool directory others cannot read
  cat > "$CONF" <<EOF
ClusterName=distres-local
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdLogFile=$DIR/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SlurmdParameters=config_overrides
MailProg=/bin/true
ReturnToService=2
# A requeued job would otherwise wait 120 s for its old credential to expire.
AuthInfo=cred_expire=5
SchedulerParameters=bf_interval=1,sched_interval=2
KillWait=30
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=local Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
  if ! pgrep -x munged >/dev/null; then
    mkdir -p /run/munge && chown munge:munge /run/munge && chmod 0755 /run/munge
    runuser -u munge -- /usr/sbin/munged
  fi
  slurmctld -f "$CONF"
  slurmd -f "$CONF"
  for _ in $(seq 50); do
    if up && sinfo -h -o %T 2>/dev/null | grep -qE "^idle"; then echo "export SLURM_CONF=$CONF"; return 0; fi
    sleep 0.2
  done
  echo "local-cluster: SLURM did not come up; see $DIR/slurmctld.log and $DIR/slurmd.log" >&2
  exit 1
}

stop() {
  [[ -f $CONF ]] || return 0
  # Running jobs outlive slurmd: cancel them first.
  scancel --full --quiet --user "$(id -un)" 2>/dev/null || true
  timeout 10 scontrol shutdown 2>/dev/null || true
  for pidfile in "$DIR/slurmd.pid" "$DIR/slurmctld.pid"; do
    if [[ -f $pidfile ]]; then kill "$(cat "$pidfile")" 2>/dev/null || true; rm -f "$pidfile"; fi
  done
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) if up; then echo "up: export SLURM_CONF=$CONF"; else echo "down"; exit 1; fi ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
