"""``make gpu-check``: everything a GPU changes, measured on one GPU in one command (< 8 minutes).

On a machine with a CUDA GPU and only the README's install (``make install``):

1. ``default``: the default job (``digits-vgg16``) on the GPU, end to end (teacher, distillation,
   fine-tuning, deploy-form inference, export);
2. ``data``: the streaming data bench on a generated 224x224 ImageFolder (images/s by worker count
   next to what a ResNet18-at-224 rank consumes on this GPU);
3. ``precision``: distillation of the default job's blocks in fp32, bf16 and fp16 (the first run's
   teacher reused): time and final block losses of each;
4. ``inference``: ``hpc-bkd evaluate`` (deploy-form latency and throughput on the GPU) and
   ``benchmarks.inference`` (eager / torch.export / ONNX Runtime) on the default job's student.

Each step runs the real CLI in its own process with its own time limit; a failed step is recorded
and the next one runs. Everything goes to ``<out>/gpu_check.json``. Without a CUDA GPU it says so
and exits 3 at once (nothing to check). Run from the repository root.
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

EXIT_NO_GPU = 3
BUDGET_S = {"default": 200, "data": 100, "precision": 130, "inference": 50}  # 480 s in all


def no_gpu_reason() -> str | None:
    """Why this machine cannot run the check (None: it can)."""
    import torch

    if not torch.cuda.is_available():
        return (f"gpu-check: no CUDA GPU visible to torch {torch.__version__} (CUDA build "
                f"{torch.version.cuda or 'none'}; CUDA_VISIBLE_DEVICES and the driver decide): nothing to check "
                "here. Run `make gpu-check` on a GPU node.")
    return None


def cli(args: list[str], timeout: float, module: str = "hpc_bkd") -> dict[str, Any]:
    """Run ``python -m <module> args``; its status, seconds and the tail of its output."""
    t0 = time.time()
    try:
        proc = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=timeout)
        ok, tail = proc.returncode == 0, (proc.stdout + proc.stderr)[-2000:]
    except subprocess.TimeoutExpired:
        ok, tail = False, f"timed out after {timeout:.0f}s"
    return {"ok": ok, "seconds": round(time.time() - t0, 1), "command": " ".join(args), "tail": "" if ok else tail}


def step_default(out: Path) -> dict[str, Any]:
    run = out / "runs" / "default"
    result = cli(["run", "--run-dir", str(run), "--set", "run.device=cuda"], BUDGET_S["default"])
    report = run / "report.json"
    if report.is_file():
        r = json.loads(report.read_text())
        result.update(phases_s=r["phases_s"], wall_s=r["wall_s"], accuracy=r["accuracy"],
                      inference=(r.get("inference") or {}).get("models", {}).get("line"))
    return result


def step_data(out: Path) -> dict[str, Any]:
    from benchmarks.imagefolders import synthetic_folder

    t0 = time.time()
    folder = synthetic_folder(out / "imagefolder-224", 3000)
    figures = out / "data-bench.json"
    result = cli(["data-bench", "-c", "tiny", "--set", "model.arch=torchvision:resnet18", "--set", "data.image_size=224",
                  "--set", "data.dataset=imagefolder", "--set", f"data.root={folder}", "--set", "data.storage=stream",
                  "--set", "data.train_limit=null", "--set", "data.augment=crop-flip", "--set", "data.batch_size=64",
                  "--set", "run.device=cuda", "--workers", "1,2,4", "--batches", "30", "--json", str(figures)],
                 BUDGET_S["data"] - (time.time() - t0))
    result["generate_s"] = round(time.time() - t0 - result["seconds"], 1)
    if figures.is_file():
        result["figures"] = json.loads(figures.read_text())
    return result


def step_precision(out: Path) -> dict[str, Any]:
    teacher = out / "runs" / "default" / "teacher.pt"
    if not teacher.is_file():
        return {"ok": False, "tail": "no teacher from the default step"}
    modes = {}
    for mode in ("fp32", "bf16", "fp16"):
        run = out / "runs" / f"distill-{mode}"
        modes[mode] = cli(["distill", "--run-dir", str(run), "--set", "run.device=cuda", "--set", f"run.precision={mode}",
                           "--set", f"teacher.checkpoint={teacher}", "--set", "run.measure_inference=false",
                           "--set", "run.export=false"], BUDGET_S["precision"] / 3)
        report = run / "report.json"
        if report.is_file():
            r = json.loads(report.read_text())
            modes[mode].update(distill_s=r["distill"]["makespan_s"], student_test=r["accuracy"]["student_assembled"],
                               final_losses=[b["final_loss"] for b in r["blocks"]])
    return {"ok": all(m["ok"] for m in modes.values()), "modes": modes}


def step_inference(out: Path) -> dict[str, Any]:
    run = out / "runs" / "default"
    evaluate = cli(["evaluate", "--run-dir", str(run), "--set", "run.device=cuda"], BUDGET_S["inference"] / 2)
    bench = cli(["--out", str(out / "inference"), "--run-dir", str(run), "--archs", "", "--no-png"],
                BUDGET_S["inference"] / 2, module="benchmarks.inference")
    return {"ok": evaluate["ok"] and bench["ok"], "evaluate": evaluate, "benchmark": bench}


STEPS: dict[str, Callable[[Path], dict[str, Any]]] = {
    "default": step_default, "data": step_data, "precision": step_precision, "inference": step_inference}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="One-command GPU check of hpc_bkd (default job, streaming, precision, "
                                             "inference), summarised in one JSON file.")
    ap.add_argument("--out", default="bench/results-gpu")
    args = ap.parse_args(argv)
    why = no_gpu_reason()
    if why:
        print(why, file=sys.stderr)
        return EXIT_NO_GPU
    import torch

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__,
                               "cuda": torch.version.cuda, "host": platform.node(), "steps": {}}
    t0 = time.time()
    for name, step in STEPS.items():
        print(f"gpu-check: {name} ...", flush=True)
        summary["steps"][name] = step(out)
        summary["wall_s"] = round(time.time() - t0, 1)
        (out / "gpu_check.json").write_text(json.dumps(summary, indent=2))
        print(f"gpu-check: {name} {'ok' if summary['steps'][name]['ok'] else 'FAILED'} "
              f"({summary['wall_s']:.0f}s so far)", flush=True)
    ok = all(s["ok"] for s in summary["steps"].values())
    print(f"gpu-check: {'all steps ok' if ok else 'some steps FAILED'} in {summary['wall_s']:.0f}s; "
          f"summary in {out / 'gpu_check.json'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
