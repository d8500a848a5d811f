#!/usr/bin/env bash
# usage: benchmarks/detector_rows.sh OUTDIR "GROUP ..." DETECTOR ARGS...
#
# Runs benchmarks/detector.py once per GROUP side by side, one process each, with the DETECTOR ARGS and the
# group's own candidates: GROUP is an attack (at every --levels rate) or seeds:S,S,... (benign models of those
# seeds). Each process has its own cache OUTDIR/GROUP (rows.jsonl, candidates/) and log OUTDIR/GROUP.log; one
# table of them all: cat OUTDIR/*/rows.jsonl > DIR/rows.jsonl, then detector.py --table-only --cache DIR.
#
# On one GPU a lone detector.py process is bound by the host (Python and kernel launches), so groups side by
# side fill the GPU; their times are then shared-GPU times.
set -u
if [ $# -lt 2 ]; then
    sed -n '2,3p' "$0" >&2
    exit 2
fi
outdir=$1 groups=$2
shift 2
mkdir -p "$outdir"
for group in $groups; do
    case $group in
        seeds:*) select=(--attacks= "--benign-seeds=${group#seeds:}") ;;
        *) select=("--attacks=$group" --benign-seeds=) ;;
    esac
    "${PYTHON:-python}" -m benchmarks.detector "$@" "${select[@]}" --cache "$outdir/${group//[:,]/_}" \
        >"$outdir/${group//[:,]/_}.log" 2>&1 &
done
wait
