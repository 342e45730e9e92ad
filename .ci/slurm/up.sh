#!/usr/bin/env bash
# Install (if needed) and start a single-node Slurm cluster with accounting on
# localhost: MariaDB -> munged -> slurmdbd -> slurmctld -> slurmd.
#
# Every daemon runs in the foreground of its own session, backgrounded by this
# script, with stdout/stderr in $STATE/logs/<name>.log and its PID recorded in
# $STATE/pids ("<name> <pid>" per line).  .ci/slurm/down.sh stops them by those
# PIDs.  Must run as root (it installs packages and writes /etc/slurm).
#
# Environment:
#   KD_SLURM_STATE    state dir (default /tmp/kd-sweeps-slurm)
#   KD_SLURM_TIMEOUT  seconds to wait for each daemon (default 90)
#   KD_SLURM_DB_PORT  TCP port of the private MariaDB on 127.0.0.1 (default 3306)
set -euo pipefail

STATE="${KD_SLURM_STATE:-/tmp/kd-sweeps-slurm}"
TIMEOUT="${KD_SLURM_TIMEOUT:-90}"
DB_PORT="${KD_SLURM_DB_PORT:-3306}"
CLUSTER=kdsweeps
PARTITION=debug
CONF_DIR=/etc/slurm
PIDS="$STATE/pids"
LOGS="$STATE/logs"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PACKAGES=(slurm-wlm munge slurmdbd mariadb-server)

T0=$(date +%s.%N)
elapsed() { awk -v a="$T0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }'; }
log() { echo "[slurm-up $(elapsed)s] $*"; }
die() { echo "[slurm-up] ERROR: $*" >&2; exit 1; }

[[ $(id -u) -eq 0 ]] || die "must run as root"

# --- helpers ---------------------------------------------------------------

# Is the PID recorded for <name> alive and still that program?
pid_of() { [[ -f "$PIDS" ]] || return 0; awk -v n="$1" '$1 == n { print $2 }' "$PIDS" | tail -n1; }
# (A killed daemon can linger as a zombie until PID 1 reaps it: that counts as dead.)
alive() {  # alive <name> <pid>
    local st
    [[ -n "${2:-}" ]] || return 1
    st="$(awk '{ print $3 }' "/proc/$2/stat" 2>/dev/null || true)"
    [[ -n "$st" && "$st" != Z && "$(cat "/proc/$2/comm" 2>/dev/null || true)" == "$1" ]]
}
node_state() { timeout 5 sinfo -h -o %T 2>/dev/null | head -n1 || true; }

all_up() {
    local name pid
    [[ -s "$PIDS" ]] || return 1
    for name in mariadbd munged slurmdbd slurmctld slurmd; do
        pid="$(pid_of "$name")"
        alive "$name" "$pid" || return 1
    done
    case "$(node_state)" in idle | mixed | allocated | completing) return 0 ;; *) return 1 ;; esac
}

show_logs() {
    local f
    for f in "$@"; do
        [[ -f "$f" ]] || continue
        echo "----- tail of $f -----" >&2
        tail -n 25 "$f" >&2 || true
    done
}

# wait_for <what> <logfile...> -- <command...>: poll the command until it succeeds
wait_for() {
    local what="$1"; shift
    local logs=()
    while [[ "$1" != "--" ]]; do logs+=("$1"); shift; done
    shift
    local deadline=$(( $(date +%s) + TIMEOUT ))
    until "$@" >"$LOGS/last-check.out" 2>&1; do
        if (( $(date +%s) >= deadline )); then
            echo "[slurm-up] ERROR: timed out after ${TIMEOUT}s waiting for $what" >&2
            echo "----- last check: $* -----" >&2
            tail -n 10 "$LOGS/last-check.out" >&2 || true
            show_logs "${logs[@]}"
            echo "[slurm-up] started daemons are recorded in $PIDS; stop them with $HERE/down.sh" >&2
            exit 1
        fi
        sleep 0.2
    done
}

# start <name> <command...>: run in its own session, log to $LOGS/<name>.log, record the PID.
# setsid execs in place (a background child of a script is not a group leader),
# so $! is the daemon itself and its PID is also its process-group ID.
start() {
    local name="$1"; shift
    setsid "$@" </dev/null >>"$LOGS/$name.log" 2>&1 &
    local pid=$!
    echo "$name $pid" >>"$PIDS"
    log "started $name (pid $pid)"
}

# check that <name> did not exit right away
still_running() {
    local name="$1" pid
    pid="$(pid_of "$name")"
    alive "$name" "$pid" || { show_logs "$LOGS/$name.log"; die "$name (pid $pid) exited; see $LOGS/$name.log"; }
}

# --- already running? -------------------------------------------------------

if all_up; then
    log "cluster already up (node $(node_state), pids in $PIDS); nothing to do"
    exit 0
