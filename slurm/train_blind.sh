#!/bin/bash
# Train a deconvolution network (the blind cycleGAN of configs/blind.yaml by default) as a
# SLURM batch job: one `hpcdeconv train` task per GPU, started by srun, checkpointing and
# requeueing itself before the time limit and resuming automatically when it runs again.
#
#   sbatch slurm/train_blind.sh configs/blind.yaml --set train.steps=20000 --set strategy.name=ddp
#   HPCDECONV_CONFIG=configs/blind.yaml HPCDECONV_OVERRIDES="strategy.name=ddp" \
#       sbatch slurm/train_blind.sh
#   # CPU-only nodes (gloo): no GPUs, a few single-threaded or multi-threaded tasks per node
#   sbatch --gpus-per-node=0 --ntasks-per-node=2 --cpus-per-task=4 slurm/train_blind.sh CONFIG
#
# Arguments: an optional CONFIG (first argument, unless it starts with '-'), then any
# `hpcdeconv train` options (`--set KEY=VALUE`, `--output RUN_DIR`, ...). Relative paths are
# resolved from the directory sbatch was called in (the job starts there).
#
# Environment (read in the job; sbatch passes the submitting shell's environment on):
#   HPCDECONV_CONFIG     configuration used when no CONFIG argument is given
#   HPCDECONV_OVERRIDES  whitespace-separated KEY=VALUE items, applied before the --set
#                        arguments (write lists without spaces: data.patch=[64,64,64])
#   HPCDECONV_VENV       virtualenv whose bin/hpcdeconv runs (default: .venv in the
#                        submission directory if it has one, else hpcdeconv on PATH)
#   OMP_NUM_THREADS      threads per task (default: --cpus-per-task)
#
# Every #SBATCH option below can be overridden on the sbatch command line.
#
# Name of the job; with --output=%x-%j.out also the prefix of the log file.
#SBATCH --job-name=hpcdeconv-blind
# Nodes; data-parallel ranks = nodes x tasks per node.
#SBATCH --nodes=1
# One task (rank) per GPU: keep equal to --gpus-per-node (the job refuses to start otherwise).
#SBATCH --ntasks-per-node=4
# GPUs per node; 0 on CPU-only nodes, where the ranks use gloo instead of nccl.
#SBATCH --gpus-per-node=4
# Cores per task: DataLoader workers (data.num_workers) plus the training thread(s).
#SBATCH --cpus-per-task=8
# Wall-clock limit per run of the job; a requeued job gets the full limit again.
#SBATCH --time=24:00:00
# SIGUSR1 to every task of the job steps (not to this batch shell: that would be B:USR1)
# 120 s before the limit: the tasks finish the current step, checkpoint, and rank 0 runs
# `scontrol requeue`. SLURM may deliver it up to a minute early.
#SBATCH --signal=USR1@120
# Allow `scontrol requeue` (and requeue after a node failure or preemption).
#SBATCH --requeue
# One log per job id, in the submission directory.
#SBATCH --output=%x-%j.out
# A requeued run appends to that log instead of truncating it.
#SBATCH --open-mode=append

set -euo pipefail
PROG=train_blind.sh

die() {
	printf '%s: error: %s\n' "$PROG" "$*" >&2
	exit 2
}

log() { printf '%s: %s\n' "$PROG" "$*" >&2; }

# The count in a SLURM GPU request such as "4", "a100:4" or "gpu:a100:4".
gpu_count() { printf '%s\n' "${1##*:}"; }

check_inside_slurm() {
	if [[ -z ${SLURM_JOB_ID:-} ]]; then
		printf '%s: not inside a SLURM job; submit it with: sbatch slurm/train_blind.sh CONFIG [--set KEY=VALUE ...]\n' \
			"$PROG" >&2
		exit 2
	fi
}

