#!/usr/bin/env bash
# Start a throw-away single-node SLURM cluster on 127.0.0.1 (Debian/Ubuntu, as root), to try
# `snakemake --workflow-profile profiles/slurm` and to test the SLURM profile in CI.
#
# What it runs and writes lives in one directory ($LOCAL_SLURM_DIR: its own munge key and munged
# socket, state, logs, pid files), except the cluster's description, /etc/slurm/slurm.conf (and
# gres.conf): SLURM tools find it there whatever their environment (Snakemake's job step drops
# $SLURM_CONF before it calls srun). Those files carry a marker line; an /etc/slurm/slurm.conf
# without it is never overwritten, and stop-local-slurm.sh removes them again. The system's own
# munged is not used. Otherwise the only change to the system is installing slurm-wlm and munge
# when they are missing.
#
# Usage:  start-local-slurm.sh [--fake-gpus N] [--no-install] [--install-only]
#   --fake-gpus N   advertise N GPUs (empty files as devices): sbatch accepts --gpus/--gres
#                   requests, jobs see SLURM_GPUS_ON_NODE, CUDA_VISIBLE_DEVICES stays unset
#   --no-install    fail instead of running apt-get when packages are missing
#   --install-only  install the packages and exit
# Environment:
#   LOCAL_SLURM_DIR         where everything lives (default /tmp/dpzo-local-slurm); its parents
#                           must be searchable by everyone (munged checks that)
#   LOCAL_SLURM_CTLD_PORT   slurmctld port (default 6817);  LOCAL_SLURM_SLURMD_PORT (default 6818)
#   LOCAL_SLURM_CPUS        CPUs the node advertises (default: the real count)
#   LOCAL_SLURM_MEMORY      node memory in MiB (default 90 % of MemTotal); CPUs and memory may
#                           exceed the hardware, so a profile written for a big cluster fits
#   LOCAL_SLURM_PARTITION   name of the only partition (default debug)
# Afterwards sbatch/squeue/srun (and Snakemake, which calls them) talk to this cluster. Stop it
# with stop-local-slurm.sh, which stops only what this script started.
#
# Snakemake's slurm plugin must poll with `squeue` here (there is no accounting database, so
# `sacct` fails and the plugin would wait forever); profiles/slurm does so.
set -euo pipefail

DIR=${LOCAL_SLURM_DIR:-/tmp/dpzo-local-slurm}
CONF_DIR=/etc/slurm
MARK="# written by start-local-slurm.sh for $DIR (removed by stop-local-slurm.sh)"
CTLD_PORT=${LOCAL_SLURM_CTLD_PORT:-6817}
SLURMD_PORT=${LOCAL_SLURM_SLURMD_PORT:-6818}
PARTITION=${LOCAL_SLURM_PARTITION:-debug}
FAKE_GPUS=0
INSTALL=1
INSTALL_ONLY=0
PACKAGES=(slurm-wlm munge)

say() { printf '[local-slurm] %s\n' "$*"; }
die() { printf '[local-slurm] error: %s\n' "$*" >&2; exit 1; }

while [ $# -gt 0 ]; do
  case "$1" in
    --fake-gpus) FAKE_GPUS=${2:?--fake-gpus needs a number}; shift ;;
    --no-install) INSTALL=0 ;;
    --install-only) INSTALL_ONLY=1 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown option '$1' (see --help)" ;;
  esac
  shift
done
[[ "$FAKE_GPUS" =~ ^[0-9]+$ ]] || die "--fake-gpus needs a whole number, got '$FAKE_GPUS'"
[ "$(id -u)" = 0 ] || die "must run as root (the daemons run as root): use sudo"

