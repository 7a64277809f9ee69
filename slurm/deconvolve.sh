#!/bin/bash
#SBATCH --job-name=hpcdeconv-deconvolve
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=1
#SBATCH --time=04:00:00
#SBATCH --output=deconvolve-%j.out
#
# Block-wise deconvolution of whole volumes on a dask cluster, from a SLURM batch job.
# Every argument is passed on to `hpcdeconv deconvolve` (or `hpcdeconv rl` if the first
# argument is `rl`). Submit from the repository root: its .venv (or $HPCDECONV_VENV) is used
# when present, else `hpcdeconv` must be on PATH.
#
# Two ways to get dask workers:
#
#   1. --cluster slurm (the default here). This job is one small task that runs the dask
#      scheduler and the client; dask-jobqueue submits one further SLURM job per worker
#      (cluster.* settings: partition, walltime, memory_per_worker, gpus_per_worker):
#
#        sbatch slurm/deconvolve.sh --checkpoint runs/blind data.zarr/blurred/test000 \
#            --output out.zarr --workers 8 --set cluster.gpus_per_worker=1 \
#            --set cluster.partition=gpu
#
#   2. --cluster mpi. All workers live inside this job: give it N >= 3 tasks; srun starts
#      N MPI ranks (rank 0: scheduler, rank 1: client, ranks 2..N-1: one worker each). A
#      worker that sees several GPUs takes the one of its node-local rank (SLURM_LOCALID
#      modulo the count), so 6 tasks on a 4-GPU node give the 4 workers one GPU each:
#
#        sbatch --nodes=1 --ntasks=6 --gpus-per-node=4 --cpus-per-task=4 \
#            slurm/deconvolve.sh --cluster mpi --checkpoint runs/blind \
#            data.zarr/blurred/test000 --output out.zarr
#
# Add --resume to continue a run that was cut off (e.g. by the time limit): finished
# blocks are recorded in out.zarr and skipped. The mpich wheel needs srun --mpi=pmi2.
# Outside SLURM this script only explains itself; run `hpcdeconv deconvolve` directly.
set -euo pipefail

if [[ -z ${SLURM_JOB_ID:-} ]]; then
	cat >&2 <<-'EOF'
		deconvolve.sh: not inside a SLURM job. Submit it with sbatch, for example
		  sbatch slurm/deconvolve.sh --checkpoint runs/blind data.zarr/blurred/test000 --output out.zarr
		or, without SLURM, run the driver on this machine:
		  hpcdeconv deconvolve --checkpoint runs/blind data.zarr/blurred/test000 --output out.zarr
	EOF
	exit 2
fi

venv=${HPCDECONV_VENV:-${SLURM_SUBMIT_DIR:-$PWD}/.venv}
if [[ -x $venv/bin/hpcdeconv ]]; then
	export PATH="$venv/bin:$PATH"
fi
if ! command -v hpcdeconv >/dev/null; then
	echo "deconvolve.sh: error: hpcdeconv not found on PATH or in $venv (set HPCDECONV_VENV)" >&2
	exit 1
fi

verb=deconvolve
if [[ ${1:-} == rl || ${1:-} == deconvolve ]]; then
	verb=$1
	shift
fi

cluster=
args=("$@")
for i in "${!args[@]}"; do
	case ${args[i]} in
	--cluster) cluster=${args[i + 1]:-} ;;
	--cluster=*) cluster=${args[i]#--cluster=} ;;
	--scheduler | --scheduler=*) cluster=scheduler ;;
	esac
done

case $cluster in
mpi)
	# The workers run inside these ranks: one malloc arena, as hpcdeconv gives the workers it
	# spawns itself (torch in dask's executor thread is 10-25 % slower with its own arena).
	MALLOC_ARENA_MAX=${MALLOC_ARENA_MAX:-1} exec srun --mpi=pmi2 hpcdeconv "$verb" "$@"
	;;
"")
	exec hpcdeconv "$verb" --cluster slurm "$@"
	;;
*)
	exec hpcdeconv "$verb" "$@"
	;;
esac
