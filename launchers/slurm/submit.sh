#!/usr/bin/env bash
# A stage (or `run`, the whole pipeline) as a SLURM job, from a login node; a thin wrapper over
# `dpt-scale submit` with the cluster settings as variables.
#   NODES=4 GPUS=8 PARTITION=gpu launchers/slurm/submit.sh STAGE RECIPE [more dpt-scale submit options]
set -euo pipefail
if [[ $# -lt 2 ]]; then
    echo "usage: [NODES=1] [GPUS=8] [PARTITION=P] [TIMEOUT_MIN=240] $0 STAGE RECIPE [options]" >&2
    exit 2
fi
stage=$1 recipe=$2
shift 2
partition=()
[[ -n ${PARTITION:-} ]] && partition=(--partition "$PARTITION")
exec dpt-scale submit "$recipe" --stage "$stage" --nodes "${NODES:-1}" --gpus-per-node "${GPUS:-8}" \
    --timeout-min "${TIMEOUT_MIN:-240}" "${partition[@]}" "$@"
