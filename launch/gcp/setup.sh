#!/bin/bash
# One-time project setup: the APIs, the Artifact Registry repository and the bucket.
#   PROJECT=my-project launch/gcp/setup.sh [--dry-run]        (settings: launch/gcp/common.sh)
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "$0")/common.sh"

run gcloud services enable artifactregistry.googleapis.com compute.googleapis.com aiplatform.googleapis.com \
  --project="$PROJECT"
run gcloud artifacts repositories create "$AR_REPO" --repository-format=docker --location="$REGION" --project="$PROJECT"
# Hierarchical namespace: Cloud Storage FUSE (Vertex AI's /gcs) renames folders atomically there, which the
# trainer's checkpoint commit (write step_N.tmp, rename to step_N) relies on.
run gcloud storage buckets create "$BUCKET" --location="$REGION" --uniform-bucket-level-access \
  --enable-hierarchical-namespace --project="$PROJECT"
