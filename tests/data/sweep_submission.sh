#!/bin/bash

# Parameters
#SBATCH --array=0-1%2
#SBATCH --cpus-per-task=1
#SBATCH --error=SWEEP/jobs/%A_%a/%A_%a_0_log.err
#SBATCH --job-name=hpcdeconv-sweep
#SBATCH --mem=1GB
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --open-mode=append
#SBATCH --output=SWEEP/jobs/%A_%a/%A_%a_0_log.out
#SBATCH --requeue
#SBATCH --signal=USR2@90
#SBATCH --time=10
#SBATCH --wckey=submitit

# command
export SUBMITIT_EXECUTOR=slurm
srun --unbuffered --output SWEEP/jobs/%A_%a/%A_%a_%t_log.out --error SWEEP/jobs/%A_%a/%A_%a_%t_log.err PYTHON -u -m submitit.core._submit SWEEP/jobs/%j
