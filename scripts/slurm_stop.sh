#!/usr/bin/env bash
# Stop the one-node SLURM cluster of scripts/slurm_start.sh: cancel its jobs, then stop
# slurmd, slurmctld and munged by the pids in their pid files (never by process name, so no
# other process on the machine is touched). Idempotent; the packages and config stay.
set -uo pipefail

say() { echo "slurm_stop: $*"; }

stop() {  # stop NAME PIDFILE: SIGTERM, wait up to 10 s, then SIGKILL
    local name=$1 pidfile=$2 pid
    [ -s "$pidfile" ] || return 0
    pid=$(cat "$pidfile")
    if kill -0 "$pid" 2>/dev/null; then
        say "stopping $name ($pid)"
        kill "$pid"
        for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
    fi
    rm -f "$pidfile"
}

if [ -s /run/slurmctld.pid ] && kill -0 "$(cat /run/slurmctld.pid)" 2>/dev/null; then
    # Parsl blocks left by a killed driver would otherwise run on until their walltime.
    jobs=$(squeue -h -o %i 2>/dev/null | tr '\n' ' ')
    if [ -n "${jobs// /}" ]; then
        say "cancelling jobs $jobs"
        # shellcheck disable=SC2086
        scancel $jobs 2>/dev/null || true
    fi
fi
stop slurmd /run/slurmd.pid
stop slurmctld /run/slurmctld.pid
stop munged /run/munge/munged.pid
say "stopped"
