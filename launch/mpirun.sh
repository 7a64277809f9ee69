#!/usr/bin/env bash
# Run a command as N MPI ranks on this host, for example
#   launch/mpirun.sh 2 -- hpcdeconv train --config configs/blind.yaml
# Uses the mpiexec of the mpich wheel in the repository's .venv when it exists (it must be
# the MPI that mpi4py was built against); each rank finds its rank through mpi4py
# (hpcdeconv.training.dist.discover). Collectives still run over gloo or nccl.
set -euo pipefail

usage() {
	echo "usage: $(basename "$0") N -- COMMAND [ARGS...]  (N: positive integer)" >&2
	exit 2
}

[[ $# -ge 3 && $2 == -- ]] || usage
nranks=$1
shift 2
[[ $nranks =~ ^[1-9][0-9]*$ ]] || usage

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [[ -x $root/.venv/bin/mpiexec ]]; then
	export PATH="$root/.venv/bin:$PATH"
fi
if ! command -v mpiexec >/dev/null; then
	echo "$(basename "$0"): error: mpiexec not found; pip install mpich mpi4py into $root/.venv" >&2
	exit 1
fi
exec mpiexec -n "$nranks" "$@"
