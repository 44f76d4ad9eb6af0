#!/bin/bash
# Start pipeline/train.py on this node: one `accelerate launch` (torchrun) for the node's processes, or plain
# python when the whole job is one process. slurm/_launch.sh runs it on every node through srun; on GCP
# (Compute Engine VM, Vertex AI) it is the container's command. Run from the repository root.
#
#   launch/node.sh [--dry-run] [train.py arguments...]
#
# Environment:
#   NUM_NODES       nodes in the job (default 1; from CLUSTER_SPEC on Vertex AI)
#   NODE_RANK       this node's rank (default: $SLURM_NODEID under srun, from CLUSTER_SPEC on Vertex AI, else 0)
#   MAIN_ADDR       address of the rank-0 node (needed when NUM_NODES > 1)
#   MAIN_PORT       a free port there (default 29500)
#   PROCS_PER_NODE  processes on this node (default: the GPUs in CUDA_VISIBLE_DEVICES or nvidia-smi; 1 with CPU=1)
#   CPU=1           train on CPUs (gloo)
set -euo pipefail
cd "$(dirname "$0")/.."

dry_run=0
if [ "${1:-}" = --dry-run ]; then dry_run=1; shift; fi

if [ -n "${CLUSTER_SPEC:-}" ] && [ -z "${MAIN_ADDR:-}" ]; then
  # Vertex AI describes the cluster in CLUSTER_SPEC: worker pool 0 is the primary replica, pool 1 the others.
  read -r NUM_NODES NODE_RANK MAIN_ADDR MAIN_PORT < <(python3 -c '
import json, os
spec = json.loads(os.environ["CLUSTER_SPEC"])
pools, task = spec["cluster"], spec["task"]
hosts = pools["workerpool0"] + pools.get("workerpool1", [])
rank = task["index"] + (len(pools["workerpool0"]) if task["type"] == "workerpool1" else 0)
print(len(hosts), rank, *hosts[0].rsplit(":", 1))')
fi
nodes=${NUM_NODES:-1}
rank=${NODE_RANK:-${SLURM_NODEID:-0}}

if [ "${CPU:-0}" = 1 ]; then
  # Without this, accelerate sees no GPU and silently runs every process as a world of one.
  export ACCELERATE_USE_CPU=1
  per_node=${PROCS_PER_NODE:-1}
elif [ -n "${PROCS_PER_NODE:-}" ]; then
  per_node=$PROCS_PER_NODE
elif [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then
  per_node=$(tr ',' '\n' <<<"$CUDA_VISIBLE_DEVICES" | grep -c .)
else
  per_node=$( (nvidia-smi -L 2>/dev/null || true) | grep -c '^GPU' || true)
fi
[ "$per_node" -gt 0 ] || { echo "node.sh: no GPU found; set PROCS_PER_NODE or CPU=1" >&2; exit 2; }
procs=$((nodes * per_node))

if [ "$procs" -gt 1 ]; then
  # --multi_gpu selects torchrun, which passes SIGTERM on to the trainer and waits for its checkpoint
  # (with ACCELERATE_USE_CPU it runs the same way over gloo): 120 s instead of its 30 before SIGKILL.
  export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-120}
  cmd=(accelerate launch --multi_gpu --num_machines "$nodes" --machine_rank "$rank" --num_processes "$procs"
    --main_process_ip "${MAIN_ADDR:-127.0.0.1}" --main_process_port "${MAIN_PORT:-29500}")
else
  # accelerate's single-process launcher would die on SIGTERM at once, taking the trainer with it
  # before its checkpoint is written; one process needs no launcher.
  cmd=(python3)
fi
cmd+=(pipeline/train.py "$@")

echo "[node $rank of $nodes: $per_node process(es) here, $procs in all] $(printf '%q ' "${cmd[@]}")"
if [ "$dry_run" = 1 ]; then exit 0; fi
if [ "$procs" -gt 1 ]; then
  # Bad input is one line from rank 0 and exit 2; torchrun then adds a ChildFailedError traceback. Hold back
  # a final traceback and drop it when every failed worker exited 2; any other traceback is printed whole.
  # The filter ignores USR1 and TERM (srun signals the whole step): were it to die, the launcher's stderr would break.
  exec "${cmd[@]}" 2> >(trap '' USR1 TERM; exec awk '
    /^Traceback \(most recent call last\):/ && !held { held = 1 }
    held { buffer = buffer $0 "\n"; next }
    { print; fflush() }
    END {
      rest = buffer; gsub(/exitcode +: -15 /, "", rest)  # ranks torchrun itself stopped (SIGTERM) after the first failure
      bad_input = buffer ~ /ChildFailedError/ && buffer ~ /exitcode +: 2 / && rest !~ /exitcode +: (-|[013-9]|[0-9][0-9])/
      if (bad_input) print "node.sh: a worker refused its input (the error above); launcher traceback omitted"
      else printf "%s", buffer
    }' >&2)
fi
exec "${cmd[@]}"  # exec: signals reach the launcher itself
