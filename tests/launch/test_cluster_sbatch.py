"""slurm/vgg.sbatch and slurm/resnet.sbatch on the local SLURM, CPU only, with the tiny config:
they complete with their default log and run directory names; the time-limit warning makes the
ranks checkpoint and the script requeue itself; scancel saves too, and a resubmission with the same
run directory resumes; the final blocks equal an uninterrupted run's."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from slurm_cluster import hard_timeout
from test_cluster_common import (
    REPO,
    assert_resumed_like_reference,
    assert_stopped_mid_distillation,
    finished_blocks,
    long_overrides,
    long_reference,  # noqa: F401  (session fixture)
    release,
    restarts,
    stepd_alive,
    wait_first_finished_block,
    wait_for,
    wait_requeued,
)

pytestmark = pytest.mark.slurm

# the overrides a CPU-only cluster needs: no GPU request, 2 ranks of 1 CPU (the node declares 4)
CPU_ONLY = ["--nodes=1", "--ntasks-per-node=2", "--gpus-per-task=0", "--cpus-per-task=1"]


@hard_timeout(300)
def test_vgg_and_resnet_sbatch_complete_with_tiny_config(slurm_cluster, tmp_path: Path, tiny_teacher: Path):
    env = {"HPC_BKD_CONFIG": "tiny", "HPC_BKD_SET": f"teacher.checkpoint={tiny_teacher}",
           "HPC_BKD_PYTHON": sys.executable}
    jobs = {}
    for script, name in (("vgg.sbatch", "bkd-vgg16"), ("resnet.sbatch", "bkd-resnet50")):
        # --output as the script's own default (%x-%j.out) but spelled out for the fixture's log reader
        jobs[name] = slurm_cluster.sbatch(REPO / "slurm" / script, *CPU_ONLY, f"--output={name}-%j.out",
                                          "--time=5", env=env, cwd=tmp_path)
    for name, job in jobs.items():  # both run at once: 4 ranks on the 4 declared CPUs
        state = slurm_cluster.wait(job, timeout=240)
        log = slurm_cluster.output(job)
        assert state == "COMPLETED", log[-4000:]
        run = tmp_path / "runs" / f"{name}-{job}"  # the default run dir, next to the log
        assert f"run dir {run}" in log and "--mpi=pmi2" in log and "[rank 0/2]" in log
        assert f"done: {run}/report.json" in log
        report = json.loads((run / "report.json").read_text())
        assert report["status"] == "completed" and report["world_size"] == 2
        assert (run / "student.pt").is_file() and (tmp_path / f"{name}-{job}.out").is_file()


@hard_timeout(420)
def test_time_limit_requeue_then_scancel_and_resubmit_resume(slurm_cluster, tmp_path: Path, tiny_teacher: Path,
                                                             long_reference: Path):  # noqa: F811
    """1st stop: `--signal=B:USR1@...` (sent by hand here): the script forwards it, the ranks save
    and exit 3, the script requeues the job, which resumes (same id, same run dir). 2nd stop:
    `scancel` (SIGTERM): the ranks save, the job ends CANCELLED; a new job given the same run dir
    resumes and finishes. No finished block is ever retrained; the blocks equal the reference."""
    run = tmp_path / "run"
    env = {"HPC_BKD_CONFIG": "tiny", "HPC_BKD_RUN_DIR": str(run), "HPC_BKD_PYTHON": sys.executable,
           "HPC_BKD_SET": " ".join(long_overrides(tiny_teacher))}
    opts = [*CPU_ONLY, "--output=bkd-vgg16-%j.out", "--time=5"]
    job = slurm_cluster.sbatch(REPO / "slurm" / "vgg.sbatch", *opts, env=env, cwd=tmp_path)
    wait_first_finished_block(run)
    slurm_cluster.cancel(job, "--signal=USR1", "--batch")  # what SLURM sends 180 s before the limit
    wait_requeued(slurm_cluster, job)
    first = assert_stopped_mid_distillation(run)
    release(slurm_cluster, job)

    wait_for(lambda: len(finished_blocks(run)) > len(first), 180, "a block finished after the requeue")
    slurm_cluster.cancel(job)
    assert slurm_cluster.wait(job, timeout=60) == "CANCELLED"
    wait_for(lambda: not stepd_alive(job), 60, f"job {job} to end")
    second = assert_stopped_mid_distillation(run)
    assert all(second[name] == first[name] for name in first), "a finished block was retrained"
    log = slurm_cluster.output(job)
    assert "USR1: time limit near" in log and f"requeueing job {job} (restart 1)" in log
    assert "restart 1:" in log and "resuming: " in log and restarts(slurm_cluster, job) == 1
    assert "TERM: ranks checkpoint and stop (no requeue" in log and f"HPC_BKD_RUN_DIR={run} to resume" in log

    again = slurm_cluster.sbatch(REPO / "slurm" / "vgg.sbatch", *opts, env=env, cwd=tmp_path)
    state = slurm_cluster.wait(again, timeout=240)
    assert state == "COMPLETED", slurm_cluster.output(again)[-4000:]
    assert "resuming: " in slurm_cluster.output(again)
    assert_resumed_like_reference(run, long_reference, second)


def test_sbatch_scripts_parse_and_document_their_knobs():
    common = (REPO / "slurm" / "common.sh").read_text()
    for script in ("vgg.sbatch", "resnet.sbatch"):
        text = (REPO / "slurm" / script).read_text()
        for directive in ("--gpus-per-task=1", "--signal=B:USR1@", "--requeue", "--time=", "--output=%x-%j.out",
                          "--open-mode=append"):
            assert f"#SBATCH {directive}" in text, (script, directive)
        assert "hpc_bkd_sbatch_main" in text
    for knob in ("HPC_BKD_CONFIG", "HPC_BKD_DATA", "HPC_BKD_EPOCHS", "HPC_BKD_RUN_DIR", "HPC_BKD_SET", "HPC_BKD_MPI"):
        assert knob in common
    for f in ("common.sh", "vgg.sbatch", "resnet.sbatch"):
        subprocess.run(["bash", "-n", str(REPO / "slurm" / f)], check=True)