fi
if [[ -s "$PIDS" ]]; then
    log "stale or partial cluster recorded in $PIDS; stopping it first"
    KD_SLURM_STATE="$STATE" "$HERE/down.sh"
fi

# --- packages ---------------------------------------------------------------

missing=()
for p in "${PACKAGES[@]}"; do
    [[ "$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true)" == "install ok installed" ]] || missing+=("$p")
done
if ((${#missing[@]})); then
    log "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    # Keep maintainer scripts from starting the daemons: we start them ourselves.
    made_policy=0
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        made_policy=1
    fi
    mkdir -p "$LOGS"
    APT_LOG="$LOGS/apt.log"
    apt_install() { apt-get install -y -q --no-install-recommends "${missing[@]}" >>"$APT_LOG" 2>&1; }
    # Refresh the package lists only when they are absent or the install fails.
    if ! ls /var/lib/apt/lists/*_Packages* >/dev/null 2>&1 || ! apt_install; then
        log "apt-get update"
        apt-get update -q >>"$APT_LOG" 2>&1 || { tail -n 30 "$APT_LOG" >&2; die "apt-get update failed"; }
        apt_install || { tail -n 30 "$APT_LOG" >&2; die "apt-get install failed (log: $APT_LOG)"; }
    fi
    ((made_policy)) && rm -f /usr/sbin/policy-rc.d
    log "packages installed"
fi

for c in slurmctld slurmd slurmdbd sinfo sacct sacctmgr munged munge unmunge mariadbd mariadb-install-db mariadb mariadb-admin setsid setpriv; do
    command -v "$c" >/dev/null || die "'$c' not found after installing ${PACKAGES[*]}"
done

# --- state dir ----------------------------------------------------------------

mkdir -p "$STATE" "$LOGS" "$STATE/run" "$STATE/slurmctld" "$STATE/slurmd"
chmod 755 "$STATE"
: >"$PIDS"
# slurmctld refuses to start on state saved under another cluster name.
if [[ -f "$STATE/slurmctld/clustername" ]] && [[ "$(cat "$STATE/slurmctld/clustername")" != "$CLUSTER" ]]; then
    log "removing slurmctld state of another cluster"
    rm -rf "$STATE/slurmctld" && mkdir -p "$STATE/slurmctld"
fi

# --- munge key ------------------------------------------------------------------

if [[ ! -s /etc/munge/munge.key ]]; then
    log "creating /etc/munge/munge.key"
    mkdir -p /etc/munge
    if command -v mungekey >/dev/null; then
        mungekey --create --keyfile=/etc/munge/munge.key --force
    else
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
    fi
fi
chown munge:munge /etc/munge /etc/munge/munge.key
chmod 700 /etc/munge
chmod 400 /etc/munge/munge.key
mkdir -p /run/munge /var/lib/munge /var/log/munge
chown munge:munge /run/munge /var/lib/munge /var/log/munge
chmod 755 /run/munge

# --- configs ----------------------------------------------------------------------

NCPU=$(nproc)
MEM_TOTAL=$(slurmd -C 2>/dev/null | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' | head -n1)
[[ -n "$MEM_TOTAL" ]] || MEM_TOTAL=$(awk '/^MemTotal:/ { print int($2 / 1024) }' /proc/meminfo)
# Leave a margin for the OS and the daemons (10%, at least 512 MB).
MARGIN=$(( MEM_TOTAL / 10 > 512 ? MEM_TOTAL / 10 : 512 ))
REAL_MEM=$(( MEM_TOTAL - MARGIN ))
(( REAL_MEM > 256 )) || REAL_MEM=256
# Without a default per-CPU memory each job gets the whole node's memory and
# jobs run one at a time.
DEF_MEM=$(( REAL_MEM / NCPU < 1024 ? REAL_MEM / NCPU : 1024 ))

mkdir -p "$CONF_DIR"
cat >"$CONF_DIR/slurm.conf" <<EOF
# Written by .ci/slurm/up.sh: single-node test cluster on localhost.
ClusterName=$CLUSTER
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=$DEF_MEM
ReturnToService=2
MailProg=/bin/true
StateSaveLocation=$STATE/slurmctld
SlurmdSpoolDir=$STATE/slurmd
SlurmctldPidFile=$STATE/run/slurmctld.pid
SlurmdPidFile=$STATE/run/slurmd.pid
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
MinJobAge=300
KillWait=5
Waittime=0
SchedulerType=sched/backfill
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
# AccountingStorageEnforce is left unset (empty): no associations are needed.
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30
JobCompType=jobcomp/none
SlurmctldDebug=info
SlurmdDebug=info
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$NCPU Sockets=1 CoresPerSocket=$NCPU ThreadsPerCore=1 RealMemory=$REAL_MEM State=UNKNOWN
PartitionName=$PARTITION Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF
chmod 644 "$CONF_DIR/slurm.conf"

DB_PASS_FILE="$STATE/db.pass"
if [[ ! -s "$DB_PASS_FILE" ]]; then
    (umask 077; head -c 18 /dev/urandom | base64 | tr -dc 'A-Za-z0-9' >"$DB_PASS_FILE")
fi
DB_PASS="$(cat "$DB_PASS_FILE")"

(umask 077; cat >"$CONF_DIR/slurmdbd.conf" <<EOF
# Written by .ci/slurm/up.sh.
AuthType=auth/munge
DbdHost=localhost
DbdPort=6819
SlurmUser=root
DebugLevel=info
PidFile=$STATE/run/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=$DB_PASS
StorageLoc=slurm_acct_db
EOF
)
chown root:root "$CONF_DIR/slurmdbd.conf"
chmod 600 "$CONF_DIR/slurmdbd.conf"

# Private MariaDB instance: data, socket and pid file under $STATE.
DATADIR="$STATE/mysql"
MYCNF="$STATE/my.cnf"
cat >"$MYCNF" <<EOF
[mysqld]
user=mysql
datadir=$DATADIR
socket=$DATADIR/mysqld.sock
pid-file=$DATADIR/mariadbd.pid
bind-address=127.0.0.1
port=$DB_PORT
skip-name-resolve
innodb_buffer_pool_size=256M
innodb_lock_wait_timeout=900
[client]
socket=$DATADIR/mysqld.sock
user=root
EOF
chmod 644 "$MYCNF"

# --- MariaDB ----------------------------------------------------------------------

if [[ ! -d "$DATADIR/mysql" ]]; then
    log "initialising MariaDB data dir $DATADIR"
    rm -rf "$DATADIR"
    mkdir -p "$DATADIR"
    chown mysql:mysql "$DATADIR"
    mariadb-install-db --defaults-file="$MYCNF" --skip-test-db \
        --auth-root-authentication-method=socket >>"$LOGS/mariadb-install-db.log" 2>&1 \
        || { show_logs "$LOGS/mariadb-install-db.log"; die "mariadb-install-db failed"; }
    # A fresh accounting database must not meet old controller state (job ids).
    rm -rf "$STATE/slurmctld" && mkdir -p "$STATE/slurmctld"
fi
chown -R mysql:mysql "$DATADIR"
start mariadbd mariadbd --defaults-file="$MYCNF"
wait_for "MariaDB" "$LOGS/mariadbd.log" -- mariadb-admin --defaults-file="$MYCNF" ping
mariadb --defaults-file="$MYCNF" <<EOF
CREATE DATABASE IF NOT EXISTS slurm_acct_db;
CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
ALTER USER 'slurm'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
GRANT ALL PRIVILEGES ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
FLUSH PRIVILEGES;
EOF
log "MariaDB ready"

# --- munged -------------------------------------------------------------------------

start munged setpriv --reuid=munge --regid=munge --init-groups munged --foreground
munge_ok() { munge -n </dev/null | unmunge >/dev/null; }
wait_for "munged" "$LOGS/munged.log" /var/log/munge/munged.log -- munge_ok
still_running munged
log "munged ready"

# --- slurmdbd -----------------------------------------------------------------------

start slurmdbd slurmdbd -D
wait_for "slurmdbd" "$LOGS/slurmdbd.log" -- timeout 10 sacctmgr -n -P show cluster format=cluster
still_running slurmdbd
if ! timeout 10 sacctmgr -n -P show cluster format=cluster | grep -qx "$CLUSTER"; then
    timeout 20 sacctmgr -i add cluster "$CLUSTER" >>"$LOGS/sacctmgr.log" 2>&1 \
        || { show_logs "$LOGS/sacctmgr.log" "$LOGS/slurmdbd.log"; die "could not register cluster $CLUSTER"; }
fi
log "slurmdbd ready, cluster $CLUSTER registered"

# --- slurmctld + slurmd -------------------------------------------------------------

start slurmctld slurmctld -D -i
wait_for "slurmctld" "$LOGS/slurmctld.log" -- timeout 5 scontrol ping
still_running slurmctld
start slurmd slurmd -D -N localhost
node_idle() { [[ "$(node_state)" == idle ]]; }
wait_for "node localhost to become idle" "$LOGS/slurmd.log" "$LOGS/slurmctld.log" -- node_idle
still_running slurmd
wait_for "sacct" "$LOGS/slurmdbd.log" "$LOGS/slurmctld.log" -- timeout 10 sacct -n -X -a -S now-1hour

log "cluster $CLUSTER up: node localhost idle in partition $PARTITION; logs in $LOGS, pids in $PIDS"
echo "slurm cluster started in $(elapsed) s"
