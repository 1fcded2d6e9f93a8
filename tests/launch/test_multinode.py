"""Many nodes, for real (#15): hpc_bkd on a multi-node SLURM that the suite starts itself
(tests/cluster/multinode-slurm.sh: nodes n1, n2, each with its own network, hostname, address and
/dev/shm). The sbatch scripts on 2 nodes x 2 tasks, teams spanning two nodes (MPI and Gloo),
submitit, time-limit requeue, node failure (ranks killed, whole node killed; plain srun and
mpirun) and node-private run directories. One cluster serves the whole module.

Measured figures (bring-up, time from a node's death to the job's exit) are printed and written
to ``$HPC_BKD_MN_DIR/figures.json``.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import hpc
from multinode_cluster import run_script, script_env
from slurm_cluster import TERMINAL, _fail_or_skip, hard_timeout
from test_cluster_common import (
    N_BLOCKS,
    REPO,
    as_set_args,
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

from hpc_bkd import launch
from hpc_bkd.store import atomic_io

pytestmark = pytest.mark.multinode

CPU_ONLY = ["--gpus-per-task=0", "--cpus-per-task=1"]
PEER_TIMEOUT_S = 5
FIGURES: dict[str, float] = {}


def record(name: str, seconds: float, cluster=None) -> None:
    """Keep a measured figure: printed, and written next to the cluster's state."""
    FIGURES[name] = round(seconds, 2)
    print(f"measured: {name} = {seconds:.2f}s")
    directory = Path(cluster.state_dir if cluster is not None else script_env()["HPC_BKD_MN_DIR"])
    if directory.is_dir():
        (directory / "figures.json").write_text(json.dumps(FIGURES, indent=1))


def longer_overrides(teacher: Path, epochs: int) -> list[str]:
    """The long job of the cluster tests, longer still: several stops fit in one distillation."""
    return [o for o in long_overrides(teacher) if not o.startswith("distill.epochs=")] + [f"distill.epochs={epochs}"]


def srun_job(cluster, run: Path, overrides: list[str], launcher: str = "srun --kill-on-bad-exit=0",
             nodes: int = 2, per_node: int = 1) -> str:
    """Submit `hpc_bkd distill` on ``nodes`` x ``per_node`` ranks started by ``launcher`` (not
    requeued by SLURM after a node failure: the tests resubmit by hand)."""
    command = f"{launcher} {sys.executable} -m hpc_bkd distill -c tiny --run-dir {run} " + " ".join(as_set_args(overrides))
    return cluster.sbatch(None, f"--nodes={nodes}", f"--ntasks-per-node={per_node}", *CPU_ONLY, "--no-requeue",
                          "--wrap", command)


def report_of(run: Path) -> dict:
    return json.loads((run / "report.json").read_text())


# ------------------------------------------------------------------------------ the cluster itself


def _our_traces(prefix: str, directory: Path) -> dict[str, list[str]]:
    """What a cluster named ``prefix`` may leave behind: namespaces, links, mounts."""
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True).stdout
    mounts = Path("/proc/self/mountinfo").read_text().splitlines()
    netns = sorted(p.name for p in Path("/run/netns").glob(f"{prefix}-*")) if Path("/run/netns").is_dir() else []
    return {"netns": netns,
            "links": [line.split(":")[1].strip() for line in links.splitlines() if f" {prefix}" in line],
            "mounts": [m for m in mounts if f"/{prefix}-" in m or str(directory) in m]}


