"""Inference benchmark: teacher against student, eager PyTorch against torch.export and ONNX Runtime.

    python -m benchmarks.inference --out bench/results-inference [--run-dir runs/default]

Subjects: the run directory's teacher and student (when ``--run-dir`` is given), and full-width
VGG16-BN and ResNet18 (CIFAR stem) at 32x32 with random weights, their students made by replacing
every 3x3 convolution with a ``students.build_student`` block. Speed does not depend on the weights,
so random ones measure what a trained network would. Every model is timed in its deploy form
(eval, BatchNorm folded; eager and torch.export in the faster memory layout, ONNX Runtime in NCHW):
batch-1 latency (median and p90 of >= 50 forwards) and throughput at ``--batch``. Writes
``inference.json``, ``inference.txt`` (the printed table) and ``inference.png``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hpc_bkd.deploy.form import InferenceMeasurement, TimingPlan, deploy_form, measure_inference
from hpc_bkd.distributed.runtime import cpu_model
from hpc_bkd.store import atomic_io

SHAPE = (3, 32, 32)
RUNTIMES = ("eager", "torch.export", "onnxruntime")
SHORT = {"contiguous": "nchw", "channels_last": "nhwc"}  # table: layout at batch 1 / at the throughput batch


@dataclass(frozen=True)
class Subject:
    """A teacher and its student, for one row group of the table."""

    name: str
    teacher: nn.Module
    student: nn.Module
    input_shape: tuple[int, int, int]


@dataclass(frozen=True)
class Row:
    """One model under one runtime at one thread count."""

    subject: str
    role: str  # teacher | student
    macs: int
    params: int
    measurement: InferenceMeasurement

    def to_dict(self) -> dict[str, Any]:
        return {**{k: v for k, v in asdict(self).items() if k != "measurement"},
                "measurement": self.measurement.to_json()}


def random_subject(arch: str) -> Subject:
    """Full-width ``arch`` at 32x32 with random weights; the student replaces every 3x3 conv."""
    from hpc_bkd.blocks.models import build_model
    from hpc_bkd.blocks.students import build_student
    from hpc_bkd.blocks.surgery import assemble, find_blocks

    torch.manual_seed(0)
    teacher = build_model(arch, 10, 1.0).eval()
    blocks = find_blocks(teacher, SHAPE)
    student = assemble(teacher, {b.index: build_student(b) for b in blocks}, blocks).eval()
    return Subject(f"{arch} (random, full width)", teacher, student, SHAPE)


def run_subject(run_dir: Path) -> Subject:
    """A finished run's own teacher and student."""
    from hpc_bkd.deploy.export import load_run

    run = load_run(run_dir)
    return Subject(f"{run_dir} ({run.config.model.arch} x{run.config.model.width})", run.teacher, run.student,
                   run.input_shape)


