# slurm/common.sh - the body of slurm/vgg.sbatch and slurm/resnet.sbatch (sourced; never submitted).
#
# One `srun` step runs `python -m hpc_bkd run` as nodes x ntasks-per-node MPI ranks. The time-limit
# warning (`--signal=B:USR1@...`, batch shell only) is forwarded to the ranks, which checkpoint
# every unfinished block and exit 3; the script then requeues the job (`scontrol requeue`). The job
# id, hence the run directory, survives the requeue, so the next run resumes where this one stopped.
# SIGTERM (scancel, preemption, `scontrol requeue` by hand) also makes the ranks save and exit, but
# the script does not requeue: SLURM decides (cancelled stays cancelled, preempted is requeued).
#
# Environment knobs (sbatch passes the submitting shell's environment by default):
#   HPC_BKD_CONFIG        config name or YAML path (default: the script's, e.g. vgg16-cifar10)
#   HPC_BKD_DATA          data.root: the folder holding cifar-10-batches-py/
#   HPC_BKD_EPOCHS        distill.epochs
#   HPC_BKD_RUN_DIR       run directory (default: $SLURM_SUBMIT_DIR/runs/<job name>-<job id>)
#   HPC_BKD_SET           more overrides, space separated: "finetune.epochs=0 distill.lr=0.002"
#   HPC_BKD_PYTHON        interpreter (default: $HPC_BKD_VENV/bin/python, else python3 on PATH)
#   HPC_BKD_VENV          virtual environment to use (default: the one active at submission)
#   HPC_BKD_MPI           srun --mpi plugin: pmi2 (bundled MPICH, default), pmix (Open MPI),
#                         "" = the cluster's MpiDefault
#   HPC_BKD_SRUN_ARGS     extra srun options, space separated
#   HPC_BKD_MAX_REQUEUES  stop requeueing after this many restarts (default 10)
#   HPC_BKD_SHM_CLEANUP   0 = skip the step that removes stale MPICH shared memory (see below)
# Arguments after the script name are appended to `hpc_bkd run` and win over all of the above:
#   sbatch slurm/vgg.sbatch --set distill.epochs=2 -c my.yaml

_bkd_log() { printf '[%(%H:%M:%S)T hpc_bkd.sbatch] %s\n' -1 "$*" >&2; }

# MPICH (ch4) keeps each node's shared memory in /dev/shm and removes it in MPI_Finalize only; a
# requeued job keeps its id and numbers its steps from 0 again, so a segment left by a killed step
# makes MPI_Init of the same step id fail or hang until the time limit. Before the main step and
# after it when it failed, one task per node removes what steps 0..next of this job id may have
# left (no live step of this job can own them: this one runs alone). The cleanup itself, and why,
# is hpc_bkd/launch/mpich.py (shared with the submitit backend).
_bkd_shm_step() {  # _bkd_shm_step PYTHON: run the cleanup once per node, in a step of its own
  [ "${HPC_BKD_SHM_CLEANUP:-1}" != 0 ] && [ -n "${SLURM_JOB_ID:-}" ] || return 0
  srun --ntasks-per-node=1 --ntasks="${SLURM_JOB_NUM_NODES:-1}" --mpi=none --cpus-per-task=1 \
    "$1" -m hpc_bkd.launch.mpich cleanup || _bkd_log "warning: /dev/shm cleanup step failed"
}

