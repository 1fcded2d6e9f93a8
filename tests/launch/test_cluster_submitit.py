"""The submitit path (hpc_bkd.launch): a 2-task SLURM job is one MPI world and returns the report;
time-limit signal and `scontrol requeue` both checkpoint, requeue and resume to the reference
blocks; the local executor runs one rank and refuses more."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import submitit
from slurm_cluster import hard_timeout
from test_cluster_common import (
    assert_resumed_like_reference,
    assert_stopped_mid_distillation,
    finished_blocks,
    long_overrides,
    long_reference,  # noqa: F401  (session fixture)
    mpich_shm_segments,
    release,
    restarts,
    wait_first_finished_block,
    wait_for,
    wait_requeued,
)

from hpc_bkd import launch

_FOREIGN = ("SLURM_", "SBATCH_", "SRUN_", "SALLOC_", "PMI_", "PMIX_", "HYDRA_", "OMPI_")


@pytest.fixture
def cluster_env(slurm_cluster, monkeypatch):
    """This process's environment as the cluster fixture's (submitit runs sbatch/sacct from here)."""
    for key in [k for k in os.environ if k.startswith(_FOREIGN)]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("PATH", slurm_cluster.env["PATH"])
    return slurm_cluster


def test_local_executor_refuses_several_ranks(tmp_path: Path):
    with pytest.raises(launch.LaunchError, match="mpirun -np N"):
        launch.submit("tiny", executor="local", tasks_per_node=2, folder=tmp_path / "%j")
    with pytest.raises(launch.LaunchError, match="1-rank MPI job"):
        launch.make_executor("debug", tmp_path / "%j", nodes=2)
    assert not list(tmp_path.glob("*/*.pkl")), "something was submitted"


@hard_timeout(240)
def test_local_executor_runs_one_rank(tmp_path: Path, tiny_teacher: Path):
    run = tmp_path / "run"
    job = launch.submit("tiny", [f"teacher.checkpoint={tiny_teacher}", "finetune.epochs=0", "run.threads=1"],
                        run_dir=run, executor="local", folder=tmp_path / "submitit" / "%j", time_min=10)
    report = launch.report(job, timeout_s=200)
    assert report["status"] == "completed" and report["world_size"] == 1
    assert report == json.loads((run / "report.json").read_text())


@pytest.mark.slurm
@hard_timeout(300)
def test_cli_submits_a_two_task_job_and_waits_for_its_report(slurm_cluster, tmp_path: Path, tiny_teacher: Path):
    run, folder = tmp_path / "run", tmp_path / "submitit" / "%j"
    proc = subprocess.run(
        [sys.executable, "-m", "hpc_bkd.launch", "submit", "-c", "tiny", "--set", f"teacher.checkpoint={tiny_teacher}",
         "--set", "run.threads=1",
         "--nodes", "1", "--tasks-per-node", "2", "--partition", slurm_cluster.partition, "--time", "10",
         "--folder", str(folder), "--run-dir", str(run), "--wait", "--timeout", "240"],
        capture_output=True, text=True, timeout=280, env=slurm_cluster.env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "submitted job" in proc.stdout and f"run dir  {run}" in proc.stdout
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["status"] == "completed" and summary["world_size"] == 2 and summary["run_dir"] == str(run)
    job_id = summary["job_id"]
    # every task was one rank of one MPI world, started by srun with PMI-2
    script = (tmp_path / "submitit" / job_id / f"{job_id}_submission.sh").read_text()
    assert "--mpi=pmi2" in script and "#SBATCH --requeue" in script and "#SBATCH --ntasks-per-node=2" in script
    job = submitit.SlurmJob(folder=folder, job_id=job_id, tasks=(0, 1))
    assert job.task(0).result() == json.loads((run / "report.json").read_text())
    assert job.task(1).result() is None  # rank 1 of the same world
    assert launch.report(job) == job.task(0).result()


@pytest.mark.slurm
@hard_timeout(420)
def test_job_survives_time_limit_signal_and_scontrol_requeue(cluster_env, tmp_path: Path, tiny_teacher: Path,
                                                              long_reference: Path):  # noqa: F811
    """1st stop: submitit's time-limit signal (USR2): the ranks save, task 0 runs submitit's
    checkpoint() + requeue. 2nd stop: `scontrol requeue` (SIGTERM): the ranks save and leave, SLURM
    requeues. The third run finishes; no finished block is ever retrained; blocks = reference."""
    cluster, run = cluster_env, tmp_path / "run"
    job = launch.submit("tiny", long_overrides(tiny_teacher), run_dir=run, executor="slurm",
                        folder=tmp_path / "submitit" / "%j", nodes=1, tasks_per_node=2,
                        partition=cluster.partition, time_min=10, max_requeues=3)
    assert job.num_tasks == 2
    wait_first_finished_block(run)
    job._interrupt(timeout=True)  # scancel --signal USR2: what SLURM sends signal_delay_s before the limit
    wait_requeued(cluster, job.job_id)
    first = assert_stopped_mid_distillation(run)
    release(cluster, job.job_id)

    wait_for(lambda: len(finished_blocks(run)) > len(first), 180, "a block finished after the first requeue")
    cluster.run("scontrol", "requeue", job.job_id)
    wait_requeued(cluster, job.job_id)
    second = assert_stopped_mid_distillation(run)
    assert all(second[name] == first[name] for name in first), "a finished block was retrained"
    release(cluster, job.job_id)

    report = launch.report(job, timeout_s=240)
    assert report["world_size"] == 2 and report["status"] == "completed"
    assert report == json.loads((run / "report.json").read_text())
    assert_resumed_like_reference(run, long_reference, second)
    assert restarts(cluster, job.job_id) == 2
    err = job.task(0).stderr() or ""
    assert f"SIGUSR2: blocks saved; job {job.job_id} requeued" in err
    assert "stopped by SIGTERM" in err and "not requeueing from here" in err
    assert "Calling checkpoint method." in (job.task(0).stdout() or "")


@pytest.mark.slurm
@hard_timeout(180)
def test_a_failing_rank_aborts_the_job_with_its_traceback(cluster_env, tmp_path: Path):
    """Rank 0 fails (missing teacher) while rank 1 waits in a collective: the job ends at once and
    report() raises the failing task's traceback, not the aborted rank's "no output"."""
    job = launch.submit("tiny", [f"teacher.checkpoint={tmp_path}/missing.pt", "run.threads=1"],
                        run_dir=tmp_path / "run", executor="slurm", folder=tmp_path / "submitit" / "%j",
                        tasks_per_node=2, partition=cluster_env.partition, time_min=5)
    with pytest.raises(submitit.core.utils.FailedJobError, match="missing.pt' does not exist"):
        launch.report(job, timeout_s=120)
    assert cluster_env.wait(job.job_id, timeout=30) == "FAILED"  # srun's status, despite the teardown
    assert "aborting all 2 ranks" in (job.task(0).stderr() or "")
    assert not mpich_shm_segments(job.job_id), "the aborted ranks' shared memory was left in /dev/shm"
