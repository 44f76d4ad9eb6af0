#!/bin/bash
# Build the training image (Dockerfile at the repository root) and push it to Artifact Registry.
#   PROJECT=my-project launch/gcp/build_push.sh [--dry-run]   (settings: launch/gcp/common.sh)
#   CLOUD_BUILD=1 ...: build on Cloud Build instead of the local Docker engine.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "$0")/common.sh"

if [ "${CLOUD_BUILD:-0}" = 1 ]; then
  run gcloud builds submit "$REPO_ROOT" --tag="$IMAGE" --project="$PROJECT"
else
  run gcloud auth configure-docker "$REGION-docker.pkg.dev" --quiet
  run docker build --tag "$IMAGE" "$REPO_ROOT"
  run docker push "$IMAGE"
fi