def measure_runtimes(model: nn.Module, shape: Sequence[int], plan: TimingPlan, name: str,
                     workdir: Path) -> list[InferenceMeasurement]:
    """The deploy form under eager PyTorch, as a torch.export program, and under ONNX Runtime."""
    from hpc_bkd.deploy.export import measure_onnxruntime
    from hpc_bkd.deploy.formats import export_onnx

    deployed = deploy_form(model)
    out = [measure_inference(deployed, shape, plan, name=name, deploy=False)]
    example = (torch.randn(2, *shape),)
    program = torch.export.export(deployed, example, dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
    out.append(measure_inference(program.module(), shape, plan, name=name, deploy=False, runtime="torch.export"))
    path = workdir / f"{name}.onnx"
    export_onnx(deployed, shape, path)
    out.append(measure_onnxruntime(path, shape, plan, name))
    path.unlink()
    return out


def measure_subject(subject: Subject, plan: TimingPlan) -> list[Row]:
    from hpc_bkd.blocks.surgery import total_macs

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for role, model in (("teacher", subject.teacher), ("student", subject.student)):
            macs, params = total_macs(model, subject.input_shape), sum(p.numel() for p in model.parameters())
            for m in measure_runtimes(model, subject.input_shape, plan, role, Path(tmp)):
                print(f"  {subject.name} {role} {m.runtime} ({m.threads} thr): {m.latency_ms_median:.3f} ms, "
                      f"{m.throughput_ips:.0f} img/s", file=sys.stderr, flush=True)
                rows.append(Row(subject.name, role, macs, params, m))
    return rows


def _lookup(rows: Sequence[Row]) -> dict[tuple[str, int, str, str], InferenceMeasurement]:
    return {(r.subject, r.measurement.threads, r.role, r.measurement.runtime): r.measurement for r in rows}


def conclusions(rows: Sequence[Row]) -> list[str]:
    """Per subject and thread count: student against teacher per runtime, and the fastest runtime."""
    table = _lookup(rows)
    lines = []
    for subject, threads in dict.fromkeys((s, t) for s, t, _, _ in table):
        get = {(role, rt): m for (s, t, role, rt), m in table.items() if (s, t) == (subject, threads)}
        ratios = ", ".join(f"{rt} {get['teacher', rt].latency_ms_median / get['student', rt].latency_ms_median:.2f}x"
                           for rt in RUNTIMES)
        lines.append(f"{subject}, {threads} thread(s): student speed relative to the teacher at batch 1 "
                     f"(>1 = student faster): {ratios}")
        for role in ("teacher", "student"):
            ms = {rt: get[role, rt] for rt in RUNTIMES}
            best = min(ms, key=lambda rt: ms[rt].latency_ms_median)
            best_thr = max(ms, key=lambda rt: ms[rt].throughput_ips)
            lines.append(f"  {role}: fastest at batch 1 is {best} ({ms[best].latency_ms_median:.3f} ms, "
                         f"{ms['eager'].latency_ms_median / ms[best].latency_ms_median:.2f}x eager); "
                         f"highest throughput {best_thr} ({ms[best_thr].throughput_ips:.0f} img/s, "
                         f"{ms[best_thr].throughput_ips / ms['eager'].throughput_ips:.2f}x eager)")
    return lines


def format_table(rows: Sequence[Row]) -> str:
    head = (f"{'subject':<34} {'thr':>3} {'model':<7} {'runtime':<12} {'layout':<9} {'b1 med ms':>9} "
            f"{'b1 p90 ms':>9} {'img/s':>9} {'batch':>5} {'MMACs':>8} {'params M':>8} noisy")
    lines = [head, "-" * len(head)]
    for r in rows:
        m = r.measurement
        layout = f"{SHORT[m.layout]}/{SHORT[m.throughput_layout]}"
        lines.append(f"{r.subject[:34]:<34} {m.threads:>3} {r.role:<7} {m.runtime:<12} {layout:<9} "
                     f"{m.latency_ms_median:>9.3f} {m.latency_ms_p90:>9.3f} {m.throughput_ips:>9.0f} "
                     f"{m.throughput_batch:>5} {r.macs / 1e6:>8.1f} {r.params / 1e6:>8.2f} {'yes' if m.noisy else ''}")
    return "\n".join(lines)


def hardware() -> dict[str, Any]:
    """What produced the figures: they mean nothing without it."""
    import platform

    try:
        import onnxruntime
        ort_version = onnxruntime.__version__
    except ImportError:
        ort_version = None
    return {"cpu": cpu_model(), "logical_cpus": os.cpu_count(), "torch": torch.__version__,
            "onnxruntime": ort_version, "python": platform.python_version(), "machine": platform.machine(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def plot(rows: Sequence[Row], path: Path) -> None:
    """Batch-1 latency bars: one group per subject and thread count, teacher and student side by side."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(dict.fromkeys((r.subject, r.measurement.threads) for r in rows))
    fig, axes = plt.subplots(1, len(groups), figsize=(4.5 * len(groups), 3.8), squeeze=False)
    for ax, (subject, threads) in zip(axes[0], groups):
        mine = [r for r in rows if (r.subject, r.measurement.threads) == (subject, threads)]
        for k, role in enumerate(("teacher", "student")):
            vals = [next(r.measurement.latency_ms_median for r in mine if r.role == role and r.measurement.runtime == rt)
                    for rt in RUNTIMES]
            ax.bar([i + 0.4 * k for i in range(len(RUNTIMES))], vals, width=0.4, label=role)
        ax.set_xticks([i + 0.2 for i in range(len(RUNTIMES))], RUNTIMES, fontsize=8)
        ax.set_title(f"{subject[:30]}\n{threads} thread(s)", fontsize=8)
        ax.set_ylabel("batch-1 latency (ms, median)")
        ax.legend(fontsize=8)
    fig.suptitle(f"inference on {cpu_model()}", fontsize=9, y=1.04)
    atomic_io.savefig(fig, path)
    plt.close(fig)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.inference", description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path("bench/results-inference"), help="output folder")
    p.add_argument("--run-dir", type=Path, default=None, help="a finished run (e.g. runs/default) to include")
    p.add_argument("--archs", default="vgg16,resnet18", help="full-width random subjects ('' for none)")
    p.add_argument("--threads", default=str(torch.get_num_threads()), help="comma-separated CPU thread counts")
    p.add_argument("--batch", type=int, default=256, help="throughput batch size")
    p.add_argument("--runs", type=int, default=50, help="timed batch-1 forwards (>= 50 recommended)")
    p.add_argument("--throughput-runs", type=int, default=6, help="timed large-batch forwards")
    p.add_argument("--no-png", action="store_true", help="skip the plot")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    subjects = ([run_subject(args.run_dir)] if args.run_dir else []) + \
        [random_subject(a) for a in args.archs.split(",") if a]
    rows: list[Row] = []
    for threads in [int(t) for t in args.threads.split(",")]:
        plan = TimingPlan(batch_size=args.batch, runs=args.runs, throughput_runs=args.throughput_runs, threads=threads)
        for subject in subjects:
            rows += measure_subject(subject, plan)
    text = "\n".join([f"hardware: {json.dumps(hardware())}", "", format_table(rows), "", *conclusions(rows)])
    print(text)
    atomic_io.write_text(args.out / "inference.txt", text + "\n")
    atomic_io.write_json(args.out / "inference.json", {"hardware": hardware(), "rows": [r.to_dict() for r in rows],
                                                       "conclusions": conclusions(rows)})
    if not args.no_png:
        plot(rows, args.out / "inference.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
