#!/bin/bash
# Startup script of the VM from create_vm.sh (runs as root at every boot): restore the run from the bucket,
# train in the container, upload checkpoints and TensorBoard every few minutes and at the end, then the
# trainer's log, and power the VM off unless the trainer stopped early (75: the VM is going down anyway), so
# a crash does not leave a GPU idling. Uploads skip temporary directories and send each checkpoint's
# manifest.json after its files; a restore drops checkpoints without one (an upload that was cut short).
# --dry-run prints the commands (instance metadata from META_<key>; the trainer's exit status from TRAINER_EXIT).
set -euo pipefail

DRY_RUN=0
if [ "${1:-}" = --dry-run ]; then DRY_RUN=1; fi
run() { if [ "$DRY_RUN" = 1 ]; then printf '%q ' "$@"; echo; else "$@"; fi; }
meta() {  # meta KEY: an attribute create_vm.sh set on the instance
  if [ "$DRY_RUN" = 1 ]; then local var="META_${1//-/_}"; echo "${!var-<$1>}"; return; fi
  curl -fsS -H 'Metadata-Flavor: Google' "http://metadata.google.internal/computeMetadata/v1/instance/attributes/$1"
}

image=$(meta image)
run_uri=$(meta run-uri)
run_name=$(meta run-name)
# The trainer's arguments as create_vm.sh encoded them (NUL-separated, then base64), decoded into an array, so that
# none is split at its spaces or joined with the next.
args_file=$(mktemp)
if ! meta train-args-base64 | base64 --decode >"$args_file"; then
  echo "instance metadata train-args-base64 is not base64; recreate the VM with launch/gcp/create_vm.sh" >&2
  run poweroff  # nothing to train: stop paying for the GPU
  exit 1
fi
mapfile -d '' -t train_args <"$args_file"
rm -f "$args_file"
root=/var/lib/ddpm  # on the boot disk, which a stopped Spot VM keeps
run_dir=$root/runs/$run_name
# Two passes: everything but temporary directories, the lock and the manifests; then the manifests, which
# mark each checkpoint complete.
upload() {
  run gcloud storage rsync --recursive --exclude='(^|/)\.tmp-|(^|/)\.lock$|manifest\.json$' "$run_dir" "$run_uri" &&
    run gcloud storage rsync --recursive --exclude='^(?!checkpoints/step_\d{8}/manifest\.json$)' "$run_dir" "$run_uri" ||
    echo "upload to $run_uri failed" >&2
}

run mkdir -p "$run_dir" "$root/hf-cache"
# A fresh disk starts from what the bucket holds (nothing on the first boot).
if [ ! -d "$run_dir/checkpoints" ] && { [ "$DRY_RUN" = 1 ] || gcloud storage ls "$run_uri" >/dev/null 2>&1; }; then
  run gcloud storage rsync --recursive --exclude='(^|/)\.tmp-' "$run_uri" "$run_dir"
  run find "$run_dir/checkpoints" -mindepth 1 -maxdepth 1 -name 'step_*' -exec sh -c '[ -e "$1/manifest.json" ] || rm -rf "$1"' _ {} ';'
fi
run chown -R 1000:1000 "$root"  # the image's user
run gcloud auth configure-docker "${image%%/*}" --quiet
run docker pull "$image"
run docker rm --force ddpm-train 2>/dev/null || true  # the container of the last boot
# --init: tini passes `docker stop`'s SIGTERM to the launcher; node.sh starts one process per GPU.
run docker run --detach --name ddpm-train --init --gpus all --shm-size=16g \
  --volume "$root/runs:/workspace/runs" --volume "$root/hf-cache:/home/app/.cache/huggingface" \
  "$image" launch/node.sh --config "$(meta config)" --train.output_dir "runs/$run_name" --resume latest "${train_args[@]}"

if [ "$DRY_RUN" = 1 ]; then
  rc=${TRAINER_EXIT:-0}
else
  until timeout "$(meta sync-every)" docker wait ddpm-train >/dev/null; do upload; done
  rc=$(docker inspect --format '{{.State.ExitCode}}' ddpm-train)
fi
log=$run_dir/logs/trainer-$(date -u +%Y%m%dT%H%M%SZ).log
run mkdir -p "$run_dir/logs"
if [ "$DRY_RUN" = 1 ]; then echo "docker logs ddpm-train > $log"; else docker logs ddpm-train >"$log" 2>&1 || true; fi
upload
echo "# trainer exited $rc"
if [ "$rc" != 75 ]; then run poweroff; fi  # done or failed: stop paying for the GPU
