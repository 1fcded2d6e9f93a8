"""The MPICH /dev/shm cleanup (hpc_bkd.launch.mpich) on a directory of fake segments, and that the
sbatch scripts and the submitit backend both run this one implementation."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from hpc_bkd.launch import mpich

REPO = Path(__file__).resolve().parents[2]


def test_step_hash_is_fnv1a_of_job_dot_step():
    def fnv1a(data: bytes) -> int:  # the textbook definition, written independently
        h = 0x811C9DC5
        for b in data:
            h = ((h ^ b) * 0x01000193) % 2**32
        return h

    assert fnv1a(b"a") == 0xE40C292C and fnv1a(b"foobar") == 0xBF9CF968  # published test vectors
    for job, step in (("1", 0), ("123456", 2), (987654321, 17)):
        assert mpich.step_hash(job, step) == f"{fnv1a(f'{job}.{step}'.encode()):x}"
    assert mpich.step_hash("42", 0) == mpich.step_hash(42, 0)


def _fake_shm(root: Path, job: str, steps: range) -> dict[int, list[Path]]:
    made: dict[int, list[Path]] = {}
    for step in steps:
        h = mpich.step_hash(job, step)
        made[step] = [root / f"mpich_shm_{h}_0", root / f"mpich_shm_{h}_1", root / f"mpich_vci_{h}_0"]
        for p in made[step]:
            p.write_bytes(b"x")
    return made


def test_cleanup_removes_only_this_jobs_steps_up_to_last(tmp_path: Path):
    ours = _fake_shm(tmp_path, "123", range(4))
    other_job = _fake_shm(tmp_path, "124", range(2))
    unrelated = tmp_path / "sem.something"
    unrelated.write_bytes(b"x")

    removed = mpich.cleanup_job("123", last_step=2, shm_dir=tmp_path)

    assert sorted(removed) == sorted(p for s in range(3) for p in ours[s])
    assert not any(p.exists() for s in range(3) for p in ours[s])
    assert all(p.exists() for p in ours[3])  # beyond last_step: a later step may still run
    assert all(p.exists() for ps in other_job.values() for p in ps)
    assert unrelated.exists()
    assert mpich.cleanup_job("123", last_step=2, shm_dir=tmp_path) == []  # idempotent


def test_cleanup_of_a_missing_dir_is_a_no_op(tmp_path: Path):
    assert mpich.cleanup_job("1", 3, tmp_path / "none") == []
    assert mpich.step_segments("1", range(3), tmp_path / "none") == []


def test_cleanup_command_takes_job_and_step_from_slurm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    ours = _fake_shm(tmp_path, "77", range(4))
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_STEP_ID", "1")  # the cleanup step's own id: steps 0..2 are cleaned
    assert mpich.main(["cleanup", "--shm-dir", str(tmp_path)]) == 0
    assert not any(p.exists() for s in range(3) for p in ours[s])
    assert all(p.exists() for p in ours[3])


def test_cleanup_command_without_a_job_id_says_so(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    assert mpich.main(["cleanup"]) == 2
    assert "--job-id" in capsys.readouterr().err


def test_unused_lists_segments_no_process_maps(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]):
    live, dead, old = (tmp_path / n for n in ("mpich_shm_aa_0", "mpich_shm_bb_0", "mpich_vci_cc_0"))
    for p in (live, dead, old):
        p.write_bytes(b"x")
    (tmp_path / "other").write_bytes(b"x")
    monkeypatch.setattr(mpich, "_mapped_paths", lambda: {str(live)})
    assert mpich.unused_segments(tmp_path) == [dead, old]
    assert mpich.unused_segments(tmp_path, ignore={old.name}) == [dead]
    assert mpich.main(["unused", "--remove", "--shm-dir", str(tmp_path)]) == 0
    assert capsys.readouterr().out.split() == [str(dead), str(old)]
    assert live.exists() and not dead.exists() and not old.exists()


def test_the_module_runs_light_and_quiet(tmp_path: Path):
    """It runs on every node of every job step: no torch or MPI import, no warning on stderr."""
    probe = "import sys, hpc_bkd.launch.mpich; print(sorted({'torch', 'mpi4py', 'submitit'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "[]"
    run = subprocess.run([sys.executable, "-m", "hpc_bkd.launch.mpich", "cleanup", "--job-id", "5",
                          "--shm-dir", str(tmp_path)], capture_output=True, text=True, cwd=REPO)
    assert (run.returncode, run.stderr) == (0, "")


def test_sbatch_scripts_and_submitit_backend_use_this_cleanup():
    from hpc_bkd.launch.submitit_backend import shm_cleanup_lines

    common = (REPO / "slurm" / "common.sh").read_text()
    assert "-m hpc_bkd.launch.mpich cleanup" in common
    assert "2166136261" not in common  # no second copy of the hash in bash
    before, after = shm_cleanup_lines("/venv/bin/python")
    assert before == [mpich.srun_cleanup_command("/venv/bin/python") + " || echo 'hpc_bkd: /dev/shm cleanup failed' >&2"]
    assert any(mpich.srun_cleanup_command("/venv/bin/python") in line for line in after)
    assert after[-1] == "exit $_bkd_rc"


def test_srun_cleanup_command_quotes_the_interpreter():
    line = mpich.srun_cleanup_command("/path with space/python")
    assert line.startswith("srun --ntasks-per-node=1 ") and "--mpi=none" in line
    assert line.endswith("'/path with space/python' -m hpc_bkd.launch.mpich cleanup")


def test_submitit_slurm_parameters_wrap_the_main_step_in_the_cleanup():
    from hpc_bkd.launch.submitit_backend import _slurm_parameters

    common = dict(job_name="j", nodes=2, tasks_per_node=4, gpus_per_task=0, cpus_per_task=None, partition=None,
                  time_min=10, mpi="pmi2", signal_delay_s=120, setup=["module load x"], sbatch={"account": "p"},
                  srun_args=())
    params = _slurm_parameters(**common, shm_cleanup=True)
    assert params["setup"][0] == "module load x" and "hpc_bkd.launch.mpich cleanup" in params["setup"][-1]
    assert "hpc_bkd.launch.mpich cleanup" in params["teardown"][1]
    assert "gpus_per_task" not in params and params["srun_args"] == ["--mpi=pmi2"]
    assert params["additional_parameters"] == {"requeue": True, "account": "p"}
    params = _slurm_parameters(**common, shm_cleanup=False)
    assert params["setup"] == ["module load x"] and "teardown" not in params
