"""Plain ``srun`` (no ``--kill-on-bad-exit``, SLURM's default) on the local SLURM: a rank SIGKILLed
mid-distillation used to leave the other waiting until the time limit; now the survivor names the
lost rank and host within ``run.peer_timeout_s``, saves, and the job fails; a resubmission resumes
without retraining a finished block and ends with an uninterrupted run's blocks."""
from __future__ import annotations

import os
import signal
import socket
import sys
import time
from pathlib import Path

import pytest
from slurm_cluster import hard_timeout
from test_cluster_common import (
    as_set_args,
    assert_resumed_like_reference,
    finished_blocks,
    long_overrides,
    long_reference,  # noqa: F401  (session fixture)
    wait_first_finished_block,
    wait_for,
)

pytestmark = pytest.mark.slurm

TIMEOUT_S = 5


def _task_pid(task: int, run: Path) -> int | None:
    """The pid of srun task ``task`` (SLURM_PROCID) of the job writing ``run``."""
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and str(run).encode() in (entry / "cmdline").read_bytes() \
                    and f"SLURM_PROCID={task}".encode() in (entry / "environ").read_bytes().split(b"\0") \
                    and b"hpc_bkd" in (entry / "cmdline").read_bytes():
                return int(entry.name)
        except OSError:
            continue
    return None


@hard_timeout(300)
def test_plain_srun_ends_when_a_rank_dies_and_resubmission_resumes(slurm_cluster, tmp_path: Path, tiny_teacher: Path,
                                                                   long_reference: Path):  # noqa: F811
    run = tmp_path / "run"
    overrides = [*long_overrides(tiny_teacher), f"run.peer_timeout_s={TIMEOUT_S}"]
    command = (f"srun --kill-on-bad-exit=0 {sys.executable} -m hpc_bkd distill -c tiny --run-dir {run} "
               + " ".join(as_set_args(overrides)))
    job = slurm_cluster.sbatch(None, "-n", "2", "--wrap", command)
    wait_first_finished_block(run)
    pid = wait_for(lambda: _task_pid(1, run), 30, "rank 1's process")
    os.kill(pid, signal.SIGKILL)
    killed_at = time.monotonic()
    state = slurm_cluster.wait(job, timeout=TIMEOUT_S + 60)
    took = time.monotonic() - killed_at
    out = slurm_cluster.output(job)
    assert state == "FAILED", out[-3000:]
    assert took < TIMEOUT_S + 30, (took, out[-3000:])
    assert f"lost rank 1 on host {socket.gethostname()}" in out and "exit code 4" in out, out[-3000:]
    print(f"plain srun: rank 1 SIGKILLed, job ended {took:.1f}s later (run.peer_timeout_s={TIMEOUT_S})")

    finished = finished_blocks(run)
    again = slurm_cluster.sbatch(None, "-n", "2", "--wrap", command)
    assert slurm_cluster.wait(again, timeout=180) == "COMPLETED", slurm_cluster.output(again)[-3000:]
    assert f"resuming: {len(finished)} unit(s) already finished" in slurm_cluster.output(again)
    assert_resumed_like_reference(run, long_reference, finished)
