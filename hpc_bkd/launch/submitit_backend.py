"""submitit backend: one call submits a distillation job; every submitit task is one MPI rank.

MPI under submitit (and how it differs from mpirun)
    With ``mpirun -np N python -m hpc_bkd run`` the MPI launcher (MPICH's Hydra) starts the N
    processes itself and wires them together. Under SLURM, submitit's batch script runs
    ``srun --mpi=pmi2 ... python -m submitit.core._submit FOLDER``: srun starts
    ``nodes x tasks_per_node`` tasks and slurmd serves each its PMI rank and the address book, so
    mpi4py's ``MPI_Init`` (no mpirun anywhere) makes COMM_WORLD with one rank per task and
    ``rank == SLURM_PROCID == submitit's global_rank``. The plugin must match the MPI that mpi4py
    loads: ``pmi2`` for the bundled MPICH wheel (the default here), ``pmix`` for Open MPI, or
    ``mpi=None`` for the cluster's ``MpiDefault``. Every task unpickles and calls the same
    ``DistillJob``; task 0 (rank 0) returns the report, the others return None, so a multi-task
    job's report is ``job.task(0).result()`` or :func:`report` (``job.result()`` only works for one
    task). A failing rank aborts the whole MPI job (no rank is left waiting in a collective). A
    one-line step before the main one (and after it, if it failed) removes MPICH shared memory that
    a killed earlier run of the same job id left in /dev/shm (see :mod:`hpc_bkd.launch.mpich`).

    submitit's *local* executor forks its tasks itself, with no process manager: each task would be
    a separate one-rank MPI job training every block into the same run directory. So the local and
    debug executors run one rank only (``tasks_per_node > 1`` raises :class:`LaunchError`); for
    several ranks on one machine use ``mpirun -np N python -m hpc_bkd run``, or SLURM.

Stop, checkpoint, requeue (how our stop flag and submitit's requeue cooperate)
    submitit internals used here (its preemption signal, its requeue, its result pickle) are reached
    through :mod:`hpc_bkd.launch.submitit_compat` only, which checks they still exist.

    Before our code runs, submitit installs its own handlers in every task: the preemption signal
    (``SIGUSR2``, sent ``signal_delay_s`` before the time limit) calls ``checkpoint()`` and
    ``scontrol requeue`` on task 0 and exits at once; ``SIGTERM`` is ignored. Used as is, that exit
    happens inside the signal handler, i.e. in the middle of the training loop (the handler runs on
    the main thread, which *is* the loop): ``checkpoint()`` could not wait for the loop to save,
    saving from the handler could catch a block between ``optimizer.step()`` and its step counter,
    the work since the last periodic checkpoint would be lost, and the other ranks would keep
    training until SLURM killed them.

    So ``DistillJob.__call__`` replaces them while it runs: USR2, USR1, TERM and INT only call
    ``hpc_bkd.distributed.runtime.request_stop()`` and note the signal. The loop saves every unfinished block at
    its current step within one step, the ranks agree, and ``run_job`` raises ``Interrupted`` on all
    of them. Then:

    * the preemption signal (time limit) was received: task 0 runs submitit's own
      ``SignalHandler.checkpoint_and_try_requeue`` (``submitit_compat.checkpoint_and_requeue``),
      which calls ``checkpoint()`` (a resubmission of the same job, same run directory), counts the
      timeout against ``max_num_timeout`` and runs ``scontrol requeue`` (local executor: exit code
      144, its controller restarts the task). The other ranks wait for it, then all leave without a
      result; the requeued job resumes from the run directory and writes the result. Past
      ``max_requeues`` the job fails with submitit's "timed-out too many times" and a hint to
      resubmit.
    * only TERM/INT (``scancel``, preemption, ``scontrol requeue`` by hand): every rank exits with
      code 3 (``errors.EXIT_INTERRUPTED``) without a result and SLURM decides: a cancelled job
      stays cancelled (``job.result()`` raises; resubmitting with the same ``run_dir`` resumes), a
      requeued or preempted one runs the same pickle again and resumes.

    ``checkpoint()`` itself only calls ``request_stop()`` and returns the resubmission: when
    submitit calls it directly (a signal before ``__call__`` took over), no training has started.
"""
from __future__ import annotations

import logging
import math
import os
import shutil
import signal
import sys
import time
import traceback
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn

from hpc_bkd.errors import EXIT_FAILED, EXIT_INTERRUPTED
from hpc_bkd.launch import submitit_compat as compat

log = logging.getLogger("hpc_bkd")

