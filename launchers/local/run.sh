#!/usr/bin/env bash
# One machine, N processes (CPU or GPU): torchrun on a free local port.
#   launchers/local/run.sh NPROC STAGE RECIPE [--set KEY=VALUE ...]
set -euo pipefail
if [[ $# -lt 3 ]]; then
    echo "usage: $0 NPROC STAGE RECIPE [--set KEY=VALUE ...]" >&2
    exit 2
fi
procs=$1 stage=$2 recipe=$3
shift 3
python=${PYTHON:-python3}
# torchrun would set 1 thread per process; share the cores instead (CPU runs are otherwise slow)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / procs > 0 ? $(nproc) / procs : 1 ))}
free_port='import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
port=${MASTER_PORT:-$("$python" -c "$free_port")}
exec "$python" -m torch.distributed.run --nproc_per_node "$procs" --master_addr 127.0.0.1 --master_port "$port" \
    -m dpt_scale "$stage" "$recipe" "$@"
