#!/usr/bin/env bash
# Stop the cluster that start-local-slurm.sh started in $LOCAL_SLURM_DIR, and nothing else:
# jobs still queued or running on it are cancelled, then only the daemons whose pids that
# script recorded are signalled (each pid is checked to still be that program first), and the
# /etc/slurm files it wrote (those with its marker for this directory) are removed.
#
# Usage:  stop-local-slurm.sh [--purge]
#   --purge  also delete $LOCAL_SLURM_DIR (munge key, state, logs)
# Environment: LOCAL_SLURM_DIR (default /tmp/dpzo-local-slurm), as for the start script.
set -uo pipefail

DIR=${LOCAL_SLURM_DIR:-/tmp/dpzo-local-slurm}
CONF_DIR=/etc/slurm
MARK="# written by start-local-slurm.sh for $DIR (removed by stop-local-slurm.sh)"
PURGE=0
case "${1:-}" in
  "") ;;
  --purge) PURGE=1 ;;
  -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
  *) echo "[local-slurm] error: unknown option '$1' (see --help)" >&2; exit 2 ;;
esac
say() { printf '[local-slurm] %s\n' "$*"; }

running() {
  local f="$DIR/pids/$1" pid
  [ -s "$f" ] || return 1
  pid=$(cat "$f")
  [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$1" ]
}
stop() {
  local name=$1 pid _
  [ -e "$DIR/pids/$name" ] || return 0
  if running "$name"; then
    pid=$(cat "$DIR/pids/$name")
    say "stopping $name (pid $pid)"
    kill -TERM "$pid" 2>/dev/null
    for _ in $(seq 150); do [ -d "/proc/$pid" ] || break; sleep 0.2; done
    if [ -d "/proc/$pid" ]; then say "$name ignored SIGTERM for 30 s: SIGKILL"; kill -KILL "$pid" 2>/dev/null; fi
  fi
  rm -f "$DIR/pids/$name"
}

if [ ! -d "$DIR/pids" ]; then
  say "nothing was started in $DIR"
else
  if running slurmctld && running slurmd; then
    # so that no job step outlives slurmd
    jobs=$(squeue -h -o %A 2>/dev/null | tr '\n' ' ')
    if [ -n "${jobs// /}" ]; then
      say "cancelling jobs $jobs"
      # shellcheck disable=SC2086
      scancel $jobs 2>/dev/null
      for _ in $(seq 150); do [ -z "$(squeue -h -o %A 2>/dev/null)" ] && break; sleep 0.2; done
    fi
  fi
  for name in slurmd slurmctld munged; do stop "$name"; done
fi
for f in "$CONF_DIR/slurm.conf" "$CONF_DIR/gres.conf"; do
  if [ -e "$f" ] && grep -qxF "$MARK" "$f"; then rm -f "$f"; say "removed $f"; fi
done
if [ "$PURGE" = 1 ] && [ -d "$DIR" ]; then
  case "$DIR" in /|/tmp|/tmp/|"") ;; *) rm -rf "$DIR"; say "removed $DIR" ;; esac
fi
say "stopped"
