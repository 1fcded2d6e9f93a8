"""Real mpirun with several ranks (the bundled MPICH): placement-independent blocks, idle ranks,
oversubscription, and a failing rank that takes the job down fast instead of hanging."""
import json
import time
from pathlib import Path

import pytest
import torch
from conftest import hpc

from hpc_bkd.store import atomic_io

pytestmark = pytest.mark.mpi


def _blocks(run: Path) -> dict[int, dict]:
    return {int(p.stem.split("-")[1]): atomic_io.load(p)["state_dict"] for p in sorted((run / "blocks").glob("block-*.pt"))}


def _assert_same_blocks(one: dict[int, dict], other: dict[int, dict], atol: float = 1e-5) -> None:
    assert one.keys() == other.keys() == set(range(8))
    for i in one:
        for k in one[i]:
            assert torch.allclose(one[i][k].float(), other[i][k].float(), rtol=1e-4, atol=atol), (i, k)


def test_one_rank_and_two_ranks_train_the_same_blocks(tmp_path: Path, tiny_teacher: Path):
    common = ["-c", "tiny", "--set", f"teacher.checkpoint={tiny_teacher}", "--set", "run.threads=1",
              "--set", "distill.epochs=2", "--set", "finetune.epochs=0"]
    hpc("distill", *common, "--run-dir", str(tmp_path / "np1"))
    proc = hpc("distill", *common, "--run-dir", str(tmp_path / "np2"), np=2)
    assert "[rank 1/2]" in proc.stderr
    report = json.loads((tmp_path / "np2" / "report.json").read_text())
    assert report["world_size"] == 2 and {b["rank"] for b in report["blocks"]} == {0, 1}
    one, two = _blocks(tmp_path / "np1"), _blocks(tmp_path / "np2")
    _assert_same_blocks(one, two)
    # both ranks timed every block at once; the plan used the median (of two: the mean) of each cost,
    # and priced a team of two from the member share measured alongside
    costs = json.loads((tmp_path / "np2" / "costs.json").read_text())
    assert len(costs["per_rank"]) == 2 and set(costs["member_share"]) == {"2"}
    for i, cost in enumerate(costs["costs"]):
        for key in ("teacher", "student", "forward"):
            assert cost[key] == pytest.approx(sum(r[i][key] for r in costs["per_rank"]) / 2)
    assert report["member_share"] == {"2": costs["member_share"]["2"]}


@pytest.mark.parametrize("bn_groups", [1, 2])
def test_a_team_trains_the_same_blocks_as_one_rank(tmp_path: Path, tiny_teacher: Path, bn_groups: int):
    """Hybrid: two ranks split every batch and sum gradients = one rank, full batch. With bn_groups 1
    members sync BatchNorm statistics; with 2 each holds one ghost batch and only the step's single
    allreduce (gradients + running statistics) is shared.

    The one rank re-runs the teacher on every batch (teacher_cache off); the team caches its
    activations, each member computing half of the rows and exchanging them (teacher_cache.py):
    the same inputs and targets either way."""
    # SGD, not the default RMSprop: RMSprop's step is about +-lr for any weight whose gradient is at
    # rounding level, so the last-bit differences of a split batch (oneDNN picks kernels by batch
    # size, and differently on different CPUs) grow chaotically to 1e-3 in two epochs; with SGD the
    # two runs stay within 4e-7, so this compares the team's arithmetic, not RMSprop's sensitivity.
    common = ["-c", "tiny", "--set", f"teacher.checkpoint={tiny_teacher}", "--set", "run.threads=1",
              "--set", "distill.epochs=2", "--set", "finetune.epochs=0", "--set", f"distill.bn_groups={bn_groups}",
              "--set", "distill.optimizer=sgd"]
    hpc("distill", *common, "--run-dir", str(tmp_path / "np1"), "--set", "distill.teacher_cache=off")
    proc = hpc("distill", *common, "--run-dir", str(tmp_path / "team"), "--set", "plan.teams=1", np=2)
    assert "ranks 0-1 (team)" in proc.stderr
    assert proc.stderr.count("(team of 2: 1/2 of the rows each, then") == 2  # each member's fill and exchange
    report = json.loads((tmp_path / "team" / "report.json").read_text())
    assert report["inputs"]["exchange"] > 0  # the cost model priced the members' exchange of cache rows
    assert report["plan"]["teams"] == [[0, 1]]
    assert report["teacher_cache"]["use"] and all(r["teacher_cache"]["fill_s"] > 0 for r in report["ranks"])
    assert not json.loads((tmp_path / "np1" / "report.json").read_text())["teacher_cache"]["use"]
    one, team = _blocks(tmp_path / "np1"), _blocks(tmp_path / "team")
    # Synced statistics are summed in float64 across members, while one rank's channels-last BatchNorm
    # kernel accumulates in float32: a few 1e-7 apart after two epochs. A wrong statistic or gradient
    # would be off by orders of magnitude more.
    _assert_same_blocks(one, team, atol=1e-5)


