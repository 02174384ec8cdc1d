#!/usr/bin/env bash
# Start a one-node SLURM cluster on this machine, for the `slurm` tests and for trying the
# 'slurm' cluster kind without a real cluster.
#
# Debian's slurm-wlm and munge are installed when missing (needs root and apt). munged,
# slurmctld and slurmd run as root, without systemd; their pid files and logs are under
# /run and /var/log/slurm. The node is this machine (its real hostname, CPUs and memory, read
# from `slurmd -C`) in one default partition, `debug`. There are no cgroups (proctrack/linuxproc,
# task/none) and no accounting daemon: jobs are checked with squeue/scontrol, and `sacct -c`
# reads the job completion log.
#
# Idempotent: daemons that are already running are left alone (the config is rewritten and
# the daemons restarted only when the config changed), and the script returns as soon as
# `sinfo` shows the node idle (or mixed/allocated when jobs already run). Stop with
# scripts/slurm_stop.sh.
set -euo pipefail

PARTITION=${SLURM_PARTITION:-debug}
CONF_DIR=/etc/slurm
CONF=$CONF_DIR/slurm.conf
LOG_DIR=/var/log/slurm
CTLD_PID=/run/slurmctld.pid
SLURMD_PID=/run/slurmd.pid
MUNGE_PID=/run/munge/munged.pid
MUNGE_SOCKET=/run/munge/munge.socket.2

say() { echo "slurm_start: $*"; }

if [ "$(id -u)" != 0 ]; then
    say "must run as root (it installs packages and starts daemons)" >&2
    exit 1
fi

running() {  # running PIDFILE: the process named in PIDFILE is alive
    [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null
}

# ---------------------------------------------------------------- packages
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null \
        || ! command -v sbatch >/dev/null; then
    say "installing slurm-wlm and munge (apt)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq slurm-wlm munge >/dev/null
fi

# ---------------------------------------------------------------- munge
mkdir -p /run/munge /var/lib/munge /var/log/munge /etc/munge
if [ ! -s /etc/munge/munge.key ]; then
    say "creating a munge key"
    if command -v mungekey >/dev/null; then
        mungekey --create --keyfile=/etc/munge/munge.key
    else
        dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
    fi
fi
# munged runs as root here, so root must own its key and folders (it refuses otherwise).
chown root:root /etc/munge /etc/munge/munge.key /run/munge /var/lib/munge /var/log/munge
chmod 700 /etc/munge /var/log/munge
chmod 600 /etc/munge/munge.key
chmod 711 /var/lib/munge
chmod 755 /run/munge
if ! running "$MUNGE_PID"; then
    rm -f "$MUNGE_SOCKET" "$MUNGE_SOCKET.lock"
    say "starting munged"
    munged --force --pid-file="$MUNGE_PID" --socket="$MUNGE_SOCKET"
fi
for _ in $(seq 50); do
    munge -n -S "$MUNGE_SOCKET" 2>/dev/null | unmunge -S "$MUNGE_SOCKET" >/dev/null 2>&1 && break
    sleep 0.1
done
munge -n -S "$MUNGE_SOCKET" | unmunge -S "$MUNGE_SOCKET" >/dev/null || { say "munge does not work" >&2; exit 1; }

# ---------------------------------------------------------------- slurm.conf
HOST=$(hostname -s)
# `slurmd -C` prints this node's line as slurmd sees it: CPUs, sockets, cores, threads, memory.
NODE_LINE=$(slurmd -C | head -n 1)
NODE_HW=${NODE_LINE#NodeName=* }
mkdir -p "$CONF_DIR" "$LOG_DIR" /var/spool/slurmctld /var/spool/slurmd
NEW_CONF=$(mktemp)
cat >"$NEW_CONF" <<EOF
# Written by aimspax_like scripts/slurm_start.sh: a one-node test cluster on $HOST.
ClusterName=aimspax
# Loopback addresses: one machine, and no dependence on its hostname resolving.
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CryptoType=crypto/munge
MpiDefault=none
ReturnToService=2
SlurmctldPidFile=$CTLD_PID
SlurmdPidFile=$SLURMD_PID
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# No cgroups in a container or small VM: track processes by parent pid, bind nothing.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
# Whole cores are the unit, so two 1-CPU jobs (two Parsl blocks) can share the node.
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
# No slurmdbd: plain sacct says accounting is disabled (so Parsl's SlurmProvider falls back to
# squeue), while sacct -c reads the job completion log: every end of a job, requeues included.
# (No backquotes in this heredoc: the shell would run them.)
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$LOG_DIR/jobcomp.log
# Fast turnaround for tests: cancelled and finished jobs leave the queue quickly.
MinJobAge=30
KillWait=5
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=60
NodeName=$HOST NodeAddr=127.0.0.1 $NODE_HW State=UNKNOWN
PartitionName=$PARTITION Nodes=$HOST Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
# slurmd -C also prints UpTime on its second line; only the node line goes in (NODE_HW above).
CHANGED=0
if [ ! -f "$CONF" ] || ! cmp -s "$NEW_CONF" "$CONF"; then
    mv "$NEW_CONF" "$CONF"
    chmod 644 "$CONF"
    CHANGED=1
else
    rm -f "$NEW_CONF"
fi
# cgroup.conf is read by slurmd even with the plugins above off; an empty one keeps it quiet.
[ -f "$CONF_DIR/cgroup.conf" ] || echo "CgroupPlugin=autodetect" >"$CONF_DIR/cgroup.conf"

# ---------------------------------------------------------------- daemons
if [ "$CHANGED" = 1 ]; then
    for pidfile in "$SLURMD_PID" "$CTLD_PID"; do
        if running "$pidfile"; then
            say "config changed: stopping $(basename "$pidfile" .pid)"
            pid=$(cat "$pidfile")
            kill "$pid"
            for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        fi
    done
fi
if ! running "$CTLD_PID"; then
    say "starting slurmctld"
    slurmctld -i   # -i: ignore state left by an earlier cluster with another config
fi
if ! running "$SLURMD_PID"; then
    say "starting slurmd"
    slurmd
fi

# ---------------------------------------------------------------- wait for the node
state=""
for _ in $(seq 120); do
    state=$(sinfo -h -n "$HOST" -o "%T" 2>/dev/null | head -n 1 || true)
    case "$state" in
        idle|mixed|allocated|completing) break ;;
        down*|drain*|drained*|fail*)
            scontrol update NodeName="$HOST" State=RESUME >/dev/null 2>&1 || true ;;
    esac
    sleep 0.5
done
case "$state" in
    idle|mixed|allocated|completing) ;;
    *)
        say "node $HOST is '$state' after 60 s; see $LOG_DIR/slurmctld.log and slurmd.log" >&2
        exit 1 ;;
esac
say "ready: partition $PARTITION, node $HOST ($state)"
sinfo
