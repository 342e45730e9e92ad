#!/usr/bin/env bash
# Stop the cluster started by .ci/slurm/up.sh, using only the PIDs recorded in
# $STATE/pids: SIGTERM, then SIGKILL after a timeout.  Each daemon was started
# as the leader of its own session, so processes left in that session (job
# steps forked by slurmd, for instance) are stopped the same way.  Nothing is
# ever looked up or killed by name.
#
# Environment:
#   KD_SLURM_STATE         state dir (default /tmp/kd-sweeps-slurm)
#   KD_SLURM_STOP_TIMEOUT  seconds to wait after SIGTERM before SIGKILL (default 15)
set -euo pipefail

STATE="${KD_SLURM_STATE:-/tmp/kd-sweeps-slurm}"
STOP_TIMEOUT="${KD_SLURM_STOP_TIMEOUT:-15}"
PIDS="$STATE/pids"

log() { echo "[slurm-down] $*"; }

if [[ ! -f "$PIDS" ]]; then
    log "no pid file at $PIDS; nothing to stop"
    exit 0
fi

# running <pid>: exists and is not a zombie
running() {
    local st
    st="$(awk '{ print $3 }' "/proc/$1/stat" 2>/dev/null || true)"
    [[ -n "$st" && "$st" != Z ]]
}
# ours <name> <pid>: still the program we started (guards against PID reuse)
ours() { running "$2" && [[ "$(cat "/proc/$2/comm" 2>/dev/null || true)" == "$1" ]]; }
# session_members <sid>: live processes of that session
session_members() {
    ps -e -o pid=,sid=,stat= | awk -v s="$1" '$2 == s && $3 !~ /^Z/ { print $1 }'
}

stop() {  # stop <name> <pid>
    local name="$1" pid="$2" deadline p
    if ours "$name" "$pid"; then
        log "stopping $name (pid $pid)"
        kill -TERM "$pid" 2>/dev/null || true
        deadline=$(( $(date +%s) + STOP_TIMEOUT ))
        while running "$pid" && (( $(date +%s) < deadline )); do sleep 0.2; done
        if running "$pid"; then
            log "$name (pid $pid) ignored SIGTERM for ${STOP_TIMEOUT}s; sending SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
        fi
    else
        log "$name (pid $pid) is not running"
    fi
    # Leftovers in the daemon's own session (its sid is the recorded PID).
    for p in $(session_members "$pid"); do
        log "stopping pid $p left in the session of $name"
        kill -TERM "$p" 2>/dev/null || true
    done
    deadline=$(( $(date +%s) + 5 ))
    while [[ -n "$(session_members "$pid")" ]] && (( $(date +%s) < deadline )); do sleep 0.2; done
    for p in $(session_members "$pid"); do kill -KILL "$p" 2>/dev/null || true; done
}

# Cancel jobs while the controller is still up, so their steps end cleanly.
ctld_pid="$(awk '$1 == "slurmctld" { print $2 }' "$PIDS" | tail -n1)"
if [[ -n "$ctld_pid" ]] && ours slurmctld "$ctld_pid" && command -v squeue >/dev/null; then
    jobs="$(timeout 5 squeue -h -o %A 2>/dev/null || true)"
    if [[ -n "$jobs" ]]; then
        log "cancelling jobs: $(echo $jobs)"
        # shellcheck disable=SC2086
        timeout 10 scancel $jobs 2>/dev/null || true
        # Jobs leave the queue once slurmd has ended their steps; without a
        # live slurmd they would sit in COMPLETING, so do not wait then.
        slurmd_pid="$(awk '$1 == "slurmd" { print $2 }' "$PIDS" | tail -n1)"
        deadline=$(( $(date +%s) + 15 ))
        [[ -n "$slurmd_pid" ]] && ours slurmd "$slurmd_pid" || deadline=0
        while [[ -n "$(timeout 5 squeue -h -o %A 2>/dev/null || true)" ]] && (( $(date +%s) < deadline )); do
            sleep 0.5
        done
    fi
fi

# Reverse start order; anything not in the list is stopped last.
for name in slurmd slurmctld slurmdbd munged mariadbd; do
    while read -r n pid; do
        if [[ "$n" == "$name" && -n "$pid" ]]; then stop "$n" "$pid"; fi
    done <"$PIDS"
done
while read -r n pid; do
    case "$n" in slurmd | slurmctld | slurmdbd | munged | mariadbd | "") ;; *) stop "$n" "$pid" ;; esac
done <"$PIDS"

# Final check.
left=()
while read -r n pid; do
    if [[ -n "${pid:-}" ]] && running "$pid"; then left+=("$n:$pid"); fi
done <"$PIDS"
if ((${#left[@]})); then
    log "ERROR: still running: ${left[*]}" >&2
    exit 1
fi
rm -f "$PIDS"
log "all stopped"
