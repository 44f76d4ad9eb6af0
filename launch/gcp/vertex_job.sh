#!/bin/bash
# Submit a Vertex AI CustomJob: REPLICA_COUNT machines x ACCELERATOR_COUNT GPUs, each running launch/node.sh
# in the image (it reads the cluster from Vertex AI's CLUSTER_SPEC). The run is written straight to the
# bucket through Cloud Storage FUSE (/gcs/...); a restarted job resumes from its latest checkpoint.
#   PROJECT=my-project REPLICA_COUNT=2 MACHINE_TYPE=a2-highgpu-8g ACCELERATOR_TYPE=nvidia-tesla-a100 \
#     ACCELERATOR_COUNT=8 launch/gcp/vertex_job.sh [--dry-run] [--train.max_steps 400000 ...]
# Settings: launch/gcp/common.sh; SPEC_FILE: where the job spec is written (a temporary file).
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "$0")/common.sh"

json() { local s=${1//\\/\\\\}; printf '"%s"' "${s//\"/\\\"}"; }  # a YAML (JSON) string
args=(--config "$CONFIG" --train.output_dir "/gcs/${BUCKET#gs://}/runs/$RUN_NAME" --resume latest "${overrides[@]}")
quoted_args=$(for a in "${args[@]}"; do json "$a"; echo -n ", "; done)
pool() {  # pool REPLICAS: one worker pool spec
  cat <<YAML
  - replicaCount: $1
    machineSpec:
      machineType: $MACHINE_TYPE
      acceleratorType: $(tr 'a-z-' 'A-Z_' <<<"$ACCELERATOR_TYPE")
      acceleratorCount: $ACCELERATOR_COUNT
    diskSpec: {bootDiskType: pd-ssd, bootDiskSizeGb: 200}
    containerSpec:
      imageUri: $IMAGE
      command: [/workspace/launch/node.sh]
      args: [${quoted_args%, }]
YAML
}

spec=${SPEC_FILE:-$(mktemp --suffix=.yaml)}
{
  echo "# Vertex AI CustomJobSpec (https://cloud.google.com/vertex-ai/docs/reference/rest/v1/CustomJobSpec)"
  echo "workerPoolSpecs:  # pool 0: the primary replica (node rank 0); pool 1: the other nodes"
  pool 1
  if [ "$REPLICA_COUNT" -gt 1 ]; then pool $((REPLICA_COUNT - 1)); fi
  echo "scheduling:"
  echo "  strategy: $([ "$SPOT" = 1 ] && echo SPOT || echo STANDARD)"
  echo "  restartJobOnWorkerRestart: true  # all nodes restart together and resume from the checkpoint"
  echo "baseOutputDirectory:"
  echo "  outputUriPrefix: $RUN_URI"
} >"$spec"

if [ "$DRY_RUN" = 1 ]; then echo "# job spec $spec:"; sed 's/^/#   /' "$spec"; fi
run gcloud ai custom-jobs create --project="$PROJECT" --region="$REGION" --display-name="$RUN_NAME" --config="$spec"
