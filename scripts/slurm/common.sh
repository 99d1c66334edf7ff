# shellcheck shell=bash
# Sourced by scripts/slurm/pretrain.sbatch and finetune.sbatch, in the batch shell (on the first node):
#   run_on_nodes SCRIPT.py ARGS...
# starts one `srun` task per node; each runs torchrun, which starts NPROC_PER_NODE ranks of SCRIPT.py with
# ARGS and --auto_resume. The rendezvous is the first node of the allocation at a port derived from the job
# id. A refusal is one line `error: ...` and exit 2, before anything starts.
#
# Stopping in time, and coming back:
# - The batch shell gets SIGUSR1 a while before the time limit (#SBATCH --signal=B:USR1@SECONDS). It then
#   sends SIGTERM to the ranks on every node (scancel --signal=TERM: the job steps, not this shell); they
#   finish the step, save a checkpoint and exit 0 (llama_recipe/trainer.py's StopRequest). Once they have,
#   this shell requeues the job (scontrol requeue): it starts again from the top, as the same job id, and
#   --auto_resume picks up that checkpoint. Slurm makes a requeued job wait about two minutes to start.
# - scancel, a preemption, or a node failure sends SIGTERM to every process of the job, ranks included:
#   they save the same way (within the cluster's KillWait / GraceTime, then Slurm kills); with --requeue
#   Slurm itself puts a preempted job or one on a failed node back in the queue.
# - torchrun ignores SIGTERM here. It would otherwise forward it to its ranks and kill them 30 s later,
#   whether or not their checkpoint is written; the ranks get the signal from Slurm themselves. (So the
#   ranks start with SIGTERM ignored too, until the training loop handles it: a signal during start-up is
#   lost, and Slurm's SIGKILL follows.) Slurm must track the ranks as part of the step to signal them:
#   ProctrackType=proctrack/cgroup (the default) or proctrack/linuxproc, not proctrack/pgid.
#
# Settings (environment variables; sbatch passes the submitting shell's environment to the job):
#   NPROC_PER_NODE  ranks per node (default: the GPUs Slurm gave each node, SLURM_GPUS_ON_NODE)
#   MASTER_PORT     the rendezvous port on the first node (default: 20000 + job id mod 20000)
#   REPO            the recipe's checkout, the same path on every node (default: where sbatch was run)
#   VENV            the virtual environment to activate (default: REPO/.venv, if it exists)

slurm_refuse() {
  echo "error: $1" >&2
  exit 2
}

# The settings above, checked; exported so that every node's task sees them.
slurm_settings() {
  [ -n "${SLURM_JOB_ID:-}" ] || slurm_refuse "not inside a Slurm job: submit this script with sbatch"
  REPO=${REPO:-$SLURM_SUBMIT_DIR}
  [ -f "$REPO/pretrain.py" ] ||
    slurm_refuse "$REPO is not the recipe's checkout: run sbatch from the repository root (or set REPO=...)"
  VENV=${VENV:-$REPO/.venv}
  if [ -f "$VENV/bin/activate" ]; then
    # shellcheck disable=SC1091
    source "$VENV/bin/activate"
  fi
  command -v torchrun >/dev/null ||
    slurm_refuse "torchrun is not on PATH: install the recipe (make install) or name its venv with VENV=..."
  NPROC_PER_NODE=${NPROC_PER_NODE:-${SLURM_GPUS_ON_NODE:-0}}
  [[ "$NPROC_PER_NODE" =~ ^[1-9][0-9]*$ ]] ||
    slurm_refuse "no ranks per node: ask Slurm for GPUs (--gpus-per-node=N) or set NPROC_PER_NODE=N"
  MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
  MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
  export REPO NPROC_PER_NODE MASTER_ADDR MASTER_PORT
}

# Time limit near (SIGUSR1 from --signal=B:USR1@...): the ranks save and stop, then the job is requeued.
time_limit_near() {
  echo "slurm: the time limit is near: the ranks save a checkpoint and stop, then the job is requeued"
  requeue_after_save=1
  scancel --signal=TERM "$SLURM_JOB_ID"
}

run_on_nodes() {
  local script=$1 pid status
  shift
  slurm_settings
  cd "$REPO" || exit 2
  echo "slurm: job $SLURM_JOB_ID (start $((${SLURM_RESTART_COUNT:-0} + 1))): $SLURM_NNODES node(s) x $NPROC_PER_NODE ranks, rendezvous $MASTER_ADDR:$MASTER_PORT"
  requeue_after_save=0
  trap time_limit_near USR1
  # One task per node, with the node's CPUs; each node's torchrun starts its ranks (its rank among the
  # nodes: SLURM_NODEID, read in that task). A failed node ends the others' tasks (--kill-on-bad-exit).
  # In the background, so that this shell's trap runs when the signal comes rather than after srun ends.
  # shellcheck disable=SC2016 # (the single-quoted variables expand in each node's task)
  srun --ntasks-per-node=1 --cpus-per-task="${SLURM_CPUS_ON_NODE:-1}" --kill-on-bad-exit=1 bash -c '
    trap "" TERM
    exec torchrun --signals-to-handle SIGINT,SIGHUP,SIGQUIT --nnodes "$SLURM_NNODES" --node_rank "$SLURM_NODEID" \
      --nproc_per_node "$NPROC_PER_NODE" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" "$@"
  ' torchrun "$script" "$@" --auto_resume &
  pid=$!
  wait "$pid"
  status=$?
  while kill -0 "$pid" 2>/dev/null; do # the trap ended `wait` early: wait on for srun's own status
    wait "$pid"
    status=$?
  done
  if [ "$requeue_after_save" = 1 ] && [ "$status" = 0 ]; then
    echo "slurm: the ranks saved: requeueing job $SLURM_JOB_ID (it resumes with --auto_resume)"
    scontrol requeue "$SLURM_JOB_ID" # Slurm ends this shell here; the job starts again from the top
    status=$?
  fi
  exit "$status"
}