@hard_timeout(180)
def test_cluster_starts_idempotently_any_size_and_leaves_nothing_behind(multinode_cluster):
    """A second, independent 3-node cluster (own names, subnet, ports, state dir) next to the
    session's: start, start again, status, a job on all 3 nodes with node-private dirs, stop,
    stop again; afterwards no namespace, link, mount or daemon of it is left."""
    if os.geteuid() != 0:
        _fail_or_skip("needs root")
    directory = Path(f"/tmp/hpc_bkd-mn-lifecycle-{os.getpid()}")  # not under pytest's 0700 tmp: munged reads it
    knobs = {"HPC_BKD_MN_DIR": str(directory), "HPC_BKD_MN_PREFIX": "hbkt", "HPC_BKD_MN_NET": "10.231.7",
             "HPC_BKD_MN_PORT": "7837"}
    log = multinode_cluster.workdir / "lifecycle.log"
    assert _our_traces("hbkt", directory) == {"netns": [], "links": [], "mounts": []}
    try:
        t0 = time.monotonic()
        rc, out = run_script("start 3", log, extra=knobs)
        record("bring-up of a 3-node cluster (script start, cold)", time.monotonic() - t0, multinode_cluster)
        assert rc == 0, out
        t0 = time.monotonic()
        rc, out = run_script("start 3", log, extra=knobs)
        assert rc == 0 and "up: 3 nodes" in out, out
        assert time.monotonic() - t0 < 5, "start of a running cluster should be a quick check"
        assert run_script("status", log, extra=knobs)[0] == 0
        env = dict(multinode_cluster.env, SLURM_CONF=str(directory / "slurm.conf"))
        job = subprocess.run(["srun", "-N3", "-n3", "bash", "-c", 'hostname > "$0/private/whoami"; cat "$0/private/whoami"',
                              str(directory)], capture_output=True, text=True, timeout=60, env=env)
        assert sorted(job.stdout.split()) == ["n1", "n2", "n3"], job.stderr
        for node in ("n1", "n2", "n3"):  # each node wrote its own private file
            assert (directory / "nodes" / node / "private" / "whoami").read_text().strip() == node
        assert not (directory / "private" / "whoami").exists()
        pids = [int(p.read_text()) for p in (directory / "run").glob("*.pid")]
        traces = _our_traces("hbkt", directory)
        assert len(traces["netns"]) == 3 and len(traces["links"]) >= 4 and traces["mounts"]
    finally:
        rc, out = run_script("stop", log, extra=knobs)
    assert rc == 0, out
    assert run_script("stop", log, extra=knobs)[0] == 0  # idempotent
    assert run_script("status", log, extra=knobs)[0] != 0
    assert _our_traces("hbkt", directory) == {"netns": [], "links": [], "mounts": []}
    assert not [p for p in pids if Path(f"/proc/{p}").exists() and _state(p) != "Z"], "a daemon survived stop"
    assert run_script("status", multinode_cluster.workdir / "status.log")[0] == 0, "the session's cluster was touched"
    shutil.rmtree(directory, ignore_errors=True)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


def test_session_cluster_bring_up_time(multinode_cluster):
    """The fixture's start, as measured (a few tenths of a second when nothing was running)."""
    record(f"session fixture start ({len(multinode_cluster.nodes)} nodes, incl. status check)",
           multinode_cluster.start_seconds, multinode_cluster)
    assert multinode_cluster.start_seconds < 60


# ------------------------------------------------------------------------------ jobs on 2 nodes


@hard_timeout(240)
def test_sbatch_script_two_nodes_two_tasks_each(multinode_cluster, tmp_path: Path, tiny_teacher: Path):
    """slurm/vgg.sbatch on 2 nodes x 2 tasks: ranks 0-1 on n1, 2-3 on n2; every rank reports its
    node, node-local rank, device and thread share (1 CPU per task = 1 thread)."""
    cluster = multinode_cluster
    env = {"HPC_BKD_CONFIG": "tiny", "HPC_BKD_SET": f"teacher.checkpoint={tiny_teacher} finetune.epochs=0",
           "HPC_BKD_PYTHON": sys.executable}
    job = cluster.sbatch(REPO / "slurm" / "vgg.sbatch", "--nodes=2", "--ntasks-per-node=2", *CPU_ONLY,
                         "--output=bkd-vgg16-%j.out", "--time=5", env=env, cwd=tmp_path)
    state = cluster.wait(job, timeout=200)
    log = cluster.output(job)
    assert state == "COMPLETED", log[-4000:]
    assert "2 node(s) [n[1-2]] x 2 task(s), 4 rank(s)" in log and "[rank 0/4]" in log
    report = report_of(tmp_path / "runs" / f"bkd-vgg16-{job}")
    assert report["status"] == "completed" and report["world_size"] == 4
    placed = [(r["rank"], r["host"], r["local_rank"], r["device"], r["threads"]) for r in report["ranks"]]
    assert placed == [(0, "n1", 0, "cpu", 1), (1, "n1", 1, "cpu", 1), (2, "n2", 0, "cpu", 1), (3, "n2", 1, "cpu", 1)]


# as tests/distributed/test_mpi.py compares a team with one rank: SGD (RMSprop magnifies last-bit differences)
TEAM_SETTINGS = ["run.threads=1", "distill.epochs=1", "finetune.epochs=0", "distill.bn_groups=1", "distill.optimizer=sgd"]


