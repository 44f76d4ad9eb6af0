#!/bin/bash
# Train configs/mnist.yaml on one GPU (any N x G works, as in slurm/cifar.sh). From the repository root:
#   sbatch slurm/mnist.sh [--section.key value ...]
# Knobs and behaviour (checkpoint, requeue, resume): slurm/_launch.sh. Edit the resources here:
#SBATCH --job-name=ddpm-mnist
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=1
#SBATCH --cpus-per-task=8
#SBATCH --time=04:00:00
#SBATCH --output=slurm/logs/%x-%j.out
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --signal=B:USR1@180
##SBATCH --partition=gpu        # site-specific: delete one '#' to use
##SBATCH --account=my-project
set -euo pipefail
CONFIG=${CONFIG:-configs/mnist.yaml}
# sbatch runs a spooled copy of this file, so find the repository from where the job was submitted.
cd "${REPO_DIR:-$SLURM_SUBMIT_DIR}"
# shellcheck source-path=SCRIPTDIR source=_launch.sh
source slurm/_launch.sh