EXECUTORS = ("auto", "slurm", "local", "debug")


def shm_cleanup_lines(python: str = sys.executable) -> tuple[list[str], list[str]]:
    """Batch-script lines (setup, teardown) that remove stale MPICH shared memory of this job id.

    Before the main step, because a requeued job keeps its id and its steps start from 0 again; after
    it only when it failed, because a killed rank leaves its segment behind; srun's status stays the
    job's. The same cleanup as ``slurm/common.sh``: :func:`hpc_bkd.launch.mpich.cleanup_job`.
    """
    from hpc_bkd.launch.mpich import srun_cleanup_command

    step = f"{srun_cleanup_command(python)} || echo 'hpc_bkd: /dev/shm cleanup failed' >&2"
    return [step], ["_bkd_rc=$?", f"[ $_bkd_rc -eq 0 ] || {step}", "exit $_bkd_rc"]


class LaunchError(RuntimeError):
    """A job cannot be launched as asked (or a launched job cannot form its MPI world)."""


# ------------------------------------------------------------------------------------ the job


class DistillJob:
    """The callable submitit runs in every task: one MPI rank of ``hpc_bkd run``.

    Checkpointable in submitit's sense (``__call__`` + ``checkpoint()``); picklable, small (a config
    name or path, overrides and an absolute run directory), so requeues resume from the same
    directory. Returns the report dict on rank 0 and None on the other ranks.
    """

    def __init__(self, config: str | None, overrides: Sequence[str], run_dir: str) -> None:
        self.config = config
        self.overrides = list(overrides)
        self.run_dir = str(run_dir)

    def __repr__(self) -> str:
        return f"DistillJob(config={self.config!r}, overrides={self.overrides!r}, run_dir={self.run_dir!r})"

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        """submitit's hook on preemption/timeout: ask the loop to stop, resubmit the same job."""
        from submitit.helpers import DelayedSubmission

        from hpc_bkd.distributed.runtime import request_stop

        request_stop()
        return DelayedSubmission(DistillJob(self.config, self.overrides, self.run_dir))

    def __call__(self) -> dict[str, Any] | None:
        import submitit
        from mpi4py import MPI

        from hpc_bkd.config import load_config
        from hpc_bkd.distributed import runtime
        from hpc_bkd.job.stages import Interrupted, run_rank

        started = time.time()
        env = submitit.JobEnvironment()
        comm = MPI.COMM_WORLD
        if comm.size != env.num_tasks or comm.rank != env.global_rank:
            raise LaunchError(
                f"submitit task {env.global_rank} of {env.num_tasks} ({env.cluster} executor) is MPI rank "
                f"{comm.rank} of {comm.size}: the tasks did not form one MPI world. Under SLURM, srun must "
                "give them PMI: --mpi=pmi2 for the bundled MPICH (hpc_bkd.launch.submit(mpi='pmi2')), "
                "--mpi=pmix for Open MPI. The local executor cannot run several ranks (use mpirun).")
        overrides = [*self.overrides, f"run.dir={self.run_dir}"]
        cpus = os.environ.get("SLURM_CPUS_PER_TASK")
        if cpus and not any(o.startswith("run.threads=") for o in self.overrides):
            overrides.insert(0, f"run.threads={cpus}")
        cfg = load_config(self.config, overrides)

        received: list[int] = []
        previous = runtime.current_stop_handlers()  # the debug executor runs in the caller's process
        try:
            record = run_rank(cfg, received=received)  # the same start as `hpc-bkd run`
            return record.to_json() if record is not None else None  # the report.json dict
        except Interrupted:
            self._after_interrupt(env, comm, received, started)
            raise  # not reached: _after_interrupt always raises
        except Exception:
            if comm.size > 1:  # never leave the other ranks in a collective: abort the MPI job
                _abort_with_result(env, comm)
            raise
        finally:
            runtime.restore_handlers(previous)

    def _after_interrupt(self, env: Any, comm: Any, received: list[int], started: float) -> None:
        """Everything is saved on every rank; requeue (time limit) or leave (SLURM decides)."""
        usr_sig = compat.preempt_signal()
        requeue = usr_sig in received
        if comm.size > 1:
            requeue = any(comm.allgather(requeue))
        names = ",".join(sorted({signal.Signals(s).name for s in received})) or "a stop request"
        if env.cluster not in ("slurm", "local"):  # debug executor: in-process, nothing to requeue
            raise LaunchError(f"interrupted by {names}; blocks saved under {self.run_dir}: submit the same "
                              "job again (same run_dir) to resume")
        if not requeue:
            if comm.rank == 0:
                log.warning("stopped by %s: blocks saved under %s; not requeueing from here (a cancelled "
                            "job stays cancelled; a preempted or requeued one resumes)", names, self.run_dir)
            raise SystemExit(EXIT_INTERRUPTED)
        error = None
        if env.global_rank == 0:
            # checkpoint() -> pickle the resubmission -> scontrol requeue (local: exit 144); timed out
            # or preempted is judged from this run's start; returns only, all ranks leave together
            error = compat.checkpoint_and_requeue(env, usr_sig, started)
        if comm.size > 1:
            error = comm.bcast(error, root=0)
        if error:
            raise LaunchError(f"{error} Blocks are saved under {self.run_dir}: submit the same job again "
                              "(same run_dir) to resume.")
        if comm.rank == 0:
            log.warning("%s: blocks saved; job %s requeued, it resumes from %s", names, env.job_id, self.run_dir)
        raise SystemExit(EXIT_INTERRUPTED)  # no result: the requeued job writes it


