"""Modern networks, whole-unit students against Torch-Pruning (#22): ``make bench-modern``.

    python -m benchmarks.modern_bench --out bench/results-modern [--models resnet50,vit,convnext]
        [--np 2] [--set section.key=value ...]

(from the repository root). For each model of ``--models``, on the bundled digits at 32x32:

1. ``teacher``: ``hpc-bkd train-teacher`` into ``<out>/runs/<model>`` (a teacher already cached
   there for the same settings is reused, as the command itself does).
2. ``ours``: ``mpirun -np 2 python -m hpc_bkd run`` in that run directory: blocks at unit
   granularity, candidates ``skip`` / ``shrink-w<f>`` distilled on 2 ranks, chosen exactly under the
   latency budget, fine-tuned. Its wall-clock (teacher cached) is our wall-clock to the student.
3. ``torch-pruning`` (ResNet50): Torch-Pruning's documented global pruning recipe on the same
   teacher (``BasePruner``, ``GroupMagnitudeImportance(p=2)``, ``global_pruning=True``,
   ``round_to=8``, the classifier left out), its pruning ratio searched by bisection until the pruned
   model's measured batch-64 latency (deploy form, in the runtime our choice was timed in: ONNX
   Runtime where the export extra is installed, else eager) matches our student's (timed
   interleaved with it), then fine-tuned with the same routine, epochs and data as ours (``finetune.finetune``:
   KD from the teacher). Search + fine-tuning is its wall-clock to the student.
4. Every model of the comparison in deploy form (BatchNorm folded), eager PyTorch and ONNX Runtime,
   at batch 1 and batch 64, timed in interleaved rounds (each keeps its fastest round's median), so a
   burst of load from elsewhere slows every model alike; test accuracy of each on the same split.

Prints one table, writes ``modern.json`` (and ``modern.png``) under ``--out``, with the targets of
issue 22 MET/MISS and ``/proc/loadavg`` beside each timing.
"""
from __future__ import annotations

import argparse
import copy
import functools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
BATCHES = (1, 64)


@dataclass(frozen=True)
class ModelSpec:
    """One model of the bench: its shipped config, the reduced settings for a 2-core CPU, its targets."""

    config: str
    sets: tuple[str, ...]
    targets: dict[str, float]          # min throughput ratio vs the teacher at "batch<b>"; "acc_drop" max
    torch_pruning: bool = False
    classifier: str = "fc"             # left out of Torch-Pruning's cut (the recipe's ignored_layers)


# Settings that fit the whole bench in well under an hour on a 2-core CPU (a full-width ResNet50 at
# 32x32 trains at ~35 images/s there when idle, a fifth of that under other agents' load): 512
# training images in batches of 32, 2 distillation epochs, 3 fine-tuning epochs (ours and Torch-
# Pruning's alike). The ResNet50 teacher needs lr 0.005 and 30 epochs (~10 min idle): at 0.02 or
# 0.05 the un-zero-initialised bottlenecks blew its loss up to 10-20 in the first epochs and it
# sat at chance; a cached teacher (same settings) is reused.
REDUCED = ("data.train_limit=512", "data.batch_size=32", "distill.epochs=2", "finetune.epochs=3")
MODELS: dict[str, ModelSpec] = {
    "resnet50": ModelSpec("digits-resnet50-units", REDUCED + ("teacher.epochs=30", "teacher.lr=0.005", "select.budget=0.45"),
                          {"batch64": 2.0, "batch1": 1.5, "acc_drop": 1.0}, torch_pruning=True),
    "vit": ModelSpec("digits-vit-units", REDUCED + ("teacher.epochs=15", "select.budget=0.6"),
                     {"batch64": 1.5, "acc_drop": 1.0}, classifier="heads"),
    "convnext": ModelSpec("digits-resnet50-units",
                          REDUCED + ("model.arch=torchvision:convnext_tiny", "teacher.epochs=8", "teacher.lr=0.01",
                                     "blocks.candidates=[skip,shrink-w0.5,shrink-w0.25]", "select.budget=0.6"),
                          {"batch64": 1.5, "acc_drop": 1.0}, classifier="classifier.2"),
}


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def _sets(pairs: Sequence[str]) -> list[str]:
    return [a for p in pairs for a in ("--set", p)]


def _command(args: list[str], log: Path) -> float:
    """Run one command, its output in ``log``; its wall-clock seconds. A failure names the log."""
    t0 = time.perf_counter()
    with log.open("w") as out:
        code = subprocess.run(args, stdout=out, stderr=subprocess.STDOUT, cwd=REPO).returncode
    if code:
        raise SystemExit(f"`{' '.join(args)}` exited {code}; see {log}")
    return time.perf_counter() - t0


