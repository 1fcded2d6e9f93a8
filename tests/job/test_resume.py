"""Stop (SIGTERM) mid-distillation, re-run: finished blocks are kept as they are, unfinished ones
continue from their checkpoint, and the result equals an uninterrupted run."""
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from conftest import REPO, cli_env, hpc

from hpc_bkd.store import atomic_io


def test_sigterm_then_resume_equals_uninterrupted(tmp_path: Path, tiny_teacher: Path):
    common = ["-c", "tiny", "--set", f"teacher.checkpoint={tiny_teacher}", "--set", "run.threads=1",
              "--set", "distill.epochs=6", "--set", "finetune.epochs=0", "--set", "distill.schedule=sequential"]
    hpc("distill", *common, "--run-dir", str(tmp_path / "straight"))

    run = tmp_path / "stopped"
    proc = subprocess.Popen([sys.executable, "-m", "hpc_bkd", "distill", *common, "--run-dir", str(run)],
                            cwd=REPO, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (run / "blocks" / "block-001-separable-d1.pt").exists():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.02)
    time.sleep(0.1)  # into block 2, mid-epoch
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 3, err
    assert "re-run the same command to resume" in err
    assert not (run / "report.json").exists()
    finished = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in (run / "blocks").glob("block-???-*[0-9].pt")}
    assert len(finished) >= 2 and list((run / "blocks").glob("*.partial.pt"))

    resumed = hpc("distill", *common, "--run-dir", str(run))
    assert "resuming: " in resumed.stderr
    for name, (mtime, data) in finished.items():  # never retrained, never rewritten
        p = run / "blocks" / name
        assert p.stat().st_mtime_ns == mtime and p.read_bytes() == data
    report = json.loads((run / "report.json").read_text())
    by_index = {b["index"]: b for b in report["blocks"]}
    for name in finished:
        assert by_index[int(name[6:9])]["resumed_finished"]
    assert any(b["resumed"] and not b["resumed_finished"] for b in report["blocks"]), "no block continued"
    assert not list((run / "blocks").glob("*.partial.pt"))
    for i in range(8):
        a = atomic_io.load(tmp_path / "straight" / "blocks" / f"block-{i:03d}-separable-d1.pt")["state_dict"]
        b = atomic_io.load(run / "blocks" / f"block-{i:03d}-separable-d1.pt")["state_dict"]
        assert all(torch.allclose(a[k].float(), b[k].float(), rtol=1e-4, atol=1e-5) for k in a), f"block {i}"


def _stop_when(run: Path, marker: str, args: list[str]) -> subprocess.CompletedProcess:
    """Start ``python -m hpc_bkd ARGS``, SIGTERM it as soon as ``run/marker`` exists."""
    proc = subprocess.Popen([sys.executable, "-m", "hpc_bkd", *args], cwd=REPO, env=cli_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 180
    while not (run / marker).exists():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def test_stop_while_training_the_teacher_resumes_it(tmp_path: Path, tiny_teacher: Path):
    """A stop during teacher training keeps its progress; the re-run continues it and trains the
    same teacher as an uninterrupted run."""
    run = tmp_path / "run"
    args = ["train-teacher", "-c", "tiny", "--run-dir", str(run), "--set", "run.threads=1", "--set", "teacher.epochs=3"]
    stopped = _stop_when(run, "teacher.partial.pt", args)
    assert stopped.returncode == 3, stopped.stderr
    assert "stop requested: teacher training saved" in stopped.stderr and not (run / "teacher.pt").exists()
    resumed = hpc(*args)
    assert "teacher: resuming at epoch" in resumed.stderr
    assert not (run / "teacher.partial.pt").exists()
    a, b = atomic_io.load(tiny_teacher)["state_dict"], atomic_io.load(run / "teacher.pt")["state_dict"]
    assert all(torch.allclose(a[k].float(), b[k].float(), rtol=1e-4, atol=1e-5) for k in a)


def test_stop_while_fine_tuning_keeps_blocks_and_resumes(tmp_path: Path, tiny_teacher: Path):
    run = tmp_path / "run"
    args = ["run", "-c", "tiny", "--run-dir", str(run), "--set", f"teacher.checkpoint={tiny_teacher}",
            "--set", "run.threads=1", "--set", "finetune.epochs=4"]
    stopped = _stop_when(run, "finetune.partial.pt", args)
    assert stopped.returncode == 3, stopped.stderr
    assert "stop requested: fine-tune saved" in stopped.stderr and not (run / "report.json").exists()
    blocks = {p.name: p.read_bytes() for p in (run / "blocks").glob("block-???-*[0-9].pt")}
    assert len(blocks) == 8
    costs = (run / "costs.json").read_bytes()
    resumed = hpc(*args)
    assert "fine-tune: resuming at epoch" in resumed.stderr and "resuming: 8 unit(s) already finished" in resumed.stderr
    # nothing left to plan: the first run's costs are reused, not measured again
    assert "every unit is finished: no cost measurement" in resumed.stderr
    assert (run / "costs.json").read_bytes() == costs
    assert {p.name: p.read_bytes() for p in (run / "blocks").glob("block-???-*[0-9].pt")} == blocks
    report = json.loads((run / "report.json").read_text())
    assert [e["epoch"] for e in report["finetune"]] == [1, 2, 3, 4]
    assert not (run / "finetune.partial.pt").exists()
