"""Standalone export: the files load and run where hpc_bkd cannot be imported, and match the
in-toolkit student on the test split; model.json says what a deployer needs; bad input is clear."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import STANDALONE, hpc

import hpc_bkd
from hpc_bkd.blocks.surgery import total_macs
from hpc_bkd.deploy.export import export_main, export_run, load_eval_split, load_run
from hpc_bkd.deploy.form import TimingPlan
from hpc_bkd.deploy.formats import EXTRA, MissingExtraError, require_formats
from hpc_bkd.distill.teacher import state_fingerprint
from hpc_bkd.store.rundir import RunDir

QUICK = TimingPlan(batch_size=32, runs=50, warmup=2, throughput_runs=4, throughput_warmup=1, probe_runs=3, threads=1)

# Runs in a fresh interpreter without hpc_bkd (conftest.WITHOUT_HPC_BKD).
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_teacher: Path) -> Path:
    """A finished tiny job (distill + assemble): a run directory holding student.pt."""
    run = tmp_path_factory.mktemp("export") / "run"
    hpc("distill", "-c", "tiny", "--run-dir", str(run), "--set", f"teacher.checkpoint={tiny_teacher}",
        "--set", "run.threads=1")
    return run


@pytest.fixture(scope="module")
def exported(tiny_run: Path):
    """The tiny run exported in both formats, teacher included."""
    return export_run(tiny_run, ("pt2", "onnx"), include_teacher=True, plan=QUICK)


@pytest.mark.slow  # a tiny job (teacher + distill) and an export: 20-60 s
def test_files_run_without_hpc_bkd_and_match_the_student(tiny_run: Path, exported, tmp_path: Path):
    run = load_run(tiny_run)
    split = load_eval_split(run.config)
    inputs = torch.cat([x for x, _ in split.batches()])
    with torch.no_grad():
        logits = run.student(inputs)
    torch.save({"inputs": inputs, "logits": logits}, tmp_path / "test-split.pt")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-I", "-c", STANDALONE, exported.export_dir, str(tmp_path / "test-split.pt")],
                          capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["pt2"] < 1e-4 and out["onnx"] < 1e-4, out
    assert out["classes"] == logits.shape[1] and not out["hpc_bkd_loaded"]
    assert len(inputs) == 360, "the whole test split of the tiny job (20 % of 1797 digits)"


@pytest.mark.slow  # a tiny job (teacher + distill) and an export: 20-60 s
def test_model_json_has_what_a_deployer_needs(tiny_run: Path, exported):
    card = json.loads(Path(exported.model_json).read_text())
    saved = torch.load(RunDir(tiny_run).student, weights_only=True)
    run = load_run(tiny_run)
    assert sorted(Path(p).name for p in exported.files.values()) == \
        ["student.onnx", "student.pt2", "teacher.onnx", "teacher.pt2"]
    assert card["toolkit"]["version"] == hpc_bkd.__version__
    assert card["input"]["shape"] == ["batch", 3, 32, 32] and len(card["input"]["mean"]) == 3
    assert card["output"]["num_classes"] == 10 and card["output"]["class_names"] == [str(i) for i in range(10)]
    assert card["model"]["accepted_blocks"] == saved["accepted_blocks"]
    assert card["size"]["student"]["macs"] == total_macs(run.student, (3, 32, 32))
    assert card["size"]["student"]["params"] == sum(p.numel() for p in run.student.parameters())
    assert card["teacher_fingerprint"] == state_fingerprint(run.teacher.state_dict())
    assert card["deploy_form"]["student"]["batchnorms_after_folding"] == 0
    assert set(card["latency"]["student"]) == {"eager", "torch.export", "onnxruntime"}
    assert set(card["latency"]["teacher"]) == {"eager", "torch.export", "onnxruntime"}
    assert card["latency"]["student"]["eager"]["latency_runs"] >= 50
    assert card["speed"] == exported.line and exported.line.startswith("student is ")
    assert set(card["speed_by_runtime"]) == {"eager", "torch.export", "onnxruntime"}
    for role in ("student", "teacher"):
        acc = card["test_accuracy"][role]
        for name, check in card["checks"][role].items():
            assert check["max_abs_diff"] < 1e-4 and abs(check["test_accuracy"] - acc) < 1e-9, name
    from hpc_bkd.data.sources import load_data
    from hpc_bkd.distill.teacher import accuracy
    data = load_data(run.config.data, run.config.run.seed)
    assert abs(card["test_accuracy"]["student"] - accuracy(run.student, data, "test")) < 1e-6


@pytest.mark.slow  # a tiny job (teacher + distill) and an export: 20-60 s
def test_load_student_and_teacher_through_the_package(tiny_run: Path):
    student, teacher = hpc_bkd.load_student(tiny_run), hpc_bkd.load_teacher(tiny_run)
    assert not student.training and not teacher.training
    saved = torch.load(RunDir(tiny_run).student, weights_only=True)["state_dict"]
    assert all(torch.equal(v, saved[k]) for k, v in student.state_dict().items())
    proc = subprocess.run([sys.executable, "-c", "import sys, hpc_bkd; assert 'torch' not in sys.modules; "
                           "print(callable(hpc_bkd.load_student), 'torch' in sys.modules)"],
                          capture_output=True, text=True, timeout=120)
    assert proc.stdout.split() == ["True", "True"], proc.stderr  # light import, API resolved on use


@pytest.mark.slow  # a tiny job (teacher + distill) and an export: 20-60 s
def test_export_only_pt2_and_cli_entry(tiny_run: Path, tmp_path: Path, capsys):
    copy = tmp_path / "run"
    shutil.copytree(tiny_run, copy, ignore=shutil.ignore_patterns(RunDir(tiny_run).export_dir.name))
    result = export_main(copy, ["pt2"], include_teacher=False)
    assert sorted(Path(p).name for p in result.files.values()) == ["student.pt2"]
    out = capsys.readouterr().out
    assert "student.pt2" in out and "student is " in out and "model.json" in out


def test_export_without_student_says_what_to_run(tmp_path: Path):
    RunDir(tmp_path).config.write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"student\.pt not found.*hpc-bkd run --run-dir"):
        export_main(tmp_path, ["pt2"], include_teacher=False)


def test_missing_package_names_the_extra(monkeypatch, tmp_path: Path):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else real(name, *a))
    with pytest.raises(MissingExtraError) as err:
        export_main(tmp_path, ["pt2", "onnx"], include_teacher=False)  # before looking at the run dir
    assert EXTRA in str(err.value) and "onnxruntime" in str(err.value) and isinstance(err.value, ValueError)
    assert require_formats(["pt2"]) == ("pt2",)
    with pytest.raises(ValueError, match="valid: pt2, onnx"):
        require_formats(["tflite"])