def _mpirun() -> str:
    here = Path(sys.executable).parent / "mpirun"
    return str(here) if here.exists() else (shutil.which("mpirun") or "mpirun")


# ------------------------------------------------------------------------------ timing


@dataclass
class Timed:
    """One model in deploy form, ready to be timed eagerly and in ONNX Runtime."""

    name: str
    eager: nn.Module
    onnx: Path | None = None
    session: Any = None
    ms: dict[str, float] = field(default_factory=dict)   # "eager@64" -> fastest round's median


def _forward_ms(run: Callable[[], object], runs: int, warmup: int) -> float:
    for _ in range(warmup):
        run()
    samples = []
    for _ in range(runs):
        t0 = time.perf_counter()
        run()
        samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


def time_interleaved(models: Sequence[Timed], shape: Sequence[int], runtimes: Sequence[str], rounds: int = 3,
                     batches: Sequence[int] = BATCHES) -> None:
    """Fill each model's ``ms``: in every round, each model at each batch in each runtime in turn
    (a burst of other load slows one round of every model alike); the fastest round is kept."""
    from hpc_bkd.deploy.formats import INPUT_NAME

    inputs = {b: torch.randn(b, *shape, generator=torch.Generator().manual_seed(b)) for b in batches}
    with torch.inference_mode():
        for _ in range(rounds):
            for m in models:
                for rt in runtimes:
                    for b in batches:
                        runs, warmup = (12, 3) if b == 1 else (3, 1)
                        if rt == "eager":
                            run = functools.partial(m.eager, inputs[b])
                        else:
                            run = functools.partial(m.session.run, None, {INPUT_NAME: inputs[b].numpy()})
                        key = f"{rt}@{b}"
                        m.ms[key] = min(m.ms.get(key, float("inf")), _forward_ms(run, runs, warmup))


def prepare(name: str, model: nn.Module, shape: Sequence[int], onnx_dir: Path | None, threads: int) -> Timed:
    from hpc_bkd.deploy.form import deploy_form

    timed = Timed(name, deploy_form(model.cpu().eval()))
    if onnx_dir is not None:
        from hpc_bkd.deploy.formats import export_onnx, ort_session
        timed.onnx = onnx_dir / f"{name}.onnx"
        export_onnx(timed.eager, shape, timed.onnx)
        timed.session = ort_session(timed.onnx, threads)
    return timed


# ------------------------------------------------------------------------------ Torch-Pruning


def tp_prune(teacher: nn.Module, shape: Sequence[int], ratio: float, classifier: str) -> nn.Module:
    """Torch-Pruning's documented global pruning recipe (README, "global pruning") at ``ratio``."""
    import torch_pruning as tp

    model = copy.deepcopy(teacher).cpu().eval()
    example = torch.randn(1, *shape)
    pruner = tp.pruner.BasePruner(model, example, importance=tp.importance.GroupMagnitudeImportance(p=2),
                                  pruning_ratio=ratio, global_pruning=True, round_to=8,
                                  ignored_layers=[model.get_submodule(classifier)])
    pruner.step()
    return model


def match_latency(teacher: nn.Module, ours: Timed, shape: Sequence[int], classifier: str, runtime: str,
                  threads: int, tmp: Path, steps: int = 6) -> tuple[nn.Module, float, list[dict[str, float]]]:
    """Bisect Torch-Pruning's ratio until its deploy-form batch-64 latency in ``runtime`` (the one
    our choice was timed in) matches ``ours``'s (each trial timed interleaved with ours); the trial
    whose ratio of latencies is nearest 1."""

    lo, hi = 0.0, 0.9
    trials: list[dict[str, float]] = []
    best: tuple[float, nn.Module, float] | None = None
    for _ in range(steps):
        ratio = (lo + hi) / 2
        pruned = tp_prune(teacher, shape, ratio, classifier)
        onnx = tmp if runtime == "onnxruntime" else None
        trial = prepare(f"tp-{ratio:.4f}", pruned, shape, onnx, threads)
        mine = Timed("ours", ours.eager, ours.onnx, ours.session)
        time_interleaved([mine, trial], shape, [runtime], rounds=2, batches=(64,))
        key = f"{runtime}@64"
        rel = trial.ms[key] / mine.ms[key]
        trials.append({"ratio": ratio, "latency_vs_ours": rel, "tp_ms@64": trial.ms[key], "ours_ms@64": mine.ms[key]})
        print(f"  torch-pruning ratio {ratio:.3f}: batch-64 latency {rel:.3f}x ours", flush=True)
        if best is None or abs(rel - 1) < abs(best[0] - 1):
            best = (rel, pruned, ratio)
        lo, hi = (ratio, hi) if rel > 1 else (lo, ratio)
    assert best is not None
    return best[1], best[2], trials


