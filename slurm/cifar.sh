#!/bin/bash
# Train configs/cifar10.yaml on N nodes x G GPUs. From the repository root:
#   sbatch slurm/cifar.sh [--section.key value ...]
#   OUTPUT_DIR=runs/cifar10-b sbatch --nodes=4 slurm/cifar.sh --train.max_steps 400000
# Knobs and behaviour (checkpoint, requeue, resume): slurm/_launch.sh. Edit the resources here:
#SBATCH --job-name=ddpm-cifar10
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=32
#SBATCH --time=24:00:00
#SBATCH --output=slurm/logs/%x-%j.out
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --signal=B:USR1@300
##SBATCH --partition=gpu        # site-specific: delete one '#' to use
##SBATCH --account=my-project
set -euo pipefail
CONFIG=${CONFIG:-configs/cifar10.yaml}
# sbatch runs a spooled copy of this file, so find the repository from where the job was submitted.
cd "${REPO_DIR:-$SLURM_SUBMIT_DIR}"
# shellcheck source-path=SCRIPTDIR source=_launch.sh
source slurm/_launch.sh