@pytest.fixture(scope="module")
def one_rank_blocks(tmp_path_factory, tiny_teacher: Path) -> dict[int, dict]:
    """The blocks one rank trains with the team tests' settings (teacher run on every batch)."""
    run = tmp_path_factory.mktemp("team-one-rank")
    settings = [*TEAM_SETTINGS, f"teacher.checkpoint={tiny_teacher}", "distill.teacher_cache=off"]
    hpc("distill", "-c", "tiny", "--run-dir", str(run), *as_set_args(settings))
    return _blocks(run)


def _blocks(run: Path) -> dict[int, dict]:
    """Block index -> state_dict of every finished block (one candidate per block here)."""
    return {int(name[6:9]): atomic_io.load(run / "blocks" / name)["state_dict"] for name in finished_blocks(run)}


def resumed_count(log: str) -> int:
    """How many finished blocks (units) the job's log says it resumed with."""
    m = re.search(r"resuming: (\d+) \w+\(s\) already finished", log)
    assert m, log[-3000:]
    return int(m.group(1))


@pytest.mark.parametrize("backend", ["mpi", "gloo"])
@hard_timeout(240)
def test_a_team_spanning_two_nodes_trains_one_ranks_blocks(multinode_cluster, tmp_path: Path, tiny_teacher: Path,
                                                           one_rank_blocks: dict, backend: str):
    """One team of two ranks, one per node, for each CPU transport: its members meet across the
    nodes' network (Gloo at an address both reach, not a loopback one) and train the blocks one
    rank trains alone (synced BatchNorm, teacher cache split between the nodes)."""
    cluster, run = multinode_cluster, tmp_path / "run"
    overrides = [*TEAM_SETTINGS, f"teacher.checkpoint={tiny_teacher}", "plan.teams=1", f"distill.team_backend={backend}"]
    job = srun_job(cluster, run, overrides, launcher="srun")
    state = cluster.wait(job, timeout=200)
    out = cluster.output(job)
    assert state == "COMPLETED", out[-4000:]
    assert f"team of 2 ranks: {backend} collectives" in out
    report = report_of(run)
    assert report["plan"]["teams"] == [[0, 1]] and [r["host"] for r in report["ranks"]] == ["n1", "n2"]
    team = _blocks(run)
    assert team.keys() == one_rank_blocks.keys() == set(range(N_BLOCKS))
    for i in team:
        for k in team[i]:
            assert torch.allclose(team[i][k].float(), one_rank_blocks[i][k].float(), rtol=1e-4, atol=1e-5), (i, k)


@pytest.fixture
def cluster_env(multinode_cluster, monkeypatch):
    """This process's environment as the cluster's (submitit runs sbatch and scontrol from here)."""
    for key in [k for k in os.environ if k.startswith(("SLURM_", "SBATCH_", "SRUN_", "PMI_", "HYDRA_"))]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("PATH", multinode_cluster.env["PATH"])
    monkeypatch.setenv("SLURM_CONF", multinode_cluster.env["SLURM_CONF"])
    return multinode_cluster


@hard_timeout(240)
def test_submitit_two_node_job_returns_its_report(cluster_env, tmp_path: Path, tiny_teacher: Path):
    run = tmp_path / "run"
    job = launch.submit("tiny", [f"teacher.checkpoint={tiny_teacher}", "run.threads=1", "finetune.epochs=0"],
                        run_dir=run, executor="slurm", folder=tmp_path / "submitit" / "%j", nodes=2,
                        tasks_per_node=1, cpus_per_task=1, partition=cluster_env.partition, time_min=10)
    assert job.num_tasks == 2
    report = launch.report(job, timeout_s=200)
    assert report == report_of(run)
    assert report["status"] == "completed" and report["world_size"] == 2
    assert [r["host"] for r in report["ranks"]] == ["n1", "n2"]