# ------------------------------------------------------------------------------ one model


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def bench_model(name: str, spec: ModelSpec, out: Path, np_: int, extra: Sequence[str], onnx: bool,
                keep_units: bool = False) -> dict[str, Any]:
    from hpc_bkd.config import load_config
    from hpc_bkd.data.sources import load_data
    from hpc_bkd.deploy.export import load_run
    from hpc_bkd.distill.finetune import finetune
    from hpc_bkd.distill.teacher import accuracy
    from hpc_bkd.store.records import JobRecord

    run_dir = out / "runs" / name
    run_dir.mkdir(parents=True, exist_ok=True)
    sets = [*spec.sets, *extra]
    common = ["-c", spec.config, "--run-dir", str(run_dir), *_sets(sets)]
    py = [sys.executable, "-m", "hpc_bkd"]
    row: dict[str, Any] = {"model": name, "config": spec.config, "sets": sets, "ranks": np_, "kept_units": keep_units}
    print(f"[{name}] teacher (reused if cached in {run_dir}) ...", flush=True)
    row["teacher_s"] = _command([*py, "train-teacher", *common, "--set", "run.threads=0"], out / f"{name}-teacher.log")
    keep = ("teacher.pt", "job.lock") + (("blocks", "costs.json", "config.json") if keep_units else ())
    for stale in run_dir.iterdir():  # a re-run distills (unless --keep-units), chooses and fine-tunes again
        if stale.name not in keep:
            shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
    print(f"[{name}] ours: distillation on {np_} ranks + choice + fine-tuning ...", flush=True)
    row["ours_load_before"] = loadavg()
    row["ours_wall_s"] = _command([_mpirun(), "-np", str(np_), *py, "run", *common, "--set", "run.export=false",
                                   "--set", "run.measure_inference=false"], out / f"{name}-ours.log")
    row["ours_load_after"] = loadavg()
    record = JobRecord.load(run_dir / "report.json")
    row["ours_phases_s"] = record.phases_s
    row["ours_distill_makespan_s"] = record.distill.makespan_s
    run = load_run(run_dir)
    row["ours_chosen"] = run.students
    row["blocks"] = len(run.blocks)
    cfg = load_config(spec.config, sets)
    data = load_data(cfg.data, cfg.run.seed)
    shape = data.input_shape
    torch.set_num_threads(os.cpu_count() or 1)
    threads = torch.get_num_threads()
    models: dict[str, nn.Module] = {"teacher": run.teacher, "ours": run.student}
    with tempfile.TemporaryDirectory(prefix="modern_bench_") as tmp:
        if spec.torch_pruning:
            print(f"[{name}] torch-pruning: ratio for our batch-64 latency, then {cfg.finetune.epochs} epochs of "
                  "fine-tuning ...", flush=True)
            t0 = time.perf_counter()
            match = "onnxruntime" if onnx and cfg.select.runtime != "torch" else "eager"
            row["tp_matched_in"] = match
            ours_timed = prepare("ours", run.student, shape, Path(tmp) if match == "onnxruntime" else None, threads)
            row["tp_load_before"] = loadavg()
            pruned, ratio, trials = match_latency(run.teacher, ours_timed, shape, spec.classifier, match, threads,
                                                  Path(tmp))
            row["tp_search_s"] = time.perf_counter() - t0
            row["tp_ratio"], row["tp_trials"] = ratio, trials
            t1 = time.perf_counter()
            pruned.train()
            finetune(pruned, run.teacher, data, cfg, torch.device("cpu"))
            row["tp_finetune_s"] = time.perf_counter() - t1
            row["tp_wall_s"] = time.perf_counter() - t0
            row["tp_load_after"] = loadavg()
            models["torch-pruning"] = pruned.eval()
        print(f"[{name}] accuracy and interleaved timing ({', '.join(models)}) ...", flush=True)
        row["test_acc"] = {k: accuracy(m, data, "test", cfg.data.eval_batch_size) for k, m in models.items()}
        row["params"] = {k: _params(m) for k, m in models.items()}
        timed = [prepare(k, m, shape, Path(tmp) if onnx else None, threads) for k, m in models.items()]
        row["timing_load_before"] = loadavg()
        time_interleaved(timed, shape, ["eager", "onnxruntime"] if onnx else ["eager"])
        row["timing_load_after"] = loadavg()
    row["threads"] = threads
    row["ms"] = {t.name: t.ms for t in timed}
    base = row["ms"]["teacher"]
    row["throughput_vs_teacher"] = {t.name: {k: base[k] / v for k, v in t.ms.items()} for t in timed}
    row["targets"] = targets(row, spec)
    return row