hpc_bkd_sbatch_main() {  # hpc_bkd_sbatch_main DEFAULT_CONFIG [hpc_bkd run arguments...]
  local default_config=$1; shift
  local py
  if [ -n "${HPC_BKD_PYTHON:-}" ]; then py=$HPC_BKD_PYTHON
  elif [ -n "${HPC_BKD_VENV:-${VIRTUAL_ENV:-}}" ]; then py=${HPC_BKD_VENV:-$VIRTUAL_ENV}/bin/python
  else py=$(command -v python3 || command -v python); fi
  if ! "$py" -c "import hpc_bkd, mpi4py" 2>/dev/null; then
    _bkd_log "ERROR: '$py' cannot import hpc_bkd and mpi4py; activate the venv before sbatch or set HPC_BKD_VENV"
    return 2
  fi

  local config=${HPC_BKD_CONFIG:-$default_config}
  local submit_dir=${SLURM_SUBMIT_DIR:-$PWD}
  # SLURM_JOB_ID is kept across requeues: the requeued job finds its own run directory again
  local run_dir=${HPC_BKD_RUN_DIR:-$submit_dir/runs/${SLURM_JOB_NAME:-hpc_bkd}-${SLURM_JOB_ID:-$$}}
  local -a args=(-m hpc_bkd run -c "$config" --run-dir "$run_dir")
  if [ -n "${SLURM_CPUS_PER_TASK:-}" ]; then  # threads per rank = CPUs per task
    args+=(--set "run.threads=$SLURM_CPUS_PER_TASK")
    export OMP_NUM_THREADS=$SLURM_CPUS_PER_TASK
  fi
  [ -n "${HPC_BKD_DATA:-}" ] && args+=(--set "data.root=$HPC_BKD_DATA")
  [ -n "${HPC_BKD_EPOCHS:-}" ] && args+=(--set "distill.epochs=$HPC_BKD_EPOCHS")
  local -a words
  read -r -a words <<<"${HPC_BKD_SET:-}"  # split on blanks, no glob expansion
  local s
  for s in "${words[@]}"; do args+=(--set "$s"); done
  args+=("$@")

  local -a srun_args=(--kill-on-bad-exit=1)
  local mpi=${HPC_BKD_MPI-pmi2}
  [ -n "$mpi" ] && srun_args+=("--mpi=$mpi")
  # since Slurm 22.05 srun no longer inherits --cpus-per-task from sbatch
  [ -n "${SLURM_CPUS_PER_TASK:-}" ] && srun_args+=("--cpus-per-task=$SLURM_CPUS_PER_TASK")
  read -r -a words <<<"${HPC_BKD_SRUN_ARGS:-}"
  srun_args+=("${words[@]}")

  export PYTHONUNBUFFERED=1
  local restarts=${SLURM_RESTART_COUNT:-0} max_requeues=${HPC_BKD_MAX_REQUEUES:-10}
  _bkd_log "job ${SLURM_JOB_ID:-?} (${SLURM_JOB_NAME:-?}) restart $restarts: ${SLURM_JOB_NUM_NODES:-1} node(s)" \
           "[${SLURM_JOB_NODELIST:-$(hostname)}] x ${SLURM_NTASKS_PER_NODE:-?} task(s), ${SLURM_NTASKS:-?} rank(s)," \
           "GPUs/task ${SLURM_GPUS_PER_TASK:-none}"
  _bkd_log "run dir $run_dir"
  _bkd_log "srun ${srun_args[*]} $py ${args[*]}"

  _bkd_shm_step "$py"  # segments a killed run of this job id left (requeue)

  _BKD_REQUEUE=0 _BKD_SRUN=
  # time limit near (--signal=B:USR1@...): ask the ranks to save, then requeue ourselves
  trap '_BKD_REQUEUE=1; _bkd_log "USR1: time limit near, ranks checkpoint and the job requeues";
        [ -n "$_BKD_SRUN" ] && kill -USR1 "$_BKD_SRUN" 2>/dev/null' USR1
  # scancel / preemption: the ranks got TERM from SLURM too; forward it anyway and wait for them
  trap '_bkd_log "TERM: ranks checkpoint and stop (no requeue by this script)";
        [ -n "$_BKD_SRUN" ] && kill -TERM "$_BKD_SRUN" 2>/dev/null' TERM
  srun "${srun_args[@]}" "$py" "${args[@]}" &
  _BKD_SRUN=$!
  # `wait` returns early when a trapped signal arrives: wait again until srun is gone; bash keeps
  # the status of a reaped child, so the last `wait` gives srun's own exit code
  while kill -0 "$_BKD_SRUN" 2>/dev/null; do wait "$_BKD_SRUN"; done
  local rc=0
  wait "$_BKD_SRUN" || rc=$?
  trap - USR1 TERM
  case $rc in 0|3) ;; *) _bkd_shm_step "$py" ;; esac  # a killed or aborted rank leaves its segment behind

  if [ "$rc" -eq 3 ] && [ "$_BKD_REQUEUE" = 1 ]; then
    if [ "$restarts" -ge "$max_requeues" ]; then
      _bkd_log "interrupted, but not requeued: $restarts restart(s) reached HPC_BKD_MAX_REQUEUES=$max_requeues;" \
               "resubmit with HPC_BKD_RUN_DIR=$run_dir to resume"
      return 3
    fi
    _bkd_log "checkpointed; requeueing job $SLURM_JOB_ID (restart $((restarts + 1)))"
    scontrol requeue "$SLURM_JOB_ID" && return 0
    _bkd_log "scontrol requeue failed; resubmit with HPC_BKD_RUN_DIR=$run_dir to resume"
    return 3
  fi
  case $rc in
    0) _bkd_log "done: $run_dir/report.json" ;;
    3) _bkd_log "interrupted; everything finished is saved: resubmit with HPC_BKD_RUN_DIR=$run_dir to resume" ;;
    *) _bkd_log "FAILED with exit code $rc (see the rank messages above); resubmitting with" \
                "HPC_BKD_RUN_DIR=$run_dir resumes from the saved blocks" ;;
  esac
  return "$rc"
}
