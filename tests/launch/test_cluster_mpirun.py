"""A rank killed with SIGKILL under the bundled mpirun (no SLURM): the job fails fast with a message
that names the failure instead of hanging, and running the same command again resumes."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import MPIRUN, REPO, cli_env, hpc
from slurm_cluster import hard_timeout
from test_cluster_common import (
    as_set_args,
    assert_resumed_like_reference,
    assert_stopped_mid_distillation,
    long_overrides,
    long_reference,  # noqa: F401  (session fixture)
    wait_first_finished_block,
    wait_for,
)

from hpc_bkd.launch.mpich import unused_segments

pytestmark = pytest.mark.mpi


def _rank_pid(run: Path, rank: int) -> int | None:
    """pid of the python process of MPI rank `rank` running with run dir `run` (Hydra sets PMI_RANK)."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if str(run).encode() in argv and b"hpc_bkd" in argv and f"PMI_RANK={rank}".encode() in env \
                and Path(argv[0].decode()).name.startswith("python"):
            return int(pid)
    return None


def _remove_leaked_shm(before: set[str]) -> None:
    """MPICH unlinks its /dev/shm segment in MPI_Finalize only: remove the one the killed job left
    (new since `before` and mapped by no process), so repeated runs do not fill a small /dev/shm."""
    for p in unused_segments(ignore=before):
        p.unlink(missing_ok=True)


@hard_timeout(300)
def test_sigkilled_rank_fails_fast_and_the_rerun_resumes(tmp_path: Path, tiny_teacher: Path,
                                                         long_reference: Path):  # noqa: F811
    run = tmp_path / "run"
    args = ["distill", "-c", "tiny", "--run-dir", str(run), *as_set_args(long_overrides(tiny_teacher))]
    shm_before = {p.name for p in Path("/dev/shm").glob("mpich_*")} if Path("/dev/shm").is_dir() else set()
    proc = subprocess.Popen([str(MPIRUN), "-np", "2", sys.executable, "-m", "hpc_bkd", *args], cwd=REPO,
                            env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        wait_first_finished_block(run)
        victim = wait_for(lambda: _rank_pid(run, 1), 30, "rank 1's process")
        t0 = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        out, _ = proc.communicate(timeout=60)  # no hang: rank 0 must not wait for rank 1 forever
        took = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode != 0, out[-3000:]
    assert took < 30, f"the job took {took:.0f}s to fail"
    assert "BAD TERMINATION" in out and "signal 9" in out, out[-3000:]  # mpirun names the failure
    _remove_leaked_shm(shm_before)
    finished = assert_stopped_mid_distillation(run)

    rerun = hpc(*args, np=2, timeout=240)
    assert "resuming: " in rerun.stderr
    assert_resumed_like_reference(run, long_reference, finished)
