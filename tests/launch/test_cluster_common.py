"""Shared pieces of the cluster tests (test_cluster_*.py); holds no tests itself.

A "long" tiny job (10 epochs, sequential schedule, pure block split, one thread, a shared teacher,
no fine-tuning) lasts long enough to be stopped mid-distillation and trains bit-identical blocks on
any number of ranks, so a stopped-and-resumed run can be compared block by block with one
uninterrupted reference run, computed once per session.
"""
from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import pytest
import torch
from conftest import hpc

from hpc_bkd.launch.mpich import step_segments
from hpc_bkd.store import atomic_io

REPO = Path(__file__).resolve().parents[2]
N_BLOCKS = 8  # the tiny config's VGG11


def long_overrides(teacher: Path) -> list[str]:
    return [f"teacher.checkpoint={teacher}", "run.threads=1", "distill.epochs=10", "distill.schedule=sequential",
            "distill.checkpoint_interval_s=0.5", "plan.hybrid=false", "finetune.epochs=0"]


def as_set_args(overrides: list[str]) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


@pytest.fixture(scope="session")
def long_reference(tmp_path_factory, tiny_teacher: Path) -> Path:
    """Run directory of one uninterrupted single-rank run of the long job (computed once)."""
    run = tmp_path_factory.getbasetemp() / "cluster-long-reference"
    if not (run / "report.json").is_file():
        hpc("distill", "-c", "tiny", "--run-dir", str(run), *as_set_args(long_overrides(tiny_teacher)), timeout=300)
    return run


def wait_for(predicate, timeout: float, what: str, poll: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def finished_blocks(run: Path) -> dict[str, tuple[int, bytes]]:
    """block-NNN-CANDIDATE.pt name -> (mtime_ns, bytes) of every finished unit (partials end in l.pt)."""
    return {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted((run / "blocks").glob("block-???-*[0-9].pt"))}


def wait_first_finished_block(run: Path, timeout: float = 120) -> None:
    wait_for(lambda: list((run / "blocks").glob("block-???-*[0-9].pt")) if (run / "blocks").is_dir() else [],
             timeout, f"a finished block under {run}")


def assert_stopped_mid_distillation(run: Path) -> dict[str, tuple[int, bytes]]:
    """After a stop: some blocks finished, the others checkpointed; returns the finished ones."""
    finished = finished_blocks(run)
    partial = sorted(p.name for p in (run / "blocks").glob("*.partial.pt"))
    assert finished, "stopped before any block finished"
    assert len(finished) < N_BLOCKS and partial, f"not stopped mid-distillation: {sorted(finished)} {partial}"
    assert not (run / "report.json").exists()
    return finished


def assert_resumed_like_reference(run: Path, reference: Path, finished_before: dict[str, tuple[int, bytes]]) -> dict:
    """The resumed run retrained no finished block and ended with the reference's blocks."""
    for name, (mtime, data) in finished_before.items():  # never retrained, never rewritten
        p = run / "blocks" / name
        assert p.stat().st_mtime_ns == mtime and p.read_bytes() == data, f"{name} was rewritten"
    report = json.loads((run / "report.json").read_text())
    by_index = {b["index"]: b for b in report["blocks"]}
    assert sorted(by_index) == list(range(N_BLOCKS))
    for name in finished_before:
        assert by_index[int(name[6:9])]["resumed_finished"], f"{name} not reported as resumed_finished"
    assert any(b["resumed"] and not b["resumed_finished"] for b in report["blocks"]), "no block continued"
    assert not list((run / "blocks").glob("*.partial.pt"))
    for i in range(N_BLOCKS):
        a = atomic_io.load(reference / "blocks" / f"block-{i:03d}-separable-d1.pt")
        b = atomic_io.load(run / "blocks" / f"block-{i:03d}-separable-d1.pt")
        assert a["fingerprint"] == b["fingerprint"]
        sa, sb = a["state_dict"], b["state_dict"]
        assert sa.keys() == sb.keys()
        for k in sa:
            assert torch.allclose(sa[k].float(), sb[k].float()), f"block {i} {k} differs from the reference"
    return report


def stepd_alive(job_id: str) -> bool:
    """Does a slurmstepd of this job (any step, batch included) still run on this machine?"""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            title = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if re.match(rf"slurmstepd: \[{re.escape(str(job_id))}\.", title):
            return True
    return False


def wait_requeued(cluster, job_id: str, timeout: float = 90) -> None:
    """Wait until a requeued job is pending again and its previous run has fully ended."""
    cluster.wait(job_id, timeout=timeout, until={"PENDING"})
    wait_for(lambda: not stepd_alive(job_id), timeout, f"the step daemons of job {job_id} to exit", poll=0.1)


def release(cluster, job_id: str) -> None:
    """Start a requeued job now instead of after SLURM's ~2 min requeue delay (BeginTime).

    That delay lets the previous run's step daemons finish: starting while one still runs lets it
    remove the PMI socket of the new run's step with the same id (the new step then fails in
    MPI_Finalize with "mpi/pmi2: failed to send temp kvs"), hence `wait_requeued` first.
    slurmd also refuses a launch credential created in the same second as the previous run's
    revocation ("Killing non-startable batch job: Job credential revoked"; timestamps are whole
    seconds), so the new start is kept at least 2 s after the requeue.
    """
    time.sleep(2)
    cluster.run("scontrol", "update", f"JobId={job_id}", "StartTime=now")


def mpich_shm_segments(job_id: str, steps: int = 4) -> list[Path]:
    """MPICH's /dev/shm segments of steps 0..steps-1 of a SLURM job (what the cleanup step removes)."""
    return step_segments(job_id, range(steps))


def restarts(cluster, job_id: str) -> int:
    out = cluster.run("scontrol", "-o", "show", "job", str(job_id), check=False).stdout
    m = re.search(r"\bRestarts=(\d+)", out)
    return int(m.group(1)) if m else -1
