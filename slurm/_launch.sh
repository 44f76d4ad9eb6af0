# shellcheck shell=bash
# The body of slurm/cifar.sh and slurm/mnist.sh, sourced by them after they set CONFIG: one srun task per
# node runs launch/node.sh (`accelerate launch` for that node's GPUs); SLURM's warning signal makes the
# trainer checkpoint and the job requeue itself; every start resumes from the latest checkpoint.
#
# Environment (sbatch passes the submitting shell's environment on):
#   CONFIG          training config (set by the calling script; override with CONFIG=... sbatch ...)
#   OUTPUT_DIR      run directory; default: the config's train.output_dir. Keep it fixed: every start
#                   resumes from its latest checkpoint, and the TensorBoard folder stays the same.
#   CPU=1           train on CPUs (gloo), e.g. to test on a cluster without GPUs
#   PROCS_PER_NODE  processes per node; default: #SBATCH --gpus-per-node (1 with CPU=1)
#   MAIN_PORT       rendezvous port on the first node; default: a free one
#   VENV            virtual environment to activate first (when the job does not inherit one)
#   LOG_DIR         where each start's log goes (default: slurm/logs, beside sbatch's own log)
#   MAX_RESTARTS    requeue at most this many times (default 20), so a job cannot loop forever
# Arguments: more config overrides for pipeline/train.py, e.g. --train.max_steps 1000.
#
# Exit: 0 when the step budget is done. On SIGUSR1 (#SBATCH --signal=B:USR1@...: time limit near)
# the trainer checkpoints and the job requeues itself; the next start logs SLURM_RESTART_COUNT and
# resumes. On SIGTERM (scancel, preemption) it checkpoints and stops without requeueing. It requeues
# only after a clean early stop of this very start (exit 75, or status.json written since the start
# says stopped_early), and at most MAX_RESTARTS times: a crash, a bad input or a divergence ends the job.

: "${SLURM_JOB_ID:?submit with sbatch}" "${CONFIG:?}"
if [ -n "${VENV:-}" ]; then
  # shellcheck source=/dev/null
  source "$VENV/bin/activate"
fi

# Each start of the job gets its own log too; sbatch's --output (open-mode=append) collects all of them.
restart=${SLURM_RESTART_COUNT:-0}
log_dir=${LOG_DIR:-slurm/logs}
mkdir -p "$log_dir"
exec 3>&1 4>&2 > >(tee -a "$log_dir/${SLURM_JOB_NAME:-job}-$SLURM_JOB_ID-restart$restart.log") 2>&1
tee_pid=$!

# What launch/node.sh needs on every node (srun passes the environment on).
export NUM_NODES=$SLURM_JOB_NUM_NODES
MAIN_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
# The batch script runs on the first node of the allocation, so a port free here is free there.
MAIN_PORT=${MAIN_PORT:-$(python3 -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])')}
export MAIN_ADDR MAIN_PORT
if [ "${CPU:-0}" != 1 ] && [ -z "${PROCS_PER_NODE:-}" ] && [ -n "${SLURM_GPUS_PER_NODE:-}" ]; then
  export PROCS_PER_NODE=${SLURM_GPUS_PER_NODE##*:}  # --gpus-per-node=a100:4 -> 4
fi
overrides=(${OUTPUT_DIR:+--train.output_dir "$OUTPUT_DIR"} "$@")
train=(--config "$CONFIG" --resume latest "${overrides[@]}")
# The run directory as the trainer resolves it: its status.json tells "stopped early" apart from a crash.
run_dir=$(python3 -c 'import sys; from pipeline.config import load_config
print(load_config(sys.argv[1], sys.argv[2:]).train.output_dir)' "$CONFIG" "${overrides[@]}" 2>/dev/null) || run_dir=""  # the trainer reports a bad config
started=$(mktemp)  # status.json older than this is a previous start's
echo "[slurm] job $SLURM_JOB_ID start $restart on $SLURM_JOB_NODELIST ($NUM_NODES nodes), main $MAIN_ADDR:$MAIN_PORT; $(date -Is)"

# Trainer and torchrun both handle SIGTERM (torchrun passes it on to its workers and waits); SIGUSR1
# would kill torchrun itself. So the warning signal goes to the batch shell (B:USR1), which turns it
# into SIGTERM for the job step's processes and remembers to requeue.
signalled=""
# shellcheck disable=SC2329  # called by the traps below
on_signal() {
  signalled=$1
  printf "\n[slurm] SIG%s: the trainer checkpoints and stops\n" "$1"
  scancel --signal=TERM "$SLURM_JOB_ID" || echo "[slurm] scancel failed" >&2
}
trap 'on_signal USR1' USR1
trap 'on_signal TERM' TERM

# srun in the background: bash runs traps only between commands, and `wait` returns on a signal.
# launch/node.sh reads its node rank from $SLURM_NODEID on its own node (accelerate #1239, #2816).
# --wait: once one node's launcher ends (e.g. crashed), stop the others after 60 s instead of hanging.
srun --nodes="$NUM_NODES" --ntasks-per-node=1 --wait=60 ${SLURM_CPUS_PER_TASK:+--cpus-per-task="$SLURM_CPUS_PER_TASK"} \
  launch/node.sh "${train[@]}" &
srun_pid=$!
while :; do
  rc=0
  wait "$srun_pid" || rc=$?
  kill -0 "$srun_pid" 2>/dev/null || break  # still running: wait was only interrupted by a trap
done

# Exit 75 is the trainer's "stopped early, checkpoint saved" (e.g. train.max_minutes). It reaches us from
# a single process only (torchrun turns every worker failure into 1), so the run's status.json says it too.
stopped_early() {
  [ "$rc" -eq 75 ] || { [ "$run_dir/status.json" -nt "$started" ] && grep -q '"stopped_early"' "$run_dir/status.json"; }
}
requeue=0
if [ "$rc" -eq 0 ]; then
  echo "[slurm] training finished; $(date -Is)"
elif [ "$signalled" != TERM ] && stopped_early && [ "$restart" -ge "${MAX_RESTARTS:-20}" ]; then
  echo "[slurm] stopped early, but start $restart reached MAX_RESTARTS=${MAX_RESTARTS:-20}: not requeueing; $(date -Is)"
elif [ "$signalled" != TERM ] && stopped_early; then
  requeue=1
  echo "[slurm] trainer exited $rc after its checkpoint: requeueing job $SLURM_JOB_ID; $(date -Is)"
elif [ -n "$signalled" ]; then
  echo "[slurm] stopped on SIG$signalled (trainer exit $rc): not requeueing; submit again to resume; $(date -Is)"
else
  echo "[slurm] trainer failed (exit $rc): not requeueing; $(date -Is)"
fi
rm -f "$started"
exec 1>&3 2>&4  # end this start's log (tee) before the job ends
wait "$tee_pid" || true
if [ "$requeue" = 1 ]; then
  scontrol requeue "$SLURM_JOB_ID"
  exit 0
fi
exit "$rc"
