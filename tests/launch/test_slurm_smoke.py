"""Smoke tests of the local SLURM (tests/cluster/local-slurm.sh) through the `slurm_cluster` fixture:
batch jobs, MPI ranks via srun + pmi2 + the venv's MPICH, and cancellation seen by sacct."""
import sys
import time

import pytest
from slurm_cluster import SlurmJobTimeout, hard_timeout

pytestmark = pytest.mark.slurm


@hard_timeout(60)
def test_sbatch_wrap_hostname(slurm_cluster):
    job = slurm_cluster.sbatch(None, "--wrap", "hostname")
    assert slurm_cluster.wait(job, timeout=30) == "COMPLETED", slurm_cluster.output(job)
    assert slurm_cluster.output(job).strip()


MPI_JOB = """#!/bin/bash
#SBATCH --ntasks={n}
#SBATCH --job-name=mpi-smoke
set -e
which python
srun python -c "
import sys
from mpi4py import MPI
c = MPI.COMM_WORLD
print(f'rank {{c.rank}} size {{c.size}} prefix {{sys.prefix}}', flush=True)
c.Barrier()
"
"""


@pytest.mark.parametrize("n", [2, 4])
@hard_timeout(90)
def test_srun_mpi4py_ranks(slurm_cluster, n):
    """srun (MpiDefault=pmi2) starts n mpi4py ranks from the venv's python + MPICH; n=4 runs on a
    2-core machine because the node declares >= 4 CPUs."""
    job = slurm_cluster.sbatch(MPI_JOB.format(n=n))
    state = slurm_cluster.wait(job, timeout=60)
    out = slurm_cluster.output(job)
    assert state == "COMPLETED", out
    lines = sorted(line for line in out.splitlines() if line.startswith("rank "))
    assert lines == sorted(f"rank {r} size {n} prefix {sys.prefix}" for r in range(n)), out


@hard_timeout(90)
def test_scancel_gives_cancelled_in_sacct(slurm_cluster):
    job = slurm_cluster.sbatch(None, "--wrap", "sleep 300")
    assert slurm_cluster.wait(job, timeout=30, until={"RUNNING"}) == "RUNNING"
    slurm_cluster.cancel(job)
    assert slurm_cluster.wait(job, timeout=30) == "CANCELLED"
    deadline = time.monotonic() + 30  # slurmctld reports to slurmdbd asynchronously
    while slurm_cluster.sacct_state(job) != "CANCELLED" and time.monotonic() < deadline:
        time.sleep(0.2)
    assert slurm_cluster.sacct_state(job) == "CANCELLED"


@hard_timeout(30)
def test_wait_timeout_cancels_and_reports(slurm_cluster):
    job = slurm_cluster.sbatch(None, "--wrap", "echo started; sleep 300")
    with pytest.raises(SlurmJobTimeout, match=f"job {job} timed out"):
        slurm_cluster.wait(job, timeout=3)
    assert slurm_cluster.wait(job, timeout=15) == "CANCELLED"