def test_a_gloo_team_trains_the_same_blocks_as_an_mpi_team(tmp_path: Path, tiny_teacher: Path):
    """The torch.distributed transport (the path NCCL takes on GPUs, here with Gloo on CPUs) carries
    the same sums as MPI: synced BatchNorm statistics, the step's gradient bucket and the teacher
    cache's row exchange. A two-member sum is exact either way, so the blocks are identical."""
    common = ["-c", "tiny", "--set", f"teacher.checkpoint={tiny_teacher}", "--set", "run.threads=1",
              "--set", "distill.epochs=2", "--set", "finetune.epochs=0", "--set", "distill.bn_groups=1",
              "--set", "plan.teams=1"]
    hpc("distill", *common, "--run-dir", str(tmp_path / "mpi"), "--set", "distill.team_backend=mpi", np=2)
    proc = hpc("distill", *common, "--run-dir", str(tmp_path / "gloo"), "--set", "distill.team_backend=gloo", np=2)
    assert "team of 2 ranks: gloo collectives" in proc.stderr
    assert "(team of 2: 1/2 of the rows each, then" in proc.stderr
    by_mpi, by_gloo = _blocks(tmp_path / "mpi"), _blocks(tmp_path / "gloo")
    assert by_mpi.keys() == by_gloo.keys() == set(range(8))
    for i in by_mpi:
        for k in by_mpi[i]:
            assert torch.equal(by_mpi[i][k], by_gloo[i][k]), (i, k)


def test_nccl_on_cpu_ranks_is_a_config_error(tmp_path: Path, tiny_teacher: Path):
    proc = hpc("distill", "-c", "tiny", "--run-dir", str(tmp_path), "--set", f"teacher.checkpoint={tiny_teacher}",
               "--set", "distill.team_backend=nccl", "--set", "run.device=cpu", np=2, check=False, timeout=120)
    assert proc.returncode == 2 and "nccl needs GPU ranks" in proc.stderr
    assert not (tmp_path / "report.json").exists()


def test_more_ranks_than_blocks_on_two_cores(tmp_path: Path, tiny_teacher: Path):
    """6 ranks, 5 blocks (VGG stages), 2 cores, pure block split: the spare rank is reported idle."""
    proc = hpc("run", "-c", "tiny", "--run-dir", str(tmp_path), "--set", f"teacher.checkpoint={tiny_teacher}",
               "--set", "blocks.granularity=unit", "--set", "plan.hybrid=false", np=6, timeout=400)
    assert "idle: no units for this rank" in proc.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["world_size"] == 6 and len(report["blocks"]) == 5
    assert len(report["plan"]["idle_ranks"]) == 1
    assert sum(1 for r in report["ranks"] if not r["blocks"]) == 1


def test_four_ranks_on_two_cores_hybrid(tmp_path: Path, tiny_teacher: Path):
    """4 ranks on 2 cores with two forced teams of two: every rank works, every block is trained once.
    Gloo collectives: two torch.distributed groups side by side, one per team, each bootstrapped
    from its own MPI communicator."""
    proc = hpc("run", "-c", "tiny", "--run-dir", str(tmp_path), "--set", f"teacher.checkpoint={tiny_teacher}",
               "--set", "plan.teams=2", "--set", "distill.team_backend=gloo", np=4, timeout=400)
    assert proc.stderr.count("team of 2 ranks: gloo collectives") == 2
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["world_size"] == 4 and sorted(b["index"] for b in report["blocks"]) == list(range(8))
    assert report["plan"]["teams"] == [[0, 1], [2, 3]] and not report["plan"]["idle_ranks"]
    assert {b["rank"] for b in report["blocks"]} == {0, 2}  # team leaders report the blocks


def test_error_on_the_coordinator_aborts_every_rank(tmp_path: Path, tiny_teacher: Path):
    t0 = time.time()
    proc = hpc("run", "-c", "tiny", "--run-dir", str(tmp_path), "--set", "model.arch=vgg13",
               "--set", f"teacher.checkpoint={tiny_teacher}", np=3, check=False, timeout=120)
    assert proc.returncode != 0 and time.time() - t0 < 120
    assert "does not match" in proc.stderr and "aborting all 3 ranks" in proc.stderr
