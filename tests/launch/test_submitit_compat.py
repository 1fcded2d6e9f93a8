"""submitit's private API, as hpc_bkd.launch.submitit_compat uses it, on the installed submitit.

These fail (with the submitit version in the message) when an upgrade of submitit renamed or changed
an internal the launcher relies on, instead of a cluster job failing at its first requeue.
"""
from __future__ import annotations

import re
import signal
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

submitit = pytest.importorskip("submitit")

from hpc_bkd.launch import submitit_compat as compat  # noqa: E402

VERSION = f"submitit {compat.submitit_version()} (hpc_bkd last checked {', '.join(compat.TESTED_VERSIONS)})"


def test_private_api_is_present():
    found = compat.problems()
    assert not found, f"{VERSION} changed internals hpc_bkd.launch uses; update submitit_compat.py:\n" + "\n".join(found)
    compat.check()  # the same, as the exception a caller would get


def test_check_names_the_version_when_something_is_missing(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(compat, "PRIVATE_API", (*compat.PRIVATE_API, ("submitit.core.utils", "no_such_helper")))
    with pytest.raises(compat.SubmititCompatError, match=rf"(?s)submitit {re.escape(compat.submitit_version())} .*no_such_helper"):
        compat.check()


def test_preempt_signal_is_a_signal_number(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("SUBMITIT_PREEMPT_SIGNAL", raising=False)
    sig = compat.preempt_signal()
    assert isinstance(sig, int) and signal.Signals(sig).name.startswith("SIG"), VERSION


class _Job:
    """A checkpointable callable like DistillJob: checkpoint() returns the resubmission."""

    def __init__(self, n: int = 0) -> None:
        self.n = n

    def __call__(self) -> int:
        return self.n

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        return submitit.helpers.DelayedSubmission(_Job(self.n + 1))


def _fake_env(tmp_path: Path, timeout_min: int, requeues_left: int, rank: int = 0) -> SimpleNamespace:
    """What SignalHandler reads of a JobEnvironment, with _requeue recorded instead of run."""
    from submitit.core.utils import DelayedSubmission

    pickle = tmp_path / "submitted.pkl"
    delayed = DelayedSubmission(_Job())
    delayed.set_timeout(timeout_min, requeues_left)
    delayed.dump(pickle)
    requeued: list[int] = []
    paths = SimpleNamespace(submitted_pickle=pickle, result_pickle=tmp_path / "result.pkl", folder=tmp_path)
    return SimpleNamespace(global_rank=rank, paths=paths, job_id="1", _requeue=requeued.append, requeued=requeued)


def test_checkpoint_and_requeue_requeues_without_exiting(tmp_path: Path):
    env = _fake_env(tmp_path, timeout_min=60, requeues_left=3)
    try:
        error = compat.checkpoint_and_requeue(env, signal.SIGUSR2, started=time.time())
    except SystemExit:  # pragma: no cover - the failure this guards against
        pytest.fail(f"{VERSION}: SignalHandler exited although _exit was overridden")
    assert error is None, f"{VERSION}: {error}"
    assert env.requeued == [3], f"{VERSION}: a preemption must not use up a timeout requeue"
    resubmitted = submitit.helpers.DelayedSubmission.load(env.paths.submitted_pickle)
    assert resubmitted.function.n == 1, f"{VERSION}: checkpoint()'s resubmission was not pickled"


def test_the_run_start_decides_timed_out(tmp_path: Path):
    """``started`` long ago (past the limit): a timeout, which counts against max_num_timeout."""
    env = _fake_env(tmp_path, timeout_min=60, requeues_left=3)
    assert compat.checkpoint_and_requeue(env, signal.SIGUSR2, started=time.time() - 3600) is None
    assert env.requeued == [2], f"{VERSION}: SignalHandler no longer reads the start time we set"


def test_too_many_timeouts_is_an_error_not_a_requeue(tmp_path: Path):
    env = _fake_env(tmp_path, timeout_min=60, requeues_left=0)
    error = compat.checkpoint_and_requeue(env, signal.SIGUSR2, started=time.time() - 3600)
    assert error is not None and "timed-out too many times" in error, f"{VERSION}: {error}"
    assert env.requeued == []


def test_a_task_error_round_trips_through_the_result_pickle(tmp_path: Path):
    env = SimpleNamespace(paths=SimpleNamespace(result_pickle=tmp_path / "0_result.pkl"))
    assert compat.task_error(env.paths) is None
    compat.save_task_error(env, "Traceback ...\nValueError: boom")
    assert compat.task_error(env.paths) == "Traceback ...\nValueError: boom"
    from submitit.core.utils import pickle_load

    assert pickle_load(env.paths.result_pickle) == ("error", "Traceback ...\nValueError: boom"), VERSION


def test_failed_job_error_is_submitits():
    from submitit.core.utils import FailedJobError

    err = compat.failed_job_error("task 1 failed")
    assert isinstance(err, FailedJobError) and str(err) == "task 1 failed"


def test_only_the_adapter_touches_submitit_internals():
    """One place to update when submitit changes: no other module imports submitit.core or pokes
    at private attributes of its objects."""
    package = Path(compat.__file__).resolve().parents[1]
    pattern = re.compile(r"^\s*(from|import)\s+submitit\.(core|local|slurm)|\._usr_sig\(|\._start_time\b|"
                         r"\._exit\s*=|\._requeue\(", re.M)
    offenders = [str(p.relative_to(package)) for p in sorted(package.rglob("*.py"))
                 if p.name != "submitit_compat.py" and pattern.search(p.read_text())]
    assert not offenders, f"submitit internals used outside hpc_bkd/launch/submitit_compat.py: {offenders}"
