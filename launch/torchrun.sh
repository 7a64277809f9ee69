#!/usr/bin/env bash
# Run a command as NPROC local ranks under torchrun, for example
#   launch/torchrun.sh 2 -- hpcdeconv train --config configs/blind.yaml
# Every rank executes the command as given (torchrun --no-python) and finds its rank in the
# torchrun variables (hpcdeconv.training.dist.discover). The repository's .venv, when it
# exists, comes first on PATH so that `hpcdeconv` and `python` are the project's.
set -euo pipefail

usage() {
	echo "usage: $(basename "$0") NPROC -- COMMAND [ARGS...]  (NPROC: positive integer, auto, cpu or gpu)" >&2
	exit 2
}

[[ $# -ge 3 && $2 == -- ]] || usage
nproc=$1
shift 2
[[ $nproc =~ ^([1-9][0-9]*|auto|cpu|gpu)$ ]] || usage

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [[ -x $root/.venv/bin/torchrun ]]; then
	export PATH="$root/.venv/bin:$PATH"
fi
if ! command -v torchrun >/dev/null; then
	echo "$(basename "$0"): error: torchrun not found; install torch or create $root/.venv" >&2
	exit 1
fi
exec torchrun --standalone --nproc_per_node="$nproc" --no-python "$@"
