#!/usr/bin/env bash
# slurm/local/sbatch-wait.sh [sbatch args] script [script args] -- submit, poll every 0.5 s (sbatch --wait polls
# in growing 2..10 s steps), print the job's output, exit with the job's exit code (128+signal if killed by a
# signal; 1 for CANCELLED/TIMEOUT/...). Without an accounting DB `scontrol show job` is the source of truth.
# SBATCH_WAIT_TIMEOUT (s, default 900) bounds the wait; the job is cancelled when it is exceeded.
set -uo pipefail
: "${SLURM_CONF:?source the cluster env.sh first (slurm/local/up.sh prints where)}"
jid=$(sbatch --parsable "$@") || exit 1
jid=${jid%%;*}
deadline=$((SECONDS + ${SBATCH_WAIT_TIMEOUT:-900}))
while :; do
  info=$(scontrol show job -o "$jid" 2>/dev/null)
  state=$(grep -o 'JobState=[A-Z_]*' <<<"$info" | cut -d= -f2)
  case $state in
    PENDING|CONFIGURING|RUNNING|COMPLETING|SUSPENDED|REQUEUED|REQUEUE_HOLD|REQUEUE_FED|RESIZING|"") ;;
    *) break ;;
  esac
  [ $SECONDS -ge $deadline ] && { echo "job $jid: timeout waiting" >&2; scancel "$jid"; exit 124; }
  sleep 0.5
done
ec=$(grep -o ' ExitCode=[0-9]*:[0-9]*' <<<"$info" | cut -d= -f2)
out=$(grep -o ' StdOut=[^ ]*' <<<"$info" | cut -d= -f2)
echo "== job $jid $state ExitCode=$ec ($out)"
[ -f "$out" ] && cat "$out"
code=${ec%%:*}; sig=${ec##*:}
if [ "$sig" != 0 ]; then exit $((128 + sig)); fi
if [ "$state" != COMPLETED ] && [ "$code" = 0 ]; then exit 1; fi
exit "$code"