def _abort_with_result(env: Any, comm: Any) -> NoReturn:
    """Record this task's error where submitit looks for it, then end every rank of the job."""
    from hpc_bkd.distributed.runtime import abort_all

    trace = traceback.format_exc()
    print(f"hpc_bkd: [rank {comm.rank}/{comm.size}] error:\n{trace}hpc_bkd: aborting all {comm.size} ranks",
          file=sys.stderr, flush=True)
    try:
        compat.save_task_error(env, trace)
    finally:
        abort_all(comm, EXIT_FAILED)


# ------------------------------------------------------------------------------- submission


def _slurm_parameters(*, job_name: str, nodes: int, tasks_per_node: int, gpus_per_task: int,
                      cpus_per_task: int | None, partition: str | None, time_min: float, mpi: str | None,
                      signal_delay_s: int, setup: Sequence[str], sbatch: Mapping[str, Any] | None,
                      srun_args: Sequence[str], shm_cleanup: bool) -> dict[str, Any]:
    """``SlurmExecutor.update_parameters`` keywords for :func:`make_executor` (same meanings).

    Options left at "none" are left out rather than sent empty: a CPU-only partition rejects any
    GPU request, even of zero GPUs.
    """
    params: dict[str, Any] = {
        "job_name": job_name, "nodes": nodes, "ntasks_per_node": tasks_per_node,
        "time": max(1, math.ceil(time_min)), "signal_delay_s": signal_delay_s,
        "srun_args": [*([f"--mpi={mpi}"] if mpi else []), *srun_args],
        # scontrol requeue needs a requeueable job; keep one log across requeues
        "additional_parameters": {"requeue": True, **dict(sbatch or {})},
    }
    if partition:
        params["partition"] = partition
    if gpus_per_task:
        params["gpus_per_task"] = gpus_per_task
    if cpus_per_task:
        params["cpus_per_task"] = cpus_per_task
    before, after = shm_cleanup_lines() if shm_cleanup else ([], [])
    lines = [*setup, *before]
    if lines:
        params["setup"] = lines
    if after:
        params["teardown"] = after
    return params


