#!/usr/bin/env bash
# Stops the one-node test cluster of scripts/slurm/start.sh: cancels its jobs, stops slurmd, slurmctld and
# munged (by their pid files, nothing else) and removes the controller's saved state, so the next start
# is fresh. Installed packages, slurm.conf, the munge key and the logs in /var/log/slurm stay.
# Idempotent: nothing running is fine. `--keep-munge` leaves munged running (used by start.sh on restart).
set -euo pipefail

KEEP_MUNGE=0
[ "${1:-}" = "--keep-munge" ] && KEEP_MUNGE=1
say() { echo "slurm/stop.sh: $*" >&2; }
[ "$(id -u)" = 0 ] || { say "error: must run as root"; exit 1; }

alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

# Jobs first, while slurmctld can still cancel them (their processes belong to slurmstepd, not to us).
if alive /run/slurmctld.pid && command -v squeue >/dev/null; then
  scancel --partition=debug >/dev/null 2>&1 || true
  for _ in $(seq 20); do
    [ -z "$(squeue -h -t PD,R,CG -o %i 2>/dev/null)" ] && break
    sleep 0.5
  done
fi

stop_pidfile() {  # name pidfile: SIGTERM, up to 10 s grace, then SIGKILL
  local name=$1 pidfile=$2 pid
  alive "$pidfile" || { rm -f "$pidfile"; return 0; }
  pid=$(cat "$pidfile")
  say "stopping $name (pid $pid)"
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
  if kill -0 "$pid" 2>/dev/null; then
    say "$name did not exit after SIGTERM: SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$pidfile"
}

stop_pidfile slurmd /run/slurmd.pid
stop_pidfile slurmctld /run/slurmctld.pid
[ "$KEEP_MUNGE" = 1 ] || stop_pidfile munged /run/munge/munged.pid
# Saved controller state (job records, node state); the next start begins from a clean slate.
rm -rf /var/spool/slurmctld/* /var/spool/slurmd/*
say "stopped"
