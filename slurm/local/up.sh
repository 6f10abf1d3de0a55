#!/usr/bin/env bash
# slurm/local/up.sh -- bring up a real multi-node Slurm cluster emulated on ONE machine (root, no systemd).
#
#   apt-get install -y --no-install-recommends slurm-wlm iproute2     # once (Debian/Ubuntu)
#   sudo slurm/local/up.sh && source /tmp/slurm-local/env.sh          # exports SLURM_CONF
#   sbatch --nodes=2 ... ; sinfo ; squeue
#   sudo slurm/local/down.sh
#
# MODE=netns (default): one network + UTS + mount namespace per node on a private bridge (10.77.0.0/24):
#   node1=10.77.0.11, node2=10.77.0.12, ..., each with its own hostname, so ranks really talk TCP between
#   "hosts" and a script that assumes localhost fails here as it would on a real cluster.
# MODE=multi: Slurm's multiple-slurmd mode, all nodes on 127.0.0.1 (ports 17001+), own hostnames.
#
# Everything lives in $SLURM_LOCAL_DIR (default /tmp/slurm-local): private munged (own key + socket), config via
# $SLURM_CONF, node-name resolution via a hosts file bind-mounted over /etc/hosts inside each node's own mount
# namespace. Outside it only the bridge slurmci-br, veths vh-slurmci-nN and namespaces slurmci-nN are created
# (netns mode); down.sh removes them. Env: MODE, NNODES (2), CPUS (nproc), TIMEOUT (30 s), SLURM_LOCAL_DIR,
# CRED_EXPIRE (10 s; Slurm holds a requeued job this long before it may start again, 120 s by default).
# How it is built and the gotchas behind each step: docs/slurm.md, "The local cluster recipe".
set -euo pipefail

DIR=${SLURM_LOCAL_DIR:-/tmp/slurm-local}
MODE=${MODE:-netns}
NNODES=${NNODES:-2}
CPUS=${CPUS:-$(nproc)}          # CPUs each emulated node advertises (oversubscribed on purpose)
NET=${NET:-10.77.0}             # a /24 that exists only on our bridge and namespaces
BR=slurmci-br
NS=slurmci-n
CTL_HOST=$(hostname -s)         # SlurmctldHost must equal `hostname -s` (else "not a valid controller")
TIMEOUT=${TIMEOUT:-30}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

t0=$(date +%s.%N)
log() { echo "[slurm-local $(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN{printf "%6.2fs", b-a}')] $*"; }
die() { echo "slurm/local/up.sh: $*" >&2; exit 1; }
# Running and not a zombie: PID 1 here may reap late, so kill -0 is not enough.
alive() { [ -r "/proc/$1/stat" ] && [ "$(sed 's/.*) \(.\).*/\1/' "/proc/$1/stat")" != Z ]; }

[ "$(id -u)" = 0 ] || die "must run as root (it starts daemons and creates network namespaces)"
case $MODE in netns|multi) ;; *) die "MODE must be netns or multi, got '$MODE'";; esac
for b in slurmctld slurmd munged munge unmunge scontrol sinfo unshare nsenter $([ "$MODE" = netns ] && echo ip); do
  command -v "$b" >/dev/null || die "missing '$b': apt-get install -y --no-install-recommends slurm-wlm iproute2"
done
[ -e "$DIR/pids" ] && die "$DIR/pids exists: a cluster is up (or was not torn down); run slurm/local/down.sh first"
if [ "$MODE" = netns ] && ip link show "$BR" >/dev/null 2>&1; then
  die "bridge $BR already exists (another local cluster?); run slurm/local/down.sh with its SLURM_LOCAL_DIR first"
fi

rm -rf "$DIR"
mkdir -p "$DIR"/{state,spool,log,munge}
for i in $(seq "$NNODES"); do mkdir -p "$DIR/spool/node$i"; done   # SlurmdSpoolDir per node must pre-exist
chmod 755 "$DIR" "$DIR/munge"   # munged refuses a socket dir that is not world-executable
: > "$DIR/pids"                 # "<role> <pid>" per line; down.sh stops exactly these
echo "MODE=$MODE NNODES=$NNODES NS=$NS BR=$BR" > "$DIR/layout"
# From here on, a failure tears down whatever was started (logs kept).
trap 'rc=$?; [ $rc = 0 ] || { echo "setup failed (rc=$rc), logs in $DIR/log:" >&2; tail -n 20 "$DIR"/log/* >&2 || true; SLURM_LOCAL_DIR=$DIR SLURM_LOCAL_KEEP=1 "$HERE/down.sh" || true; }' EXIT

# ---- munge: private daemon, own key and socket -----------------------------------------------------------
(umask 077; head -c 1024 /dev/urandom > "$DIR/munge/munge.key")
munged -F --key-file="$DIR/munge/munge.key" --socket="$DIR/munge/munge.socket" \
  --pid-file="$DIR/munge/munged.pid" --log-file="$DIR/log/munged.log" \
  --seed-file="$DIR/munge/munged.seed" </dev/null >"$DIR/log/munged.out" 2>&1 &
echo "munged $!" >> "$DIR/pids"
for _ in $(seq 50); do munge -S "$DIR/munge/munge.socket" -n >/dev/null 2>&1 && break; sleep 0.1; done
munge -S "$DIR/munge/munge.socket" -n | unmunge -S "$DIR/munge/munge.socket" >/dev/null || die "munged not working"
log "munged up"

