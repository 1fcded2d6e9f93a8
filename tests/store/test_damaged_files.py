"""Damaged files and a full disk never poison a run directory (issue 15, item 4).

A file the toolkit wrote that cannot be read back is named; a finished block, a checkpoint or the
cached teacher is moved aside (kept as ``NAME.damaged-<time>``) and rebuilt, and nothing else is
lost. A full disk is a clear error naming the file and the space it needs, leaves no temporary
file, keeps every earlier checkpoint, and a re-run with room resumes.
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from conftest import hpc

from hpc_bkd.blocks.candidates import Candidate, job_units
from hpc_bkd.costs.measure import read_costs
from hpc_bkd.store import atomic_io
from hpc_bkd.store.rundir import RunDir


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _damaged(path: Path) -> list[Path]:
    return sorted(path.parent.glob(f"{path.name}.damaged-*"))


def _record(tmp_path: Path, name: str, **extra: object) -> Path:
    path = tmp_path / name
    atomic_io.save({"fingerprint": "fp", "state_dict": {"w": torch.ones(3)}, **extra}, path)
    return path


# ------------------------------------------------------------------------------ damaged files


def test_load_names_a_damaged_file(tmp_path: Path):
    path = _record(tmp_path, "x.pt")
    _truncate(path)
    with pytest.raises(atomic_io.DamagedFile) as info:
        atomic_io.load(path)
    assert info.value.path == path and str(path) in str(info.value)
    with pytest.raises(atomic_io.DamagedFile, match="no trainer"):
        atomic_io.load(_record(tmp_path, "y.pt"), keys=("fingerprint", "trainer"))
    with pytest.raises(FileNotFoundError):  # missing is not damaged
        atomic_io.load(tmp_path / "missing.pt")
    (tmp_path / "bad.json").write_text('{"blocks": [')
    with pytest.raises(atomic_io.DamagedFile, match="bad.json"):
        atomic_io.load_json(tmp_path / "bad.json")


def test_damaged_block_and_partial_are_moved_aside(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    run = RunDir(tmp_path)
    units = job_units(3, [Candidate.parse("separable-d1")])
    for u in units:
        run.save_block(u, {"fingerprint": "fp", "state_dict": {"w": torch.full((2,), float(u.id))}})
    run.save_partial(units[1], "fp", {"step": 4})
    intact = {i: run.block(units[i]).read_bytes() for i in (0, 2)}
    _truncate(run.block(units[1]))
    _truncate(run.block(units[1], partial=True))
    with caplog.at_level(logging.WARNING, logger="hpc_bkd"):
        assert run.finished_units("fp", units) == [0, 2]
        assert run.load_partial(units[1], "fp") is None
    assert not run.block(units[1]).exists() and len(_damaged(run.block(units[1]))) == 1
    assert not run.block(units[1], partial=True).exists() and len(_damaged(run.block(units[1], partial=True))) == 1
    assert {i: run.block(units[i]).read_bytes() for i in (0, 2)} == intact  # nothing else touched
    assert f"{run.block(units[1])} is damaged" in caplog.text and "moved aside to" in caplog.text
    assert "unit 001-separable-d1 is trained again" in caplog.text
    assert "unit 001-separable-d1 starts from its beginning" in caplog.text
    assert atomic_io.move_aside(run.block(units[1])) is None  # gone already (another rank moved it): no error


def test_damaged_progress_and_teacher_cache_restart_their_phase(tmp_path: Path):
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, 1)
    path = tmp_path / "finetune.partial.pt"
    atomic_io.save_progress(path, "id", model, opt, sched, 1, 2)
    assert atomic_io.load_progress(path, "id", model, opt, sched)["step"] == 2
    _truncate(path)
    assert atomic_io.load_progress(path, "id", model, opt, sched) is None
    assert not path.exists() and len(_damaged(path)) == 1
    run = RunDir(tmp_path)
    atomic_io.save({"state_dict": model.state_dict(), "identity": {}}, run.teacher)
    assert run.load_teacher_cache() is not None
    run.teacher.write_bytes(b"not a checkpoint")
    assert run.load_teacher_cache() is None and len(_damaged(run.teacher)) == 1


def test_damaged_costs_are_measured_again(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    path = tmp_path / "costs.json"
    path.write_text('{"blocks": ["a"], "costs": [{"teach')
    with caplog.at_level(logging.WARNING, logger="hpc_bkd"):
        assert read_costs(path, []) is None
    assert f"{path} is damaged" in caplog.text and "measuring the costs again" in caplog.text
    assert read_costs(tmp_path / "none.json", []) is None


def test_cli_run_resumes_after_a_damaged_block(tmp_path: Path, tiny_teacher: Path):
    """The issue's case: a truncated blocks/block-003.pt. The re-run names it, keeps it aside,
    retrains block 3 alone and completes; no other block is rewritten."""
    run = tmp_path / "run"
    args = ["distill", "-c", "tiny", "--run-dir", str(run), "--set", f"teacher.checkpoint={tiny_teacher}",
            "--set", "run.threads=1"]
    hpc(*args)
    block = run / "blocks" / "block-003-separable-d1.pt"
    _truncate(block)
    others = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in (run / "blocks").glob("block-???-*[0-9].pt")
              if p != block}
    resumed = hpc(*args)
    assert f"{block} is damaged or unreadable" in resumed.stderr and "unit 003-separable-d1 is trained again" in resumed.stderr
    assert "resuming: 7 unit(s) already finished" in resumed.stderr
    assert len(_damaged(block)) == 1 and atomic_io.load(block, ("state_dict",))
    for name, (mtime, data) in others.items():
        p = run / "blocks" / name
        assert p.stat().st_mtime_ns == mtime and p.read_bytes() == data
    report = json.loads((run / "report.json").read_text())
    assert [b["index"] for b in report["blocks"] if not b["resumed_finished"]] == [3]


def test_cli_names_a_damaged_student(tmp_path: Path):
    """``evaluate``/``export`` of a run whose student.pt is damaged: exit 2 naming the file."""
    run = RunDir(tmp_path)
    run.create()
    run.student.write_bytes(b"PK\x03\x04 truncated")
    proc = hpc("evaluate", "-c", "tiny", "--run-dir", str(tmp_path), check=False)
    assert proc.returncode == 2 and f"{run.student} is damaged" in proc.stderr and "Traceback" not in proc.stderr


# ------------------------------------------------------------------------------ a full disk


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Callable[[str], Path]]:
    """``mount(size)``: a tmpfs of ``size`` (e.g. ``64k``) at one folder, remounted on each call
    (its files are kept); unmounted at the end. Skips where mounting is not allowed (not root)."""
    where = tmp_path / "small"
    where.mkdir()
    mounted: list[bool] = []

    def mount(size: str) -> Path:
        cmd = ["mount", "-t", "tmpfs", "-o", f"{'remount,' if mounted else ''}size={size}", "tmpfs", str(where)]
        proc = subprocess.run(cmd, capture_output=True, text=True) if os.geteuid() == 0 else None
        if proc is None or proc.returncode != 0:
            pytest.skip(f"cannot mount a small tmpfs here: {proc.stderr.strip() if proc else 'not root'}")
        mounted.append(True)
        return where

    yield mount
    if mounted:
        subprocess.run(["umount", "-l", str(where)], check=False)


def test_full_disk_is_a_clear_error_and_keeps_the_old_file(small_disk: Callable[[str], Path]):
    where = small_disk("64k")
    path = where / "x.pt"
    atomic_io.save({"w": torch.ones(100)}, path)
    before = path.read_bytes()
    with pytest.raises(atomic_io.DiskFull) as info:
        atomic_io.save({"w": torch.ones(100_000)}, path)
    assert info.value.path == path and info.value.needed and info.value.needed > 400_000
    assert str(path) in str(info.value) and "needs" in str(info.value)
    assert path.read_bytes() == before and sorted(p.name for p in where.iterdir()) == ["x.pt"]
    with pytest.raises(atomic_io.DiskFull, match="100000 bytes"):
        atomic_io.write_text(where / "y.txt", "y" * 100_000)
    assert sorted(p.name for p in where.iterdir()) == ["x.pt"]


def test_cli_full_disk_then_resume_with_room(small_disk: Callable[[str], Path], tiny_teacher: Path):
    """A run directory too small for every block: exit 2 naming the file and the space it needs,
    no half-written file, the blocks saved before intact; with room, the same command resumes."""
    run = small_disk("128k")  # sequential: room for blocks 0-4, not for block 5's checkpoint as well
    args = ["distill", "-c", "tiny", "--run-dir", str(run), "--set", f"teacher.checkpoint={tiny_teacher}",
            "--set", "run.threads=1", "--set", "distill.schedule=sequential"]
    full = hpc(*args, check=False)
    assert full.returncode == 2, full.stderr
    assert f"no space left on the device to write {run}/blocks/block-" in full.stderr, full.stderr
    assert "it needs" in full.stderr and "bytes free in" in full.stderr and "Traceback" not in full.stderr
    assert not list(run.glob("**/.*.tmp")) and not list(run.glob("**/*.damaged-*"))
    saved = {p.name: p.read_bytes() for p in (run / "blocks").glob("block-???-*[0-9].pt")}
    assert 0 < len(saved) < 8, sorted(saved)
    for name in saved:
        atomic_io.load(run / "blocks" / name, ("state_dict",))
    small_disk("8m")
    resumed = hpc(*args)
    assert f"resuming: {len(saved)} unit(s) already finished" in resumed.stderr
    assert all((run / "blocks" / name).read_bytes() == data for name, data in saved.items())
    assert len(list((run / "blocks").glob("block-???-*[0-9].pt"))) == 8 and (run / "report.json").is_file()
