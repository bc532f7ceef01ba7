#!/usr/bin/env bash
# Several machines with the `deepspeed` launcher (pdsh over ssh by default), one process per slot
# of the hostfile; the DeepSpeed config comes from the recipe.
#   launchers/deepspeed/run.sh HOSTFILE STAGE RECIPE [--set KEY=VALUE ...]
# Extra launcher options go in DEEPSPEED_ARGS, e.g. DEEPSPEED_ARGS="--include node1:0,1 --launcher openmpi".
set -euo pipefail
if [[ $# -lt 3 ]]; then
    echo "usage: $0 HOSTFILE STAGE RECIPE [--set KEY=VALUE ...]" >&2
    exit 2
fi
hostfile=$1 stage=$2 recipe=$3
shift 3
[[ -f $hostfile ]] || { echo "error: hostfile not found: $hostfile" >&2; exit 2; }
# shellcheck disable=SC2086  # DEEPSPEED_ARGS is a list of options
exec deepspeed --hostfile "$hostfile" --master_port "${MASTER_PORT:-29500}" ${DEEPSPEED_ARGS:-} \
    --module dpt_scale "$stage" "$recipe" "$@"