def make_executor(executor: str = "auto", folder: str | os.PathLike = "submitit/%j", *, nodes: int = 1,
                  tasks_per_node: int = 1, gpus_per_task: int = 0, cpus_per_task: int | None = None,
                  partition: str | None = None, time_min: float = 60, job_name: str = "hpc_bkd",
                  mpi: str | None = "pmi2", max_requeues: int = 3, signal_delay_s: int = 120,
                  setup: Sequence[str] = (), sbatch: Mapping[str, Any] | None = None,
                  srun_args: Sequence[str] = (), shm_cleanup: bool = True) -> Any:
    """A configured submitit executor.

    executor: ``slurm``, ``local`` (subprocess on this machine, one rank), ``debug`` (in this
    process, one rank) or ``auto`` (slurm when ``sbatch`` is on PATH, else local).
    folder: submitit's folder for pickles and logs (``%j`` = job id); must be shared with the nodes.
    gpus_per_task: 0 = CPU only (no GPU request at all); >0 adds ``--gpus-per-task``.
    mpi: srun ``--mpi`` plugin (``pmi2`` bundled MPICH, ``pmix`` Open MPI, None = site default).
    max_requeues: how often a job may be requeued after its time limit (submitit's
    ``max_num_timeout``; preemptions do not count).
    signal_delay_s: the preemption signal comes this long before the time limit.
    sbatch: extra ``#SBATCH`` options, e.g. ``{"account": "proj", "qos": "high"}``.
    setup: shell lines run in the batch script before srun (``module load ...``).
    shm_cleanup: run the short step that removes stale MPICH shared memory of this job id before
    and after the main step (see :func:`shm_cleanup_lines`; needed for requeues with MPICH).
    """
    import submitit

    if executor == "auto":
        executor = "slurm" if shutil.which("sbatch") else "local"
    if executor not in EXECUTORS:
        raise LaunchError(f"unknown executor {executor!r}; choose one of {', '.join(EXECUTORS)}")
    if min(nodes, tasks_per_node) < 1 or gpus_per_task < 0 or time_min <= 0:
        raise LaunchError("nodes and tasks_per_node must be >= 1, gpus_per_task >= 0, time_min > 0")
    if executor == "slurm":
        ex: Any = submitit.SlurmExecutor(folder=str(folder), max_num_timeout=max_requeues)
        ex.update_parameters(**_slurm_parameters(
            job_name=job_name, nodes=nodes, tasks_per_node=tasks_per_node, gpus_per_task=gpus_per_task,
            cpus_per_task=cpus_per_task, partition=partition, time_min=time_min, mpi=mpi,
            signal_delay_s=signal_delay_s, setup=setup, sbatch=sbatch, srun_args=srun_args, shm_cleanup=shm_cleanup))
        return ex
    if nodes != 1 or tasks_per_node != 1:
        raise LaunchError(
            f"the {executor} executor cannot run {nodes * tasks_per_node} MPI ranks: it starts its tasks "
            "without a process manager, so each would be a separate 1-rank MPI job. Use tasks_per_node=1 "
            "here, `mpirun -np N python -m hpc_bkd run ...` for several ranks on this machine, or "
            "executor='slurm' (srun gives the tasks one MPI world).")
    if executor == "debug":
        return submitit.DebugExecutor(folder=str(folder))
    ex = submitit.LocalExecutor(folder=str(folder), max_num_timeout=max_requeues)
    ex.update_parameters(timeout_min=time_min, nodes=1, tasks_per_node=1, gpus_per_node=gpus_per_task,
                         signal_delay_s=signal_delay_s, **({"setup": list(setup)} if setup else {}))
    return ex


def submit(config: str | None = None, overrides: Sequence[str] = (), *, run_dir: str | os.PathLike | None = None,
           executor: Any = "auto", folder: str | os.PathLike = "submitit/%j", **resources: Any) -> Any:
    """Submit one distillation job and return the submitit job (see the module docstring).

    config: shipped config name or YAML path; overrides: ``section.key=value`` strings; run_dir:
    the run directory (default: the config's ``run.dir``), made absolute here so that every task
    and every requeue use the same one. The config is validated before anything is queued.
    executor: a name for :func:`make_executor` (then ``resources`` are its keyword arguments:
    nodes, tasks_per_node, gpus_per_task, cpus_per_task, partition, time_min, mpi, ...) or a
    ready submitit executor. Wait for the result with :func:`report`.
    """
    from hpc_bkd.config import load_config

    overrides = [str(o) for o in overrides]
    cfg = load_config(config, [*overrides, *([f"run.dir={run_dir}"] if run_dir is not None else [])])
    run_dir = os.path.abspath(cfg.run.dir)
    if config is not None and Path(config).is_file():
        config = os.path.abspath(config)
    ex = make_executor(executor, folder, **resources) if isinstance(executor, str) else executor
    if resources and not isinstance(executor, str):
        raise LaunchError(f"resources {sorted(resources)} given with a ready executor: set them on it instead")
    return ex.submit(DistillJob(config, overrides, run_dir))


def report(job: Any, timeout_s: float | None = None, poll_s: float = 1.0) -> dict[str, Any]:
    """Wait for ``job`` and return rank 0's report (``job.task(0).result()``).

    Raises TimeoutError after ``timeout_s`` (the job keeps running), and on failure the most
    telling error: the traceback of the task that failed, not the "no output" of the ranks that
    the failure aborted.
    """
    if timeout_s is not None:
        deadline = time.monotonic() + timeout_s
        while not job.done():
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job.job_id} not done after {timeout_s:.0f}s (state {job.state})")
            time.sleep(poll_s)
    try:
        return job.results()[0]
    except Exception:
        for k in range(job.num_tasks):
            trace = compat.task_error(job.task(k).paths)
            if trace is not None:
                raise compat.failed_job_error(f"job {job.job_id} task {k} failed:\n{trace}\n"
                                              f"logs: {job.task(k).paths.stderr}") from None
        raise
