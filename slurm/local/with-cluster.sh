#!/usr/bin/env bash
# slurm/local/with-cluster.sh CMD [ARGS...] -- bring the local cluster up, run CMD with SLURM_CONF exported,
# always tear down (also on Ctrl-C). Exits with CMD's status; on failure $SLURM_LOCAL_DIR (logs) is kept.
set -uo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
DIR=${SLURM_LOCAL_DIR:-/tmp/slurm-local}
"$HERE/up.sh" || exit 1
rc=1
trap '[ "$rc" = 0 ] || export SLURM_LOCAL_KEEP=1; "$HERE/down.sh"' EXIT
trap 'exit 130' INT TERM
export SLURM_CONF=$DIR/slurm.conf
"$@"; rc=$?
exit "$rc"