@hard_timeout(300)
def test_time_limit_requeue_of_a_two_node_job_resumes(multinode_cluster, tmp_path: Path, tiny_teacher: Path,
                                                      long_reference: Path):  # noqa: F811
    """vgg.sbatch on 2 nodes gets its time-limit signal mid-distillation: every rank on both nodes
    saves, the job requeues itself, resumes on both nodes, retrains no finished block and ends
    with an uninterrupted run's blocks."""
    cluster, run = multinode_cluster, tmp_path / "run"
    env = {"HPC_BKD_CONFIG": "tiny", "HPC_BKD_RUN_DIR": str(run), "HPC_BKD_PYTHON": sys.executable,
           "HPC_BKD_SET": " ".join(long_overrides(tiny_teacher))}
    job = cluster.sbatch(REPO / "slurm" / "vgg.sbatch", "--nodes=2", "--ntasks-per-node=1", *CPU_ONLY,
                         "--output=bkd-vgg16-%j.out", "--time=5", env=env, cwd=tmp_path)
    wait_first_finished_block(run)
    cluster.cancel(job, "--signal=USR1", "--batch")  # what SLURM sends 180 s before the limit
    wait_requeued(cluster, job)
    first = assert_stopped_mid_distillation(run)
    release(cluster, job)
    state = cluster.wait(job, timeout=200)
    log = cluster.output(job)
    assert state == "COMPLETED", log[-4000:]
    assert f"requeueing job {job} (restart 1)" in log and "resuming: " in log and restarts(cluster, job) == 1
    assert [r["host"] for r in report_of(run)["ranks"]] == ["n1", "n2"]
    assert_resumed_like_reference(run, long_reference, first)


# ------------------------------------------------------------------------------ node failure


def _rank_pids(cluster, node: str, run: Path) -> list[int]:
    """The hpc_bkd rank processes of the job writing ``run`` that run on ``node``."""
    found = []
    for pid in cluster.node_pids(node):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"hpc_bkd" in argv and str(run).encode() in argv and Path(argv[0].decode()).name.startswith("python"):
            found.append(pid)
    return found


def _ended(cluster, job: str, since: float, timeout: float) -> tuple[str, float]:
    """Wait for the job's end; returns its state and the seconds since ``since``."""
    state = cluster.wait(job, timeout=timeout, until=TERMINAL)
    return state, time.monotonic() - since


def _assert_kept(run: Path, before: dict) -> dict:
    """No finished block of ``before`` was rewritten; returns the finished blocks now."""
    now = finished_blocks(run)
    assert all(now.get(name) == value for name, value in before.items()), "a finished block was rewritten"
    return now


@hard_timeout(600)
def test_node_failure_ends_the_job_and_reruns_resume(multinode_cluster, tmp_path: Path, tiny_teacher: Path):
    """One run directory, four jobs of 2 nodes x 1 rank (run.peer_timeout_s=5):
    1. plain srun (no --kill-on-bad-exit), the rank on n2 SIGKILLed: rank 0 names it and exits 4;
    2. plain srun, node n2 killed (link down, slurmd and everything on it SIGKILLed): rank 0 names
       it after run.peer_timeout_s and exits 4; the job ends when SLURM declares the node down
       (SlurmdTimeout 10 s and MessageTimeout 5 s on this cluster);
    3. mpirun inside the allocation, node n2 killed: the same;
    4. a re-run completes. No job retrains a block an earlier one finished."""
    cluster, run = multinode_cluster, tmp_path / "run"
    overrides = [*longer_overrides(tiny_teacher, epochs=20), f"run.peer_timeout_s={PEER_TIMEOUT_S}"]

    job = srun_job(cluster, run, overrides)
    wait_first_finished_block(run)
    pids = wait_for(lambda: _rank_pids(cluster, "n2", run), 30, "the rank on n2")
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    state, took = _ended(cluster, job, time.monotonic(), PEER_TIMEOUT_S + 60)
    out = cluster.output(job)
    assert state == "FAILED" and "lost rank 1 on host n2" in out and "exit code 4" in out, out[-3000:]
    record("plain srun, ranks of a node SIGKILLed -> job exit", took, cluster)
    kept = _assert_kept(run, assert_stopped_mid_distillation(run))

    for launcher, name in (("srun --kill-on-bad-exit=0", "plain srun"), ("mpirun -np 2", "mpirun")):
        job = srun_job(cluster, run, overrides, launcher=launcher)
        wait_for(lambda job=job: re.search(r"\[rank 1/2\] INFO .* epoch \d+/", cluster.output(job)), 120,
                 "rank 1 to distill")
        died = cluster.kill_node("n2")
        wait_for(lambda job=job: "lost rank 1 on host n2" in cluster.output(job), PEER_TIMEOUT_S + 30,
                 "rank 0 to name the lost rank")
        record(f"{name}, node killed -> rank 0 names the lost rank and exits", time.monotonic() - died, cluster)
        state, took = _ended(cluster, job, died, PEER_TIMEOUT_S + 120)
        out = cluster.output(job)
        record(f"{name}, node killed -> SLURM job ended", took, cluster)
        print(f"--- {name}: the job's last lines\n" + "\n".join(out.splitlines()[-8:]))
        assert state in ("FAILED", "NODE_FAIL"), (state, out[-3000:])
        cluster.revive_node("n2")
        wait_for(lambda job=job: not stepd_alive(job), 60, f"job {job}'s step daemons to exit")
        kept = _assert_kept(run, kept)
        assert len(kept) < N_BLOCKS, "every block finished before the node was killed"

    job = srun_job(cluster, run, overrides)
    assert cluster.wait(job, timeout=240) == "COMPLETED", cluster.output(job)[-3000:]
    assert resumed_count(cluster.output(job)) == len(kept)
    _assert_kept(run, kept)
    blocks = {b["index"]: b for b in report_of(run)["blocks"]}
    assert sorted(blocks) == list(range(N_BLOCKS))
    assert all(blocks[int(name[6:9])]["resumed_finished"] for name in kept)


