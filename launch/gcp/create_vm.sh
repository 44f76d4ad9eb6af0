#!/bin/bash
# Create a GPU VM that trains in the image: vm_startup.sh restores the run from the bucket, trains, uploads
# checkpoints and TensorBoard every few minutes and stops the VM when done; vm_shutdown.sh makes the trainer
# checkpoint and uploads it before the VM stops (Spot preemption included). Starting the VM again resumes.
#   PROJECT=my-project SPOT=1 launch/gcp/create_vm.sh [--dry-run] [--train.max_steps 400000 ...]
# Settings: launch/gcp/common.sh, and VM_NAME (ddpm-${RUN_NAME}), VM_IMAGE_FAMILY / VM_IMAGE_PROJECT (a Deep
# Learning VM image: NVIDIA driver, Docker and the NVIDIA container toolkit), DISK_GB (200), SYNC_EVERY (300 s).
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "$0")/common.sh"

# The trainer's arguments travel NUL-separated and base64-encoded (vm_startup.sh decodes them into an array), so each
# reaches the trainer whole: a value may hold spaces, commas or ';' (--model.channel_mult "[1, 2, 2]", a path).
train_args=$(if [ "${#overrides[@]}" -gt 0 ]; then printf '%s\0' "${overrides[@]}"; fi | base64 | tr -d '\n')
flags=(--project="$PROJECT" --zone="$ZONE" --machine-type="$MACHINE_TYPE"
  --image-family="${VM_IMAGE_FAMILY:-common-cu128-ubuntu-2204-nvidia-570}"
  --image-project="${VM_IMAGE_PROJECT:-deeplearning-platform-release}"
  --boot-disk-size="${DISK_GB:-200}GB" --scopes=cloud-platform
  # '^;^' makes ';' the separator (gcloud topic escaping), so values may hold commas; base64 holds no ';'.
  "--metadata=^;^install-nvidia-driver=True;image=$IMAGE;run-name=$RUN_NAME;run-uri=$RUN_URI;config=$CONFIG;sync-every=${SYNC_EVERY:-300};train-args-base64=$train_args"
  --metadata-from-file="startup-script=$REPO_ROOT/launch/gcp/vm_startup.sh,shutdown-script=$REPO_ROOT/launch/gcp/vm_shutdown.sh")
# A2, A3 and G2 machine types come with their GPUs; N1 machines get them attached.
if [[ $MACHINE_TYPE == n1-* ]]; then flags+=(--accelerator="type=$ACCELERATOR_TYPE,count=$ACCELERATOR_COUNT"); fi
if [ "$SPOT" = 1 ]; then
  # STOP, not DELETE: the disk (and the latest checkpoint on it) stays for the next start.
  flags+=(--provisioning-model=SPOT --instance-termination-action=STOP)
else
  flags+=(--maintenance-policy=TERMINATE --restart-on-failure)  # GPUs cannot live-migrate
fi
run gcloud compute instances create "${VM_NAME:-ddpm-$RUN_NAME}" "${flags[@]}"
