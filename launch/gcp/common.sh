# shellcheck shell=bash disable=SC2034  # the settings are for the scripts that source this file
# Settings shared by the launch/gcp scripts, each overridable from the environment:
#   PROJECT            GCP project (default: gcloud's configured project)
#   REGION             region of the registry, the bucket and Vertex AI jobs (us-central1)
#   ZONE               zone of the VM (${REGION}-a)
#   BUCKET             gs:// bucket for checkpoints and TensorBoard (gs://${PROJECT}-ddpm)
#   AR_REPO            Artifact Registry Docker repository (ddpm)
#   IMAGE_TAG          image tag (the git commit, else latest)
#   IMAGE              image URI (${REGION}-docker.pkg.dev/${PROJECT}/${AR_REPO}/ddpm-train:${IMAGE_TAG})
#   RUN_NAME           names the VM / job and the run folder ${BUCKET}/runs/${RUN_NAME} (cifar10)
#   CONFIG             training config in the image (configs/cifar10.yaml)
#   MACHINE_TYPE       machine type (g2-standard-8: 8 vCPUs, 1 x L4)
#   ACCELERATOR_TYPE   GPU, Compute Engine spelling (nvidia-l4; Vertex AI's NVIDIA_L4 is derived from it)
#   ACCELERATOR_COUNT  GPUs per machine (1)
#   REPLICA_COUNT      machines of a Vertex AI job (1)
#   SPOT=1             Spot capacity: a Spot VM, or Vertex AI's SPOT scheduling strategy
# Every script takes --dry-run: it prints the commands (and job spec) and runs none of them.
# Arguments other than --dry-run are config overrides for pipeline/train.py (--section.key value ...).

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)

DRY_RUN=0
overrides=()
for arg in "$@"; do
  if [ "$arg" = --dry-run ]; then DRY_RUN=1; else overrides+=("$arg"); fi
done

# run CMD...: run it, or with --dry-run print it (shell-quoted, so it can be pasted).
run() {
  if [ "$DRY_RUN" = 1 ]; then
    printf '%q ' "$@"
    echo
  else
    "$@"
  fi
}

if [ -z "${PROJECT:-}" ] && command -v gcloud >/dev/null; then PROJECT=$(gcloud config get-value project 2>/dev/null); fi
: "${PROJECT:?set PROJECT (or gcloud config set project ...)}"
REGION=${REGION:-us-central1}
ZONE=${ZONE:-$REGION-a}
BUCKET=${BUCKET:-gs://$PROJECT-ddpm}
AR_REPO=${AR_REPO:-ddpm}
IMAGE_TAG=${IMAGE_TAG:-$(git -C "$REPO_ROOT" rev-parse --short HEAD 2>/dev/null || echo latest)}
IMAGE=${IMAGE:-$REGION-docker.pkg.dev/$PROJECT/$AR_REPO/ddpm-train:$IMAGE_TAG}
RUN_NAME=${RUN_NAME:-cifar10}
CONFIG=${CONFIG:-configs/cifar10.yaml}
MACHINE_TYPE=${MACHINE_TYPE:-g2-standard-8}
ACCELERATOR_TYPE=${ACCELERATOR_TYPE:-nvidia-l4}
ACCELERATOR_COUNT=${ACCELERATOR_COUNT:-1}
REPLICA_COUNT=${REPLICA_COUNT:-1}
SPOT=${SPOT:-0}
RUN_URI=$BUCKET/runs/$RUN_NAME
