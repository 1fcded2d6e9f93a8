"""The streaming input pipeline's figures on a generated ImageFolder (``make bench-data``).

1. Decoded images/s at 224x224 with 1 and 2 workers (``hpc-bkd data-bench``), against what one
   rank distilling a ResNet18 at 224 consumes (its blocks' measured compute per batch).
2. Peak RSS of a rank streaming 5,000 vs 20,000 images (the 5,000 are links to the first of the
   20,000): it must not grow with the dataset (target: < 10 %).
3. The data-wait share of a short streaming distillation (ResNet18 at 224, random-weight teacher):
   each rank's ``data_wait_s`` over its busy time in ``report.json``.

Every measurement runs the real CLI in its own process. Writes ``data_bench.json`` and prints a
table. Run from the repository root: ``python -m benchmarks.data_bench --out bench/results-data``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from .imagefolders import synthetic_folder

RESNET18 = ["--set", "model.arch=torchvision:resnet18", "--set", "data.image_size=224",
            "--set", "data.dataset=imagefolder", "--set", "data.storage=stream", "--set", "data.batch_size=32",
            "--set", "data.train_limit=null", "--set", "data.augment=crop-flip"]  # ImageNet-style training reads


def _cli(*args: str, timeout: float = 3600) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "hpc_bkd", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return proc


def linked_subset(src: Path, dst: Path, images: int) -> Path:
    """``dst``: a folder of links to the first ``images`` files of ``src`` (same split layout)."""
    files = sorted(src.rglob("*.JPEG"), key=lambda p: p.name)[:images]  # by number: both splits
    for f in files:
        link = dst / f.relative_to(src)
        if not link.exists():
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(f.resolve())
    return dst


def data_bench(root: Path, out: Path, name: str, workers: str, batches: int, plan: bool) -> dict:
    path = out / f"{name}.json"
    args = ["data-bench", "-c", "tiny", *RESNET18, "--set", f"data.root={root}", "--workers", workers,
            "--batches", str(batches), "--json", str(path), "--set", "run.threads=1"]
    proc = _cli(*args, *([] if plan else ["--no-plan"]))
    print(proc.stdout.strip(), flush=True)
    return json.loads(path.read_text())


def streaming_run(root: Path, out: Path, images: int) -> dict:
    """A short distillation streamed from ``root``: the data-wait share of each rank."""
    run = out / "runs" / "resnet18-stream"
    t0 = time.time()
    _cli("distill", "-c", "tiny", *RESNET18, "--set", f"data.root={root}", "--run-dir", str(run),
         "--set", f"data.train_limit={images}", "--set", "data.val_fraction=0.05", "--set", "teacher.epochs=0",
         "--set", "distill.epochs=1", "--set", "plan.measure_batches=2", "--set", "run.threads=1",
         "--set", "data.workers=1", "--set", "finetune.recalibrate_bn_batches=0")
    report = json.loads((run / "report.json").read_text())
    ranks = [{"rank": r["rank"], "busy_s": r["busy_s"], "data_wait_s": r["data_wait_s"],
              "share": r["data_wait_s"] / r["busy_s"] if r["busy_s"] else None} for r in report["ranks"]]
    return {"wall_s": time.time() - t0, "images": images, "ranks": ranks,
            "predicted_makespan_s_per_batch": report["plan"]["makespan"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench/results-data")
    ap.add_argument("--folder", default="bench/imagefolder-224", help="where the generated images are kept")
    ap.add_argument("--images", type=int, default=20_000)
    ap.add_argument("--small", type=int, default=5_000)
    ap.add_argument("--batches", type=int, default=40)
    ap.add_argument("--run-images", type=int, default=640, help="training images of the streaming run")
    args = ap.parse_args(argv)
    out, folder = Path(args.out), Path(args.folder)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    synthetic_folder(folder, args.images)
    generated_s = time.time() - t0
    small = linked_subset(folder, Path(f"{folder}-{args.small}"), args.small)
    result: dict = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
                    "images": args.images, "small": args.small, "generate_s": generated_s}
    result["throughput"] = data_bench(folder, out, "throughput", "1,2", args.batches, plan=True)
    result["rss_large"] = data_bench(folder, out, "rss-large", "2", args.batches, plan=False)
    result["rss_small"] = data_bench(small, out, "rss-small", "2", args.batches, plan=False)
    large, little = (result[k]["rates"][0]["peak_rss_mb"] for k in ("rss_large", "rss_small"))
    result["rss_growth"] = large / little - 1
    result["streaming_run"] = streaming_run(folder, out, args.run_images)
    (out / "data_bench.json").write_text(json.dumps(result, indent=2))
    print(f"peak RSS of a streaming rank: {little:.0f} MB at {args.small:,} images, {large:.0f} MB at "
          f"{args.images:,} ({100 * result['rss_growth']:+.1f} %; target < 10 %)")
    for r in result["streaming_run"]["ranks"]:
        print(f"streaming run (ResNet18 at 224, {args.run_images} images, 1 worker): rank {r['rank']} waited "
              f"{r['data_wait_s']:.1f}s of {r['busy_s']:.1f}s busy ({100 * (r['share'] or 0):.1f} %)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
