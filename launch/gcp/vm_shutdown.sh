#!/bin/bash
# Shutdown script of the VM from create_vm.sh (Spot preemption, stop, delete): SIGTERM makes the trainer
# checkpoint and exit 75; then the run goes to the bucket. A Spot VM has about 30 s for all of it.
# --dry-run prints the commands (instance metadata from META_<key>).
set -uo pipefail

DRY_RUN=0
if [ "${1:-}" = --dry-run ]; then DRY_RUN=1; fi
run() { if [ "$DRY_RUN" = 1 ]; then printf '%q ' "$@"; echo; else "$@"; fi; }
meta() {  # meta KEY: an attribute create_vm.sh set on the instance
  if [ "$DRY_RUN" = 1 ]; then local var="META_${1//-/_}"; echo "${!var:-<$1>}"; return; fi
  curl -fsS -H 'Metadata-Flavor: Google' "http://metadata.google.internal/computeMetadata/v1/instance/attributes/$1"
}

run docker stop --time=20 ddpm-train  # SIGTERM, up to 20 s for the checkpoint, then SIGKILL
# As vm_startup.sh uploads: no temporary directories, then the manifests that mark checkpoints complete.
run_dir=/var/lib/ddpm/runs/$(meta run-name)
run gcloud storage rsync --recursive --exclude='(^|/)\.tmp-|(^|/)\.lock$|manifest\.json$' "$run_dir" "$(meta run-uri)"
run gcloud storage rsync --recursive --exclude='^(?!checkpoints/step_\d{8}/manifest\.json$)' "$run_dir" "$(meta run-uri)"