# ---- network and per-node addresses ------------------------------------------------------------------------
declare -a ADDR PORT
if [ "$MODE" = netns ]; then
  CTL_ADDR=$NET.1
  ip link add "$BR" type bridge
  echo 1 > "/proc/sys/net/ipv6/conf/$BR/disable_ipv6"
  ip addr add "$CTL_ADDR/24" dev "$BR"
  ip link set "$BR" up
  for i in $(seq "$NNODES"); do
    ip netns add "$NS$i"
    ip link add "vh-$NS$i" type veth peer name eth0 netns "$NS$i"
    echo 1 > "/proc/sys/net/ipv6/conf/vh-$NS$i/disable_ipv6"
    ip link set "vh-$NS$i" master "$BR" up
    ip -n "$NS$i" addr add "$NET.$((10 + i))/24" dev eth0
    ip -n "$NS$i" link set eth0 up
    ip -n "$NS$i" link set lo up        # no default route: nothing can leave the private subnet
    ADDR[i]=$NET.$((10 + i)); PORT[i]=6818
  done
  log "bridge $BR ($CTL_ADDR) + namespaces ${NS}1..${NS}$NNODES up"
else
  CTL_ADDR=127.0.0.1
  for i in $(seq "$NNODES"); do ADDR[i]=127.0.0.1; PORT[i]=$((17000 + i)); done
fi

# Hosts file every process on the emulated nodes sees (MASTER_ADDR=node1 must resolve there).
{
  echo "127.0.0.1 localhost"
  echo "::1 localhost ip6-localhost ip6-loopback"
  [ "$MODE" = netns ] && echo "$CTL_ADDR $CTL_HOST"
  for i in $(seq "$NNODES"); do echo "${ADDR[i]} node$i"; done
} > "$DIR/hosts"

# ---- slurm.conf: cgroup-free, no accounting DB, fast scheduling --------------------------------------------
{
cat <<CONF
ClusterName=local
SlurmctldHost=$CTL_HOST($CTL_ADDR)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$DIR/munge/munge.socket,cred_expire=${CRED_EXPIRE:-10}
SlurmctldPort=6817
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$DIR/log/jobcomp.txt
MpiDefault=none
MailProg=/bin/true
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0,sched_min_interval=0
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
JobRequeue=1
SlurmctldTimeout=30
SlurmdTimeout=30
MinJobAge=3600
KillWait=30
CONF
for i in $(seq "$NNODES"); do
  echo "NodeName=node$i NodeAddr=${ADDR[i]} Port=${PORT[i]} CPUs=$CPUS RealMemory=${REAL_MEMORY:-4000} State=UNKNOWN"
done
echo "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP"
} > "$DIR/slurm.conf"
export SLURM_CONF=$DIR/slurm.conf
echo "export SLURM_CONF=$DIR/slurm.conf" > "$DIR/env.sh"

# ---- slurmctld in the root namespace (foreground mode, backgrounded here: its PID is $!) --------------------
slurmctld -D </dev/null >"$DIR/log/slurmctld.out" 2>&1 &
ctl_pid=$!
echo "slurmctld $ctl_pid" >> "$DIR/pids"
deadline=$((SECONDS + TIMEOUT))
# `scontrol ping` can block for MessageTimeout: bound every call and check the daemon is still alive.
until timeout 5 scontrol ping 2>/dev/null | grep -q 'is UP'; do
  alive "$ctl_pid" || die "slurmctld exited (see $DIR/log/slurmctld.out)"
  [ $SECONDS -lt $deadline ] || die "slurmctld did not come up in ${TIMEOUT}s"
  sleep 0.2
done
log "slurmctld up (pid $ctl_pid)"

# ---- one slurmd per node: own UTS (hostname) + mount ns (hosts file) [+ net ns] ----------------------------
# nsenter, not `ip netns exec`: the latter remounts /sys, hides /sys/fs/cgroup and slurmd 22.05 aborts.
for i in $(seq "$NNODES"); do
  pre=(); [ "$MODE" = netns ] && pre=(nsenter "--net=/run/netns/$NS$i")
  "${pre[@]}" unshare --uts --mount --propagation private \
    sh -c 'mount --bind "$1" /etc/hosts && hostname "$2" && exec slurmd -D -N "$2"' \
    sh "$DIR/hosts" "node$i" </dev/null >"$DIR/log/slurmd-node$i.out" 2>&1 &
  echo "slurmd-node$i $!" >> "$DIR/pids"
done
want=$(seq -s' ' -f 'node%g' "$NNODES")
deadline=$((SECONDS + TIMEOUT))
until [ "$(timeout 5 sinfo -h -N -t idle -o '%N' | sort -V | xargs)" = "$want" ]; do
  for p in $(awk '$1 ~ /^slurm/{print $2}' "$DIR/pids"); do
    alive "$p" || die "daemon pid $p exited (see $DIR/log/*.out)"
  done
  [ $SECONDS -lt $deadline ] || { sinfo -N >&2; die "nodes not idle after ${TIMEOUT}s"; }
  sleep 0.2
done
# Each node's UTS namespace: every process in it is ours (down.sh uses it to find job leftovers).
for i in $(seq "$NNODES"); do
  pid=$(awk -v r="slurmd-node$i" '$1==r{print $2}' "$DIR/pids")
  echo "uts-node$i $(readlink "/proc/$pid/ns/uts")" >> "$DIR/layout"
done
trap - EXIT
log "cluster up: $(sinfo -h -N -o '%N=%T' | xargs)   (source $DIR/env.sh)"