def targets(row: dict[str, Any], spec: ModelSpec) -> dict[str, str]:
    ratio, acc = row["throughput_vs_teacher"]["ours"], row["test_acc"]
    met: dict[str, str] = {}
    for key, want in spec.targets.items():
        if key.startswith("batch"):
            b = key[len("batch"):]
            for rt in ("eager", "onnxruntime"):
                if f"{rt}@{b}" in ratio:
                    got = ratio[f"{rt}@{b}"]
                    met[f"ours >= {want}x teacher throughput @{b} ({rt})"] = f"{'MET' if got >= want else 'MISS'} " \
                                                                              f"({got:.2f}x)"
    drop = acc["teacher"] - acc["ours"]
    met[f"ours within {spec.targets['acc_drop']} point of teacher"] = \
        f"{'MET' if drop <= spec.targets['acc_drop'] else 'MISS'} ({drop:+.2f} points below)"
    if "torch-pruning" in acc:
        met["ours accuracy >= torch-pruning's at the same latency"] = \
            f"{'MET' if acc['ours'] >= acc['torch-pruning'] else 'MISS'} ({acc['ours']:.2f} vs {acc['torch-pruning']:.2f})"
    return met


# ------------------------------------------------------------------------------ output


def table(rows: Sequence[dict[str, Any]]) -> str:
    lines = ["| model | student | test acc % | thr x @64 eager | thr x @1 eager | thr x @64 ORT | thr x @1 ORT "
             "| params M | wall to student s |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        for who, thr in r["throughput_vs_teacher"].items():
            wall = {"ours": r.get("ours_wall_s"), "torch-pruning": r.get("tp_wall_s")}.get(who)
            cells = [f"{thr.get(k, float('nan')):.2f}" for k in ("eager@64", "eager@1", "onnxruntime@64",
                                                                  "onnxruntime@1")]
            lines.append(f"| {r['model']} | {who} | {r['test_acc'][who]:.2f} | {' | '.join(cells)} | "
                         f"{r['params'][who] / 1e6:.2f} | {'' if wall is None else f'{wall:.0f}'} |")
    return "\n".join(lines)


def plot(rows: Sequence[dict[str, Any]], path: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, len(rows), figsize=(5 * len(rows), 4), squeeze=False)
    for ax, r in zip(axes[0], rows):
        for who, thr in r["throughput_vs_teacher"].items():
            ax.scatter(thr["eager@64"], r["test_acc"][who], label=f"{who} (eager, batch 64)")
            if "onnxruntime@64" in thr:
                ax.scatter(thr["onnxruntime@64"], r["test_acc"][who], marker="x", label=f"{who} (ORT, batch 64)")
        ax.set_xlabel("throughput vs teacher")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(r["model"])
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results-modern")
    p.add_argument("--models", default="resnet50", help=f"comma-separated, of {', '.join(MODELS)}")
    p.add_argument("--np", type=int, default=2, help="ranks of our distillation (mpirun -np)")
    p.add_argument("--no-onnx", action="store_true", help="time eager PyTorch only")
    p.add_argument("--keep-units", action="store_true",
                   help="keep the units an earlier run distilled (choose again, e.g. at another select.budget, "
                        "without training; our wall-clock then leaves the distillation out)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override for every model's runs (after the bench's reduced settings)")
    args = p.parse_args(argv)
    names = [n for n in args.models.split(",") if n]
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        p.error(f"unknown --models {unknown}; valid: {', '.join(MODELS)}")
    args.out.mkdir(parents=True, exist_ok=True)
    from hpc_bkd.distributed.runtime import cpu_model
    t0 = time.perf_counter()
    rows = []
    for n in names:
        rows.append(bench_model(n, MODELS[n], args.out, args.np, args.set, not args.no_onnx, args.keep_units))
        result = {"cpu": cpu_model(), "cores": os.cpu_count(), "command": " ".join(sys.argv),
                  "bench_wall_s": time.perf_counter() - t0, "models": rows}
        (args.out / "modern.json").write_text(json.dumps(result, indent=2, default=str))
    print()
    print(table(rows))
    for r in rows:
        print(f"\n{r['model']}: chosen per block {r['ours_chosen']}")
        print(f"  ours: {r['ours_wall_s']:.0f}s wall (teacher cached), phases {r['ours_phases_s']}")
        for k, v in r["targets"].items():
            print(f"  {v:<32} {k}")
    print(f"\nwhole bench {time.perf_counter() - t0:.0f}s; JSON: {args.out / 'modern.json'}")
    plot(rows, args.out / "modern.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