# ------------------------------------------------------------------------------ packages
install_packages() {
  local missing=() p created_policy=0
  for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  [ "$INSTALL" = 1 ] || die "missing packages: ${missing[*]} (run without --no-install, or apt-get install them)"
  command -v apt-get >/dev/null || die "missing packages ${missing[*]} and no apt-get to install them"
  # The packages' install scripts would start system daemons with Debian's configuration;
  # policy-rc.d tells them not to. Only a file created here is removed again.
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
    chmod 755 /usr/sbin/policy-rc.d
    created_policy=1
  fi
  say "installing ${missing[*]} (apt-get)"
  local log=/tmp/local-slurm-apt.log rc=0
  {
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" ||
      { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"; }
  } >"$log" 2>&1 || rc=$?
  [ "$created_policy" = 1 ] && rm -f /usr/sbin/policy-rc.d
  [ "$rc" = 0 ] || { tail -20 "$log" >&2; die "apt-get install failed (log: $log)"; }
}
install_packages
[ "$INSTALL_ONLY" = 1 ] && { say "packages installed"; exit 0; }

# ------------------------------------------------------------------------------ helpers
mkdir -p "$DIR"/{state,spool,log,run,pids,munge}
chmod 755 "$DIR" "$DIR/munge"   # munged wants its socket's folder readable by all
SLURM_CONF="$CONF_DIR/slurm.conf"

# running NAME: the pid recorded for NAME is alive and still that program
running() {
  local f="$DIR/pids/$1" pid
  [ -s "$f" ] || return 1
  pid=$(cat "$f")
  [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$1" ]
}
# record NAME PIDFILE: wait for the daemon's own pid file and keep a copy
record() {
  local name=$1 pidfile=$2 _
  for _ in $(seq 100); do [ -s "$pidfile" ] && break; sleep 0.1; done
  [ -s "$pidfile" ] || die "$name did not start (see $DIR/log/$name.log)"
  cp "$pidfile" "$DIR/pids/$name"
  sleep 0.2
  running "$name" || die "$name exited right after starting (see $DIR/log/$name.log)"
}
port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

if running slurmctld && running slurmd && running munged; then
  say "already running in $DIR"
else
  for name in munged slurmctld slurmd; do
    running "$name" && die "$name from an earlier start still runs: stop-local-slurm.sh first"
  done
  for f in "$SLURM_CONF" "$CONF_DIR/gres.conf"; do
    [ -e "$f" ] || continue
    owner=$(sed -n 's/^# written by start-local-slurm.sh for \(.*\) (removed by stop-local-slurm.sh)$/\1/p' "$f" | head -1)
    [ -n "$owner" ] || die "$f exists and was not written by this script (another SLURM installation?): not touching it"
    if [ "$owner" != "$DIR" ] && [ "$(cat "/proc/$(cat "$owner/pids/slurmctld" 2>/dev/null)/comm" 2>/dev/null)" = slurmctld ]; then
      die "another local cluster runs from $owner: stop it first (LOCAL_SLURM_DIR=$owner stop-local-slurm.sh)"
    fi
    rm -f "$f"   # ours, or left behind by a local cluster that is gone
  done
  port_free "$CTLD_PORT" || die "port $CTLD_PORT is in use: set LOCAL_SLURM_CTLD_PORT"
  port_free "$SLURMD_PORT" || die "port $SLURMD_PORT is in use: set LOCAL_SLURM_SLURMD_PORT"
  # from here on a failure stops whatever was already started (and removes the config)
  trap 'rc=$?; [ $rc = 0 ] || LOCAL_SLURM_DIR="$DIR" bash "$(dirname "$0")/stop-local-slurm.sh" >&2; exit $rc' EXIT

  # ---------------------------------------------------------------------------- munge
  if [ ! -s "$DIR/munge.key" ]; then
    mungekey --create --keyfile="$DIR/munge.key"
    chmod 600 "$DIR/munge.key"
  fi
  rm -f "$DIR/munge/munged.pid"
  munged --socket="$DIR/munge/socket" --key-file="$DIR/munge.key" --pid-file="$DIR/munge/munged.pid" \
    --seed-file="$DIR/munge/seed" --log-file="$DIR/log/munged.log"
  record munged "$DIR/munge/munged.pid"
  munge -n --socket="$DIR/munge/socket" | unmunge --socket="$DIR/munge/socket" >/dev/null ||
    die "munge credentials do not round-trip (see $DIR/log/munged.log)"

  # ---------------------------------------------------------------------------- configuration
  NODE=$(hostname -s)
  # the node's real topology (slurmd complains when it differs), unless CPUs are overridden
  TOPOLOGY=$(slurmd -C | head -1 | tr ' ' '\n' | grep -E '^(CPUs|Boards|SocketsPerBoard|CoresPerSocket|ThreadsPerCore)=' | tr '\n' ' ')
  if [ -n "${LOCAL_SLURM_CPUS:-}" ]; then
    [[ "$LOCAL_SLURM_CPUS" =~ ^[1-9][0-9]*$ ]] || die "LOCAL_SLURM_CPUS must be a positive number"
    TOPOLOGY="CPUs=$LOCAL_SLURM_CPUS Boards=1 SocketsPerBoard=1 CoresPerSocket=$LOCAL_SLURM_CPUS ThreadsPerCore=1"
  fi
  MEMORY=${LOCAL_SLURM_MEMORY:-$(awk '/^MemTotal/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)}
  GRES=""
  mkdir -p "$CONF_DIR"
  rm -f "$DIR"/fakegpu*
  if [ "$FAKE_GPUS" -gt 0 ]; then
    for i in $(seq 0 $((FAKE_GPUS - 1))); do : > "$DIR/fakegpu$i"; done
    GRES="Gres=gpu:fake:$FAKE_GPUS"
    printf '%s\nNodeName=%s Name=gpu Type=fake File=%s\n' "$MARK" "$NODE" "$DIR/fakegpu[0-$((FAKE_GPUS - 1))]" > "$CONF_DIR/gres.conf"
  fi
  cat > "$SLURM_CONF" <<EOF
$MARK
# a single-node cluster on 127.0.0.1
ClusterName=dpzolocal
SlurmctldHost=$NODE(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$DIR/munge/socket
MpiDefault=none
# no cgroups in containers: processes are tracked by pid, nothing is pinned or limited
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
# no accounting database: sacct does not work here (poll with squeue)
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
# start a job the moment it is submitted
SchedulerParameters=batch_sched_delay=0
# the node may advertise more CPUs/memory than it has
SlurmdParameters=config_overrides
DefMemPerCPU=1024
ReturnToService=2
# finished jobs stay visible to squeue for 5 min (Snakemake's squeue polling needs that)
MinJobAge=300
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
${GRES:+GresTypes=gpu}
NodeName=$NODE NodeAddr=127.0.0.1 $TOPOLOGY RealMemory=$MEMORY $GRES State=UNKNOWN
PartitionName=$PARTITION Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF

  # ---------------------------------------------------------------------------- daemons
  rm -f "$DIR/run/slurmctld.pid" "$DIR/run/slurmd.pid"
  slurmctld
  record slurmctld "$DIR/run/slurmctld.pid"
  slurmd -N "$NODE"
  record slurmd "$DIR/run/slurmd.pid"
fi

# ------------------------------------------------------------------------------ health check
state=""
for _ in $(seq 100); do
  state=$(sinfo -h -o %T 2>/dev/null | head -1 || true)
  case "$state" in idle*|mixed*|allocated*) break ;; esac
  sleep 0.1
done
case "$state" in idle*|mixed*|allocated*) ;; *) die "the node is '$state', not idle (see $DIR/log)" ;; esac
[ "$(timeout 60 srun -t 1 --mem=16 hostname)" = "$(hostname)" ] || die "a test job did not run (see $DIR/log)"
say "cluster up: $(sinfo -h -o '%P %D node(s), %c CPUs, %m MiB, gres %G')"
say "stop it with: LOCAL_SLURM_DIR=$DIR $(dirname "$0")/stop-local-slurm.sh"
