"""The whole job on one rank: outputs, evaluate, and bad input that fails clearly and loses nothing."""
import json
from pathlib import Path

import torch
from conftest import hpc

from hpc_bkd.store import atomic_io


def test_tiny_job_end_to_end(tmp_path: Path, tiny_teacher: Path):
    run = tmp_path / "run"
    proc = hpc("run", "-c", "tiny", "--run-dir", str(run), "--set", f"teacher.checkpoint={tiny_teacher}",
               "--set", "run.measure_inference=true", "--set", "run.export=true")
    assert "hpc_bkd report" in proc.stdout and "[rank 0/1]" in proc.stderr
    assert "teacher cache on" in proc.stderr and "teacher cache on" in proc.stdout  # log and summary
    report = json.loads((run / "report.json").read_text())
    assert report["teacher_cache"]["use"] and report["ranks"][0]["teacher_cache"]["mb"] > 0
    assert report["status"] == "completed" and report["world_size"] == 1
    assert len(report["blocks"]) == 8 and all(b["rank"] == 0 for b in report["blocks"])
    for key in ("teacher_test", "student_before_finetune", "student_after_finetune"):
        assert 0 <= report["accuracy"][key] <= 100
    assert report["models"]["student"]["conv_params"] < report["models"]["teacher"]["conv_params"]
    assert set(report["phases_s"]) >= {"data", "plan", "distill+gather", "finetune"}
    assert (run / "gantt.png").read_bytes()[:4] == b"\x89PNG"
    summary = (run / "summary.txt").read_text()
    assert "accuracy (test)" in summary
    speed = report["inference"]["models"]
    assert speed["line"] in summary and ("faster than the teacher" in speed["line"]) == (speed["speedup_batch1"] >= 1)
    assert speed["teacher"]["latency_runs"] >= 50 and speed["student"]["layout"] in ("contiguous", "channels_last")
    assert [b["index"] for b in report["inference"]["blocks"]] == report["accepted_blocks"]
    assert sorted(p.name for p in (run / "export").iterdir()) == ["model.json", "student.onnx", "student.pt2"]
    assert max(report["export"]["max_abs_diff"].values()) < 1e-4
    saved = atomic_io.load(run / "student.pt")  # weights_only
    assert saved["accepted_blocks"] == report["accepted_blocks"]
    block = atomic_io.load(run / "blocks" / "block-001-separable-d1.pt")["state_dict"]
    assert all(v.is_contiguous() for v in block.values()), "blocks train channels-last but save plain tensors"
    assert not list(run.glob("**/*.tmp")), "temporary files left behind"
    out = json.loads(hpc("evaluate", "-c", "tiny", "--run-dir", str(run),
                         "--set", f"teacher.checkpoint={tiny_teacher}").stdout)
    assert abs(out["student_test_acc"] - report["accuracy"]["student_after_finetune"]) < 1e-6
    assert out["student_latency_ms"] > 0 and out["teacher_latency_ms"] > 0 and "at batch 1" in out["speed"]


def test_blocks_are_seeded_by_index_not_schedule(tmp_path: Path, tiny_teacher: Path):
    """The paper's sequential schedule and ours train identical blocks (same data, same seeds; ours
    from cached teacher activations, the paper's re-running the teacher on every batch)."""
    common = ["-c", "tiny", "--set", f"teacher.checkpoint={tiny_teacher}", "--set", "run.threads=1",
              "--set", "finetune.epochs=0"]
    hpc("distill", *common, "--run-dir", str(tmp_path / "par"))
    hpc("distill", *common, "--run-dir", str(tmp_path / "seq"), "--set", "distill.schedule=sequential")
    for i in range(8):
        a = atomic_io.load(tmp_path / "par" / "blocks" / f"block-{i:03d}-separable-d1.pt")["state_dict"]
        b = atomic_io.load(tmp_path / "seq" / "blocks" / f"block-{i:03d}-separable-d1.pt")["state_dict"]
        assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-5) for k in a), f"block {i} differs"


def test_bad_config_key_exits_with_valid_keys(tmp_path: Path):
    proc = hpc("run", "-c", "tiny", "--run-dir", str(tmp_path), "--set", "distill.epoch=2", check=False)
    assert proc.returncode == 2
    assert "unknown key distill.epoch" in proc.stderr and "epochs" in proc.stderr
    assert not (tmp_path / "report.json").exists()


def test_missing_dataset_names_layout(tmp_path: Path):
    proc = hpc("run", "-c", "vgg16-cifar10", "--run-dir", str(tmp_path / "r"), "--set", f"data.root={tmp_path}",
               check=False)
    assert proc.returncode == 2 and "cifar-10-batches-py" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_teacher_that_does_not_match(tmp_path: Path, tiny_teacher: Path):
    proc = hpc("run", "-c", "tiny", "--run-dir", str(tmp_path), "--set", "model.arch=vgg13",
               "--set", f"teacher.checkpoint={tiny_teacher}", check=False)
    assert proc.returncode == 2 and "does not match" in proc.stderr and "missing" in proc.stderr
    proc = hpc("run", "-c", "tiny", "--run-dir", str(tmp_path), "--set", f"teacher.checkpoint={tmp_path}/nope.pt",
               check=False)
    assert proc.returncode == 2 and "does not exist" in proc.stderr


def test_run_dir_of_another_job_is_not_overwritten(tmp_path: Path, tiny_teacher: Path):
    common = ["-c", "tiny", "--run-dir", str(tmp_path), "--set", f"teacher.checkpoint={tiny_teacher}",
              "--set", "finetune.epochs=0"]
    hpc("distill", *common)
    before = (tmp_path / "blocks" / "block-000-separable-d1.pt").read_bytes()
    proc = hpc("distill", *common, "--set", "distill.lr=0.01", check=False)
    assert proc.returncode == 2 and "different job" in proc.stderr
    assert (tmp_path / "blocks" / "block-000-separable-d1.pt").read_bytes() == before


def test_config_keys_and_configs_commands():
    assert "accept_tolerance" in hpc("config-keys").stdout
    assert "digits-vgg16" in hpc("configs").stdout