# ------------------------------------------------------------------------------ node-private run dirs


@hard_timeout(300)
def test_node_private_run_directories(multinode_cluster, tiny_teacher: Path):
    """Without a shared filesystem each rank writes under its own node's copy of the run directory.
    A job stopped (scancel) after both nodes finished blocks leaves each node its own; rank 0's
    node also keeps copies of what the others finished. Even if those copies are missing (a node
    lost before the gather), the re-run finds every finished block (the ranks tell each other what
    they hold), retrains none, and rank 0's node ends with every block, the student and the report."""
    cluster = multinode_cluster
    name = f"private-run-{os.getpid()}-{time.time_ns()}"  # node-private dirs outlive pytest's tmp dirs
    run, on_n1, on_n2 = cluster.private / name, cluster.node_private("n1") / name, cluster.node_private("n2") / name
    try:
        _stop_and_resume_privately(cluster, run, on_n1, on_n2, longer_overrides(tiny_teacher, epochs=20))
    finally:
        for directory in (on_n1, on_n2):
            shutil.rmtree(directory, ignore_errors=True)


def _stop_and_resume_privately(cluster, run: Path, on_n1: Path, on_n2: Path, overrides: list[str]) -> None:
    """The body of test_node_private_run_directories (``run`` as the nodes see it, ``on_nI`` as
    this machine sees node nI's copy)."""
    job = srun_job(cluster, run, overrides)
    wait_for(lambda: finished_blocks(on_n1) and finished_blocks(on_n2) if (on_n2 / "blocks").is_dir() else None,
             120, "a finished block on each node")
    cluster.cancel(job)
    assert cluster.wait(job, timeout=90) in ("CANCELLED", "FAILED")
    wait_for(lambda: not stepd_alive(job), 60, f"job {job} to end")
    assert not run.exists() or not any(run.iterdir()), "the machine's own view of the private path was written"
    n2_done = finished_blocks(on_n2)
    n1_done = finished_blocks(on_n1)
    assert n2_done and set(n2_done) <= set(n1_done), "rank 0 did not keep the blocks rank 1 finished"
    assert not (on_n2 / "config.json").exists() and (on_n1 / "config.json").exists()
    for block in n2_done:  # as if rank 0 never got them
        (on_n1 / "blocks" / block).unlink()
    n1_done = finished_blocks(on_n1)

    job = srun_job(cluster, run, overrides)
    state = cluster.wait(job, timeout=240)
    out = cluster.output(job)
    assert state == "COMPLETED", out[-3000:]
    assert resumed_count(out) == len(n1_done) + len(n2_done)
    _assert_kept(on_n2, n2_done)
    _assert_kept(on_n1, n1_done)
    assert (on_n1 / "report.json").is_file() and (on_n1 / "student.pt").is_file()
    assert not (on_n2 / "report.json").exists() and not (on_n2 / "student.pt").exists()
    assert len(finished_blocks(on_n1)) == N_BLOCKS, "rank 0's node does not hold every block"
    blocks = {b["index"]: b for b in report_of(on_n1)["blocks"]}
    assert all(blocks[int(b[6:9])]["resumed_finished"] for b in [*n1_done, *n2_done])
    for name in finished_blocks(on_n2):  # rank 0's copies are the blocks rank 1 trained
        theirs, ours = atomic_io.load(on_n2 / "blocks" / name), atomic_io.load(on_n1 / "blocks" / name)
        assert all(torch.equal(theirs["state_dict"][k], ours["state_dict"][k]) for k in theirs["state_dict"])
