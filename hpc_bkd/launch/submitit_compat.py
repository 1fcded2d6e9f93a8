"""Every use of submitit's private API, in one place, with a check that it is still there.

Why private API at all
    submitit's public surface submits jobs and returns results, but our ranks must (a) know which
    signal submitit treats as "preemption/time limit" (``JobEnvironment._usr_sig``), (b) requeue a
    job only *after* the training loop has saved, not inside the signal handler, which means
    running submitit's own ``SignalHandler.checkpoint_and_try_requeue`` late with its start time and
    exit overridden, and (c) record a rank's traceback in the task's result pickle before
    ``MPI_Abort`` kills the process (submitit would write it on the way out, which never comes).
    Re-implementing those would copy more of submitit than borrowing them does.

Every private name the backend relies on is listed in :data:`PRIVATE_API` and verified by
:func:`problems`; ``tests/launch/test_submitit_compat.py`` runs it and the real requeue code against a
fake job, so an upgrade of submitit that changes these internals fails there, by name, instead
of in a cluster job hours later. :data:`TESTED_VERSIONS` are those this was last checked with.
"""
from __future__ import annotations

import inspect
import time
from typing import Any

TESTED_VERSIONS = ("1.5.4",)

# (module, attribute path): what we touch, for the version check and for a reader
PRIVATE_API = (
    ("submitit.core.job_environment", "JobEnvironment._usr_sig"),
    ("submitit.core.job_environment", "JobEnvironment._requeue"),
    ("submitit.core.job_environment", "SignalHandler.checkpoint_and_try_requeue"),
    ("submitit.core.job_environment", "SignalHandler._exit"),
    ("submitit.core.utils", "DelayedSubmission.load"),
    ("submitit.core.utils", "UncompletedJobError"),
    ("submitit.core.utils", "FailedJobError"),
    ("submitit.core.utils", "pickle_load"),
    ("submitit.core.utils", "cloudpickle_dump"),
    ("submitit.core.utils", "temporary_save_path"),
    ("submitit.core.utils", "JobPaths.submitted_pickle"),
    ("submitit.core.utils", "JobPaths.result_pickle"),
)


class SubmititCompatError(RuntimeError):
    """The installed submitit lacks (or changed) internals that hpc_bkd.launch relies on."""


def submitit_version() -> str:
    """The installed submitit's version string ("not installed" when it is missing)."""
    try:
        import submitit
    except ImportError:
        return "not installed"
    return str(getattr(submitit, "__version__", "unknown"))


def _resolve(module: str, path: str) -> Any:
    import importlib

    obj: Any = importlib.import_module(module)
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def problems() -> list[str]:
    """What is missing or changed in the installed submitit; empty when the backend can use it.

    Beyond presence, checks the two attributes we overwrite on a ``SignalHandler`` are the ones its
    requeue reads: renaming ``_start_time`` would silently make every requeue count as "timed out"
    or not, and renaming ``_exit`` would exit inside the handler before the other ranks know.
    """
    found = []
    for module, path in PRIVATE_API:
        try:
            _resolve(module, path)
        except (ImportError, AttributeError) as exc:
            found.append(f"{module}.{path}: {exc}")
    if found:
        return found
    from submitit.core.job_environment import SignalHandler

    for method, needle in (("has_timed_out", "self._start_time"), ("checkpoint_and_try_requeue", "self._exit()"),
                           ("__init__", "self._start_time")):
        try:
            source = inspect.getsource(getattr(SignalHandler, method))
        except (OSError, TypeError, AttributeError) as exc:
            found.append(f"SignalHandler.{method}: source unavailable ({exc})")
            continue
        if needle not in source:
            found.append(f"SignalHandler.{method} no longer uses {needle}")
    return found


def check() -> None:
    """Raise :class:`SubmititCompatError` naming the submitit version and what changed, if anything."""
    found = problems()
    if found:
        raise SubmititCompatError(
            f"submitit {submitit_version()} changed internals that hpc_bkd.launch uses (last checked with "
            f"{', '.join(TESTED_VERSIONS)}); update hpc_bkd/launch/submitit_compat.py:\n  " + "\n  ".join(found))


def preempt_signal() -> int:
    """submitit's preemption/timeout signal (SIGUSR2 unless SUBMITIT_PREEMPT_SIGNAL says otherwise)."""
    from submitit.core.job_environment import JobEnvironment

    return int(JobEnvironment._usr_sig())


def checkpoint_and_requeue(env: Any, signum: int, started: float | None = None) -> str | None:
    """On task 0: submitit's checkpoint-and-requeue, run now rather than from its signal handler.

    ``checkpoint()`` of the submitted callable makes the resubmission, submitit pickles it, counts a
    timeout against ``max_num_timeout`` and requeues (``scontrol requeue``; local executor: exit
    code 144 from its controller). Does not exit (the caller leaves once every rank knows the
    outcome). ``started`` (default now) is when this run began, from which submitit tells "timed
    out" from "preempted". Returns None when requeued, else submitit's reason why not.
    """
    from submitit.core.job_environment import SignalHandler
    from submitit.core.utils import DelayedSubmission, UncompletedJobError

    delayed = DelayedSubmission.load(env.paths.submitted_pickle)
    handler = SignalHandler(env, env.paths, delayed)
    handler._start_time = time.time() if started is None else started
    handler._exit = lambda: None  # type: ignore[method-assign]
    try:
        handler.checkpoint_and_try_requeue(signum)
    except UncompletedJobError as exc:
        return str(exc)
    return None


def save_task_error(env: Any, trace: str) -> None:
    """Record ``trace`` as this task's failure where ``job.result()`` looks for it.

    Written before MPI_Abort, which kills the process before submitit could write it itself.
    """
    from submitit.core import utils

    with utils.temporary_save_path(env.paths.result_pickle) as tmp:
        utils.cloudpickle_dump(("error", trace), tmp)


def task_error(paths: Any) -> str | None:
    """The traceback a task recorded in its result pickle (``paths``: its JobPaths), or None."""
    from submitit.core.utils import pickle_load

    if not paths.result_pickle.exists():
        return None
    outcome, payload = pickle_load(paths.result_pickle)
    return str(payload) if outcome == "error" else None


def failed_job_error(message: str) -> Exception:
    """submitit's own FailedJobError, so that callers catching it keep working."""
    from submitit.core.utils import FailedJobError

    return FailedJobError(message)
