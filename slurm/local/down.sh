#!/usr/bin/env bash
# slurm/local/down.sh -- tear down what slurm/local/up.sh started. Stops only the PIDs up.sh recorded plus
# processes living in the emulated nodes' own namespaces (slurmstepd, job tasks); never anything by name.
# Idempotent, safe after a partial or crashed setup. SLURM_LOCAL_KEEP=1 keeps $SLURM_LOCAL_DIR (logs).
set -uo pipefail
DIR=${SLURM_LOCAL_DIR:-/tmp/slurm-local}
NS=slurmci-n BR=slurmci-br          # must match up.sh
t0=$(date +%s.%N)
export SLURM_CONF=$DIR/slurm.conf
[ -d "$DIR" ] || { echo "slurm/local/down.sh: $DIR does not exist; checking for leftover namespaces only"; }

alive() { [ -r "/proc/$1/stat" ] && [ "$(sed 's/.*) \(.\).*/\1/' "/proc/$1/stat" 2>/dev/null)" != Z ]; }
stop_pids() {  # SIGTERM, up to 10 s grace, then SIGKILL
  local p left=()
  for p in "$@"; do alive "$p" && kill -TERM "$p" 2>/dev/null; done
  for _ in $(seq 50); do
    left=(); for p in "$@"; do alive "$p" && left+=("$p"); done
    [ ${#left[@]} = 0 ] && return 0; sleep 0.2
  done
  kill -KILL "${left[@]}" 2>/dev/null; sleep 0.2
}
pid_of() { awk -v r="$1" '$1==r{print $2}' "$DIR/pids" 2>/dev/null; }
uts_members() {  # PIDs whose UTS namespace is the one recorded for a node
  local d; for d in /proc/[0-9]*; do
    [ "$(readlink "$d/ns/uts" 2>/dev/null)" = "$1" ] && echo "${d#/proc/}"
  done
}
our_netns() { ip netns list 2>/dev/null | awk '{print $1}' | grep -E "^$NS[0-9]+$"; }

# 1. cancel jobs so slurmstepd and tasks end cleanly (only if our controller answers)
ctl=$(pid_of slurmctld)
if [ -n "$ctl" ] && alive "$ctl" && timeout 5 scontrol ping 2>/dev/null | grep -q 'is UP'; then
  jobs=$(timeout 5 squeue -h -o %i 2>/dev/null | xargs)
  if [ -n "$jobs" ]; then
    timeout 10 scancel $jobs
    for _ in $(seq 50); do [ -z "$(timeout 5 squeue -h -o %i 2>/dev/null)" ] && break; sleep 0.2; done
  fi
fi

# 2. slurmds, then whatever is left inside each node's namespaces
slurmds=$(awk '$1 ~ /^slurmd-/{print $2}' "$DIR/pids" 2>/dev/null)
[ -n "$slurmds" ] && stop_pids $slurmds
left=$( { grep '^uts-' "$DIR/layout" 2>/dev/null | while read -r _ uts; do uts_members "$uts"; done
          command -v ip >/dev/null && for n in $(our_netns); do ip netns pids "$n"; done; } | sort -u | xargs)
[ -n "$left" ] && { echo "slurm/local/down.sh: stopping leftovers in node namespaces: $left"; stop_pids $left; }

# 3. controller, then munged
[ -n "$ctl" ] && stop_pids "$ctl"
m=$(pid_of munged); [ -n "$m" ] && stop_pids "$m"

# 4. network: deleting the host end of a veth removes the pair synchronously
if command -v ip >/dev/null; then
  for n in $(our_netns); do ip link del "vh-$n" 2>/dev/null; ip netns del "$n"; done
  ip link show "$BR" >/dev/null 2>&1 && ip link del "$BR"
fi

if [ "${SLURM_LOCAL_KEEP:-0}" = 1 ]; then
  rm -f "$DIR/pids"; echo "slurm/local/down.sh: kept $DIR (logs in $DIR/log)"
else
  rm -rf "$DIR"
fi
awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN{printf "[slurm-local] down in %.2fs\n", b-a}'
exit 0
