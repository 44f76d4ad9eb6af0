#!/bin/bash
# Startup script of the VM from create_vm.sh (runs as root at every boot): restore the run from the bucket,
# train in the container, upload checkpoints and TensorBoard every few minutes and at the end, and stop
# the VM once the step budget is done. --dry-run prints the commands (instance metadata from META_<key>).
set -euo pipefail

DRY_RUN=0
if [ "${1:-}" = --dry-run ]; then DRY_RUN=1; fi
run() { if [ "$DRY_RUN" = 1 ]; then printf '%q ' "$@"; echo; else "$@"; fi; }
meta() {  # meta KEY: an attribute create_vm.sh set on the instance
  if [ "$DRY_RUN" = 1 ]; then local var="META_${1//-/_}"; echo "${!var:-<$1>}"; return; fi
  curl -fsS -H 'Metadata-Flavor: Google' "http://metadata.google.internal/computeMetadata/v1/instance/attributes/$1"
}

image=$(meta image)
run_uri=$(meta run-uri)
run_name=$(meta run-name)
read -ra train_args <<<"$(meta train-args)"
root=/var/lib/ddpm  # on the boot disk, which a stopped Spot VM keeps
run_dir=$root/runs/$run_name
upload() { run gcloud storage rsync --recursive "$run_dir" "$run_uri" || echo "upload to $run_uri failed" >&2; }

run mkdir -p "$run_dir" "$root/hf-cache"
# A fresh disk starts from what the bucket holds (nothing on the first boot).
if [ ! -d "$run_dir/checkpoints" ] && { [ "$DRY_RUN" = 1 ] || gcloud storage ls "$run_uri" >/dev/null 2>&1; }; then
  run gcloud storage rsync --recursive "$run_uri" "$run_dir"
fi
run chown -R 1000:1000 "$root"  # the image's user
run gcloud auth configure-docker "${image%%/*}" --quiet
run docker pull "$image"
run docker rm --force ddpm-train 2>/dev/null || true  # the container of the last boot
# --init: tini passes `docker stop`'s SIGTERM to the launcher; node.sh starts one process per GPU.
run docker run --detach --name ddpm-train --init --gpus all --shm-size=16g \
  --volume "$root/runs:/workspace/runs" --volume "$root/hf-cache:/home/app/.cache/huggingface" \
  "$image" launch/node.sh --config "$(meta config)" --train.output_dir "runs/$run_name" --resume latest "${train_args[@]}"
if [ "$DRY_RUN" = 1 ]; then exit 0; fi

until timeout "$(meta sync-every)" docker wait ddpm-train >/dev/null; do upload; done
upload
rc=$(docker inspect --format '{{.State.ExitCode}}' ddpm-train)
echo "trainer exited $rc"
if [ "$rc" = 0 ]; then poweroff; fi  # done: stop paying for the GPU (exit 75: the VM is going down anyway)
