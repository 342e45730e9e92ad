#!/bin/bash

# Parameters
#SBATCH --account=kd-lab
#SBATCH --array=0-2%3
#SBATCH --cpus-per-task=1
#SBATCH --error=<sweep_dir>/.submitit/%A_%a/%A_%a_0_log.err
#SBATCH --job-name=launch
#SBATCH --mem=4GB
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --open-mode=append
#SBATCH --output=<sweep_dir>/.submitit/%A_%a/%A_%a_0_log.out
#SBATCH --partition=batch
#SBATCH --qos=normal
#SBATCH --requeue
#SBATCH --signal=USR2@120
#SBATCH --time=240
#SBATCH --wckey=submitit

# command
export SUBMITIT_EXECUTOR=slurm
srun --unbuffered --output <sweep_dir>/.submitit/%A_%a/%A_%a_%t_log.out --error <sweep_dir>/.submitit/%A_%a/%A_%a_%t_log.err <python> -u -m submitit.core._submit <sweep_dir>/.submitit/%j
