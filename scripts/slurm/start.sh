#!/usr/bin/env bash
# Starts a one-node SLURM cluster on this machine (node "localhost", partition "debug") for the tests and
# for trying `--profile profiles/slurm` without a real cluster. Needs root: it installs Debian's
# slurm-wlm and munge when missing (apt only, no other network) and starts munged, slurmctld and slurmd
# directly (containers have no systemd). Idempotent: a second call with the cluster up only re-checks it.
# Stop everything with scripts/slurm/stop.sh.
#
# Environment: SDS_SLURM_WAIT (seconds to wait for the node to become idle, default 90).
# Exit status: 0 cluster up, 3 the packages could not be installed (apt failed), 1 any other error.
set -euo pipefail

WAIT=${SDS_SLURM_WAIT:-90}
CONF_DIR=/etc/slurm
CONF=$CONF_DIR/slurm.conf
LOG_DIR=/var/log/slurm
CTLD_PID=/run/slurmctld.pid
SLURMD_PID=/run/slurmd.pid
MUNGE_PID=/run/munge/munged.pid

die() { echo "slurm/start.sh: error: $*" >&2; exit 1; }
say() { echo "slurm/start.sh: $*" >&2; }
die_apt() { echo "slurm/start.sh: error: $*" >&2; exit 3; }  # exit 3: the packages could not be installed

[ "$(id -u)" = 0 ] || die "must run as root (it installs packages and starts the SLURM daemons)"
command -v apt-get >/dev/null || die "apt-get not found: this script supports Debian/Ubuntu only"

# --- 1. packages ------------------------------------------------------------------------------------------
PKGS=(slurmctld slurmd slurm-client munge)
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  say "installing ${missing[*]}"
  # The packages' maintainer scripts would try to start the services through init scripts; we start the
  # daemons ourselves below, so forbid that for the duration of the install (policy-rc.d exit 101 = deny).
  policy_created=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
    policy_created=1
  fi
  trap '[ "$policy_created" = 1 ] && rm -f /usr/sbin/policy-rc.d' EXIT
  export DEBIAN_FRONTEND=noninteractive
  # `apt-get update` only when the package lists do not know the packages yet (or the install fails).
  if ! apt-cache show "${missing[@]}" >/dev/null 2>&1 || \
     ! apt-get install -y -q --no-install-recommends "${missing[@]}" >/tmp/sds-slurm-apt.log 2>&1; then
    apt-get update -q >/tmp/sds-slurm-apt.log 2>&1 \
      || die_apt "apt-get update failed (no package repository reachable?); see /tmp/sds-slurm-apt.log"
    apt-get install -y -q --no-install-recommends "${missing[@]}" >>/tmp/sds-slurm-apt.log 2>&1 \
      || die_apt "apt-get install ${missing[*]} failed; see /tmp/sds-slurm-apt.log"
  fi
  [ "$policy_created" = 1 ] && rm -f /usr/sbin/policy-rc.d
  trap - EXIT
fi

# --- 2. slurm.conf ----------------------------------------------------------------------------------------
CPUS=$(nproc)
MEM_MIB=$(awk '/^MemTotal:/ {print int($2 / 1024)}' /proc/meminfo)
REAL_MEM=$(( MEM_MIB * 8 / 10 ))  # slurmd drains a node that has less memory than declared: stay below it
mkdir -p "$CONF_DIR" "$LOG_DIR" /var/spool/slurmctld /var/spool/slurmd
new_conf=$(cat <<EOF
# Written by scripts/slurm/start.sh: a one-node test cluster on localhost (no accounting database).
ClusterName=local
SlurmctldHost=localhost
SlurmUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=$CTLD_PID
SlurmdPidFile=$SLURMD_PID
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
# Finished jobs: one line each here (sacct needs slurmdbd, which this cluster does not run).
JobCompType=jobcomp/filetxt
JobCompLoc=$LOG_DIR/jobcomp.log
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
# Finished jobs stay visible to squeue this long; Snakemake's squeue status check relies on it.
MinJobAge=300
# scancel: SIGTERM, then SIGKILL after this many seconds.
KillWait=5
ReturnToService=2
NodeName=localhost CPUs=$CPUS RealMemory=$REAL_MEM State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF
)
conf_changed=0
if [ ! -f "$CONF" ] || [ "$(cat "$CONF")" != "$new_conf" ]; then
  printf '%s\n' "$new_conf" > "$CONF"
  conf_changed=1
fi

alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

if [ "$conf_changed" = 1 ] && { alive "$CTLD_PID" || alive "$SLURMD_PID"; }; then
  say "slurm.conf changed: restarting the SLURM daemons"
  "$(dirname "$0")/stop.sh" --keep-munge
fi

# --- 3. munge ---------------------------------------------------------------------------------------------
install -d -o munge -g munge -m 0700 /etc/munge /var/lib/munge /var/log/munge
install -d -o munge -g munge -m 0755 /run/munge
if [ ! -s /etc/munge/munge.key ]; then
  if command -v mungekey >/dev/null; then
    mungekey --create --keyfile=/etc/munge/munge.key
  else
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
  fi
fi
chown munge:munge /etc/munge/munge.key && chmod 0400 /etc/munge/munge.key
if ! alive "$MUNGE_PID"; then
  say "starting munged"
  runuser -u munge -- /usr/sbin/munged --pid-file="$MUNGE_PID" || die "munged failed to start (see /var/log/munge/munged.log)"
fi
munge -n | unmunge >/dev/null 2>&1 || die "munge does not work (munge -n | unmunge failed; see /var/log/munge/munged.log)"

# --- 4. slurmctld and slurmd ------------------------------------------------------------------------------
if ! alive "$CTLD_PID"; then
  say "starting slurmctld"
  /usr/sbin/slurmctld || die "slurmctld failed to start (see $LOG_DIR/slurmctld.log)"
fi
if ! alive "$SLURMD_PID"; then
  say "starting slurmd"
  # -N: this node's name in slurm.conf, whatever the machine's hostname is.
  /usr/sbin/slurmd -N localhost || die "slurmd failed to start (see $LOG_DIR/slurmd.log)"
fi

# --- 5. wait for the node ---------------------------------------------------------------------------------
deadline=$(( SECONDS + WAIT ))
state=""
while :; do
  state=$(sinfo -h -n localhost -o %T 2>/dev/null | head -n1 || true)
  case "$state" in
    idle|mixed|allocated|completing) break ;;
    drained|draining|down*|drain*)
      # e.g. left drained by an earlier crash: the node is ours, so put it back into service.
      scontrol update NodeName=localhost State=RESUME >/dev/null 2>&1 || true ;;
  esac
  if [ "$SECONDS" -ge "$deadline" ]; then
    die "node 'localhost' not idle after ${WAIT}s (sinfo state: '${state:-no answer}'); see $LOG_DIR/slurmctld.log and $LOG_DIR/slurmd.log"
  fi
  sleep 1
done
say "cluster up: node localhost ($CPUS CPUs, ${REAL_MEM} MiB) is $state in partition debug"
