"""The end-to-end KD baseline: the PBKD student architecture trained from scratch with Hinton KD.

The student is the teacher's architecture with every block (``find_blocks``) replaced by the student
block PBKD would train (same ``build_student`` spec and seed), and every other layer (stem, pooling,
classifier) freshly initialised too: nothing is copied from the teacher. ``--blocks`` limits the
replacement to some blocks (e.g. those a PBKD run accepted, whose student keeps teacher layers for
the rest); those layers are freshly initialised as well. The model is then trained end to
end against the frozen teacher's logits with ``finetune.kd_train`` (SGD + Nesterov, cosine schedule,
``finetune.alpha``/``temperature``), on the same data, batches and threads as the PBKD runs.

    python -m hpc_bkd.baseline -c CONFIG --run-dir DIR [--epochs N] [--lr LR] [--blocks 0,3,4]
                               [--set section.key=value]

writes ``DIR/kd_baseline.json``: per-epoch loss, val and test accuracy, epoch time and cumulative
training wall time (test evaluation excluded; the validation pass kd_train runs is included, as in
PBKD's fine-tuning), the final test accuracy, and the cumulative time at which val / test accuracy
first came within ``--within`` points (default 1) of the teacher's, or null.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import checkpoint
from .config import Config, ConfigError, load_config

log = logging.getLogger("hpc_bkd")


def build_baseline_student(cfg: Config, num_classes: int, blocks, seed: int | None = None,
                           replace: list[int] | None = None) -> nn.Module:
    """The PBKD student architecture with all weights freshly initialised (no teacher weights).

    ``replace``: the blocks that get a student block (default all); the others keep the teacher's
    layers, freshly initialised, as in a PBKD student whose block was not accepted.
    """
    from .models import build_model
    from .students import build_student
    from .surgery import replace_blocks

    seed = cfg.run.seed if seed is None else seed
    b = cfg.blocks
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 17)
        model = build_model(cfg.model.arch, num_classes, cfg.model.width)
    students = {s.index: build_student(s, b.student_depth, b.student_width, seed) for s in blocks
                if replace is None or s.index in replace}
    return replace_blocks(model, students, blocks)


def _first_within(rows: list[dict[str, Any]], key: str, target: float) -> dict[str, Any] | None:
    for row in rows:
        if row[key] >= target:
            return {"epoch": row["epoch"], "time_s": row["cumulative_s"], "acc": row[key]}
    return None


def _device(cfg: Config) -> torch.device:
    if cfg.run.device == "cuda" or (cfg.run.device == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", 0)
    return torch.device("cpu")


def _threads(cfg: Config) -> int:
    if cfg.run.threads:
        return cfg.run.threads
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def run_baseline(cfg: Config, epochs: int | None = None, lr: float | None = None, within: float = 1.0,
                 run_dir: Path | None = None, write: bool = True, replace: list[int] | None = None) -> dict[str, Any]:
    """Train the baseline student; returns (and writes ``run_dir/kd_baseline.json``) its record.

    ``replace``: block indices given a student block (default: every block, the full PBKD student).
    """
    from .data import describe, load_data, steps_per_epoch
    from .energy import EnergyMeter
    from .runtime import keep_freed_memory
    from .finetune import kd_train
    from .surgery import conv_params, find_blocks, total_macs
    from .teacher import accuracy, get_teacher

    run_dir = Path(run_dir or cfg.run.dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    epochs = cfg.teacher.epochs if epochs is None else epochs
    lr = cfg.teacher.lr if lr is None else lr
    if epochs < 1:
        raise ConfigError(f"--epochs: must be >= 1, got {epochs}")
    threads = _threads(cfg)
    torch.set_num_threads(threads)
    device = _device(cfg)
    if device.type == "cpu":
        keep_freed_memory()  # as every PBKD rank does, so the comparison is fair
    wall0 = time.time()

    data = load_data(cfg.data, cfg.run.seed)
    log.info("kd-baseline: data %s: %s; device %s, %d thread(s)", cfg.data.dataset, describe(data), device, threads)
    teacher, info = get_teacher(cfg, data, run_dir, device)
    teacher = teacher.to(device).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    ebs = cfg.data.eval_batch_size
    teacher_val = accuracy(teacher, data, "val", ebs, device)
    teacher_test = accuracy(teacher, data, "test", ebs, device)
    blocks = find_blocks(teacher.cpu(), data.input_shape, cfg.blocks.granularity)
    teacher.to(device)
    unknown = sorted(set(replace or []) - {b.index for b in blocks})
    if unknown:
        raise ValueError(f"--blocks: no block(s) {unknown}; this teacher has blocks 0..{len(blocks) - 1}")
    replaced = [b.index for b in blocks if replace is None or b.index in replace]
    student = build_baseline_student(cfg, data.num_classes, blocks, replace=replaced)
    shape = data.input_shape
    models = {name: {"params": sum(p.numel() for p in m.parameters()), "conv_params": conv_params(m),
                     "macs": total_macs(m.cpu(), shape)} for name, m in (("teacher", teacher), ("student", student))}
    teacher.to(device)
    log.info("kd-baseline: %s student (%d/%d blocks replaced, %s params), %d epochs, lr %g; teacher val %.2f%%, "
             "test %.2f%%", cfg.model.arch, len(replaced), len(blocks), f"{models['student']['params']:,}", epochs, lr,
             teacher_val, teacher_test)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    tests: list[tuple[float, float]] = []
    meter = EnergyMeter(device)
    meter.start()
    t0 = time.time()
    def test_after_epoch(model, entry) -> None:  # runs outside kd_train's epoch clock
        t1 = time.perf_counter()
        tests.append((accuracy(model, data, "test", ebs, device), time.perf_counter() - t1))

    history = kd_train(student, teacher, data, cfg, epochs, lr, device, label="kd-baseline",
                       on_epoch=test_after_epoch)
    train_wall = time.time() - t0
    energy = meter.stop()
    test_eval_s = sum(t for _, t in tests)

    rows, clock = [], 0.0
    for h, (test, _) in zip(history, tests):
        train_s = h["time_s"]
        clock += train_s
        rows.append({"epoch": h["epoch"], "loss": h["loss"], "val_acc": h["val_acc"], "test_acc": test,
                     "epoch_s": train_s, "cumulative_s": clock})
    final_test = rows[-1]["test_acc"] if rows else accuracy(student, data, "test", ebs, device)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        import resource
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    steps = steps_per_epoch(len(data.train), cfg.data.batch_size)
    images = epochs * steps * cfg.data.batch_size
    result = {
        "method": "end-to-end Hinton KD from scratch (the PBKD student architecture, all weights fresh)",
        "config": cfg.to_dict(), "run_dir": str(run_dir), "device": str(device), "threads": threads,
        "teacher": {"source": info["source"], "val_acc": teacher_val, "test_acc": teacher_test},
        "epochs": epochs, "lr": lr, "batch_size": cfg.data.batch_size, "steps_per_epoch": steps,
        "kd": {"alpha": cfg.finetune.alpha, "temperature": cfg.finetune.temperature},
        "blocks": len(blocks), "blocks_replaced": replaced, "models": models,
        "history": rows,
        "final_val_acc": rows[-1]["val_acc"] if rows else None, "final_test_acc": final_test,
        "within_points": within,
        "time_to_within": {"val": _first_within(rows, "val_acc", teacher_val - within),
                           "test": _first_within(rows, "test_acc", teacher_test - within)},
        "train_s": clock, "train_wall_s": train_wall, "test_eval_s": test_eval_s,
        "images_per_s": images / clock if clock > 0 else None,
        "peak_mem_mb": peak, "energy": energy, "wall_s": time.time() - wall0,
    }
    if write:
        checkpoint.write_json(run_dir / "kd_baseline.json", result)
        checkpoint.save({"state_dict": {k: v.cpu() for k, v in student.state_dict().items()}},
                        run_dir / "kd_student.pt")
    hit = result["time_to_within"]["val"]
    log.info("kd-baseline: final test acc %.2f%% (teacher %.2f%%) after %.1fs of training; val within %.1f point(s) "
             "of the teacher %s", final_test, teacher_test, clock, within,
             f"at epoch {hit['epoch']} ({hit['time_s']:.1f}s)" if hit else "never")
    return result


def main(argv: list[str] | None = None) -> int:
    from .runtime import setup_logging

    p = argparse.ArgumentParser(prog="python -m hpc_bkd.baseline",
                                description="End-to-end KD baseline: the PBKD student architecture trained from "
                                            "scratch against the teacher (writes RUN_DIR/kd_baseline.json).")
    p.add_argument("-c", "--config", default=None, help="YAML file or shipped config name (default: digits-vgg16)")
    p.add_argument("--run-dir", default=None, help="run directory (overrides run.dir)")
    p.add_argument("--epochs", type=int, default=None, help="training epochs (default: teacher.epochs)")
    p.add_argument("--lr", type=float, default=None, help="SGD learning rate (default: teacher.lr, a from-scratch rate)")
    p.add_argument("--blocks", default=None,
                   help="comma-separated block indices to replace (default: all; e.g. the blocks a PBKD run accepted)")
    p.add_argument("--within", type=float, default=1.0,
                   help="report when accuracy first comes within this many points of the teacher (default 1)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config value (repeatable)")
    args = p.parse_args(argv)
    setup_logging(0, 1)
    try:
        overrides = list(args.overrides) + ([f"run.dir={args.run_dir}"] if args.run_dir else [])
        cfg = load_config(args.config, overrides)
        replace = None
        if args.blocks is not None:
            try:
                replace = sorted({int(x) for x in args.blocks.split(",") if x.strip()})
            except ValueError:
                raise ConfigError(f"--blocks: expected comma-separated block indices, got {args.blocks!r}") from None
        result = run_baseline(cfg, args.epochs, args.lr, args.within, replace=replace)
    except ConfigError as exc:
        print(f"hpc-bkd baseline: config error: {exc}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError) as exc:
        print(f"hpc-bkd baseline: error: {exc}", file=sys.stderr)
        return 2
    hit = result["time_to_within"]
    print(f"kd-baseline: {result['epochs']} epochs in {result['train_s']:.1f}s, test acc {result['final_test_acc']:.2f}% "
          f"(teacher {result['teacher']['test_acc']:.2f}%); within {args.within:g} point(s) of the teacher: val "
          f"{'%.1fs' % hit['val']['time_s'] if hit['val'] else 'never'}, test "
          f"{'%.1fs' % hit['test']['time_s'] if hit['test'] else 'never'}; wrote {Path(result['run_dir']) / 'kd_baseline.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