check_one_task_per_gpu() {
	local gpus tasks=${SLURM_NTASKS_PER_NODE:-}
	[[ -n ${SLURM_GPUS_PER_NODE:-} && -n $tasks ]] || return 0
	gpus=$(gpu_count "$SLURM_GPUS_PER_NODE")
	# A heterogeneous per-node task list ("2(x3),1") has no single value to compare.
	[[ $gpus =~ ^[0-9]+$ && $tasks =~ ^[0-9]+$ ]] || return 0
	if ((gpus > 0 && gpus != tasks)); then
		die "--ntasks-per-node=$tasks but --gpus-per-node=$SLURM_GPUS_PER_NODE: start one task per GPU"
	fi
}

use_venv() {
	local venv=${HPCDECONV_VENV:-${SLURM_SUBMIT_DIR:-$PWD}/.venv}
	if [[ -x $venv/bin/hpcdeconv ]]; then
		export PATH="$venv/bin:$PATH"
	elif [[ -n ${HPCDECONV_VENV:-} ]]; then
		die "HPCDECONV_VENV=$HPCDECONV_VENV has no bin/hpcdeconv"
	fi
	command -v hpcdeconv >/dev/null ||
		die "hpcdeconv is not on PATH; set HPCDECONV_VENV to the virtualenv it is installed in"
}

# Forward a signal that reached this shell (scancel --batch/--full, --signal=B:...) to srun,
# which passes it on to every task; the tasks then checkpoint and stop between steps.
# shellcheck disable=SC2317  # called from the traps
forward() {
	log "batch shell got SIG$1; forwarding it to the training tasks"
	if [[ -n $srun_pid ]]; then
		kill -s "$1" "$srun_pid" 2>/dev/null || true
	fi
}

main() {
	local config=${HPCDECONV_CONFIG:-} overrides=() items=() item status quoted
	check_inside_slurm
	if [[ $# -gt 0 && $1 != -* ]]; then
		config=$1
		shift
	fi
	[[ -n $config ]] || die "no configuration: pass CONFIG as the first argument or set HPCDECONV_CONFIG"
	[[ -f $config ]] || die "configuration $config not found (relative to $PWD)"
	# read -a splits on whitespace without globbing ([16,16,16] is a glob pattern).
	read -r -a items <<<"${HPCDECONV_OVERRIDES:-}"
	for item in "${items[@]}"; do
		overrides+=(--set "$item")
	done
	check_one_task_per_gpu
	use_venv
	export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}

	local srun_args=(--kill-on-bad-exit=1)
	# SLURM 22.05 srun does not inherit the job's --cpus-per-task: pass it on explicitly.
	if [[ -n ${SLURM_CPUS_PER_TASK:-} ]]; then
		srun_args+=("--cpus-per-task=$SLURM_CPUS_PER_TASK")
	fi
	local cmd=(hpcdeconv train --config "$config" --auto-resume "${overrides[@]}" "$@")
	log "job $SLURM_JOB_ID run $((${SLURM_RESTART_COUNT:-0} + 1)) on ${SLURM_JOB_NODELIST:-?}:" \
		"${SLURM_NTASKS:-1} tasks, ${SLURM_GPUS_PER_NODE:-0} GPUs/node, $OMP_NUM_THREADS threads/task"
	printf -v quoted ' %q' srun "${srun_args[@]}" "${cmd[@]}"
	log "${quoted# }"

	trap 'forward USR1' USR1
	trap 'forward TERM' TERM
	srun "${srun_args[@]}" "${cmd[@]}" &
	srun_pid=$!
	# `wait` returns early (status > 128) whenever a trapped signal arrives; srun is reaped
	# (and `kill -0` fails) only once it has really exited.
	while :; do
		wait "$srun_pid" && status=0 || status=$?
		kill -0 "$srun_pid" 2>/dev/null || break
	done
	((status == 0)) || log "srun exited with status $status"
	exit "$status"
}

srun_pid=
main "$@"
