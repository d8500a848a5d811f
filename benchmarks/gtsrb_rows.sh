#!/usr/bin/env bash
# usage: benchmarks/gtsrb_rows.sh LOGDIR "ROW ..." "STAGE ARGS" ["STAGE ARGS" ...]
#
# Runs benchmarks/gtsrb.py for several attack rows (ATTACK/MODE) side by side, one process per row. In each,
# gtsrb.py runs once per stage with `--attacks ROW` (or `$ROWFLAG ROW`, e.g. ROWFLAG=--low-data) followed by
# that stage's arguments, word-split; a stage starts when the one before it succeeded. Every process shares
# the --cache the stages name: candidates have distinct content keys and result rows are appended one whole
# line at a time. Each row's output goes to LOGDIR/ATTACK_MODE.log.
#
# On one GPU a lone gtsrb.py process is bound by the host (Python and kernel launches, not the GPU), so rows
# side by side fill the GPU; their wall times are then shared-GPU times, not comparable with a lone run's.
set -u
if [ $# -lt 3 ]; then
    sed -n '2,3p' "$0" >&2
    exit 2
fi
logdir=$1 rows=$2
shift 2
mkdir -p "$logdir"
for row in $rows; do
    (
        for stage in "$@"; do
            # shellcheck disable=SC2086  # a stage is a list of arguments
            "${PYTHON:-python}" benchmarks/gtsrb.py "${ROWFLAG:---attacks}" "$row" $stage || exit
        done
    ) >"$logdir/${row//\//_}.log" 2>&1 &
done
wait
