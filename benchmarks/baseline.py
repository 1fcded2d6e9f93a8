"""The end-to-end KD baseline: the PBKD student architecture trained from scratch with Hinton KD.

The student is the teacher's architecture with every block (``find_blocks``) replaced by the student
block PBKD would train (same ``build_candidate`` kind and seed), and every other layer (stem, pooling,
classifier) freshly initialised too: nothing is copied from the teacher. ``--blocks`` limits the
replacement to some blocks (e.g. those a PBKD run accepted, whose student keeps teacher layers for
the rest); those layers are freshly initialised as well. The model is then trained end to
end against the frozen teacher's logits with ``finetune.kd_train`` (SGD + Nesterov, cosine schedule,
``finetune.alpha``/``temperature``), on the same data, batches and threads as the PBKD runs.

    python -m benchmarks.baseline -c CONFIG --run-dir DIR [--epochs N] [--lr LR] [--blocks 0,3,4]
                                  [--set section.key=value]

(from the repository root) writes ``DIR/kd_baseline.json`` (a ``KDRecord``): per-epoch loss, val and
test accuracy, epoch time and cumulative training wall time (test evaluation excluded; the validation
pass kd_train runs is included, as in PBKD's fine-tuning), the final test accuracy, and the cumulative
time at which val / test accuracy first came within ``--within`` points (default 1) of the teacher's,
or null.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hpc_bkd.blocks.surgery import BlockSpec
from hpc_bkd.cli.args import add_job_arguments, job_config
from hpc_bkd.config import Config, ConfigError
from hpc_bkd.data.batches import Data
from hpc_bkd.distributed.runtime import available_cores, keep_freed_memory, peak_memory_mb, pick_device, setup_logging
from hpc_bkd.errors import EXIT_BAD_INPUT, EXIT_OK
from hpc_bkd.store import atomic_io
from hpc_bkd.store.records import Energy, JsonRecord, ModelSize, ModelSizes, from_plain

log = logging.getLogger("hpc_bkd")

RESULT_FILE = "kd_baseline.json"


# ------------------------------------------------------------------------------------------ record


@dataclass(frozen=True)
class TeacherScore:
    """Where the teacher came from and its accuracy (percent)."""

    source: str
    val_acc: float
    test_acc: float


@dataclass(frozen=True)
class KDLoss:
    alpha: float
    temperature: float


@dataclass(frozen=True)
class KDEpoch:
    """One training epoch; ``cumulative_s`` is the training clock (test evaluation excluded)."""

    epoch: int
    loss: float
    val_acc: float
    test_acc: float
    epoch_s: float
    cumulative_s: float


@dataclass(frozen=True)
class Reached:
    """The first epoch whose accuracy came within reach of a target, and when."""

    epoch: int
    time_s: float
    acc: float


@dataclass(frozen=True)
class TimeToWithin:
    val: Reached | None
    test: Reached | None


@dataclass(frozen=True)
class KDRecord(JsonRecord):
    """Everything one baseline run reports; ``kd_baseline.json`` is ``to_json`` of it."""

    method: str
    config: dict[str, Any]
    run_dir: str
    device: str
    threads: int
    teacher: TeacherScore
    epochs: int
    lr: float
    batch_size: int
    steps_per_epoch: int
    kd: KDLoss
    blocks: int                  # blocks the teacher has
    blocks_replaced: list[int]   # those given a student block
    models: ModelSizes
    history: list[KDEpoch]
    final_val_acc: float | None
    final_test_acc: float
    within_points: float
    time_to_within: TimeToWithin
    train_s: float
    train_wall_s: float
    test_eval_s: float
    images_per_s: float | None
    peak_mem_mb: float
    energy: Energy
    wall_s: float

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> KDRecord:
        if isinstance(data.get("blocks_replaced"), int):  # early results counted the blocks only
            data = {**data, "blocks_replaced": list(range(data["blocks_replaced"]))}
        return from_plain(cls, data)


# ------------------------------------------------------------------------------------------ model


def build_baseline_student(cfg: Config, num_classes: int, blocks: Sequence[BlockSpec], seed: int | None = None,
                           replace: dict[int, str] | None = None) -> nn.Module:
    """The PBKD student architecture with all weights freshly initialised (no teacher weights).

    ``replace``: block -> candidate student it gets (default: every block, the job's first
    candidate); the others keep the teacher's layers, freshly initialised, as in a PBKD student
    that kept the teacher's block.
    """
    from hpc_bkd.blocks.candidates import Candidate
    from hpc_bkd.blocks.models import build_model
    from hpc_bkd.blocks.students import build_candidate
    from hpc_bkd.blocks.surgery import replace_blocks
    from hpc_bkd.config import job_candidates

    seed = cfg.run.seed if seed is None else seed
    first = job_candidates(cfg)[0].name
    kinds = replace if replace is not None else {s.index: first for s in blocks}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 17)
        model = build_model(cfg.model.arch, num_classes, cfg.model.width, cfg.model.kwargs)
    students: dict[int, nn.Module] = {s.index: build_candidate(s, Candidate.parse(kinds[s.index]), seed)
                                      for s in blocks if s.index in kinds}
    return replace_blocks(model, students, blocks)


def _model_size(model: nn.Module, input_shape: Sequence[int]) -> ModelSize:
    # TODO(issue 12): the same record is built by the pipeline; use its shared helper once it exists
    from hpc_bkd.blocks.surgery import conv_params, total_macs

    return ModelSize(params=sum(p.numel() for p in model.parameters()), conv_params=conv_params(model),
                     macs=total_macs(model.cpu(), input_shape))


def _first_within(rows: list[KDEpoch], split: str, target: float) -> Reached | None:
    for row in rows:
        acc = row.val_acc if split == "val" else row.test_acc
        if acc >= target:
            return Reached(epoch=row.epoch, time_s=row.cumulative_s, acc=acc)
    return None


# ------------------------------------------------------------------------------------------ run


@dataclass(frozen=True)
class _Prepared:
    """The frozen teacher on the device, its scores, its blocks and the fresh student."""

    data: Data
    teacher: nn.Module
    source: str
    score: TeacherScore
    blocks: list[BlockSpec]
    replaced: list[int]
    student: nn.Module
    models: ModelSizes


def _prepare(cfg: Config, run_dir: Path, device: torch.device, replace: dict[int, str] | None) -> _Prepared:
    from hpc_bkd.blocks.surgery import find_blocks
    from hpc_bkd.data.batches import describe
    from hpc_bkd.data.sources import load_data
    from hpc_bkd.distill.teacher import accuracy, get_teacher
    from hpc_bkd.store.rundir import RunDir

    data = load_data(cfg.data, cfg.run.seed)
    log.info("kd-baseline: data %s: %s; device %s, %d thread(s)", cfg.data.dataset, describe(data), device,
             torch.get_num_threads())
    teacher, info = get_teacher(cfg, data, RunDir(run_dir), device)
    teacher = teacher.to(device).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    ebs = cfg.data.eval_batch_size
    score = TeacherScore(source=info["source"], val_acc=accuracy(teacher, data, "val", ebs, device),
                         test_acc=accuracy(teacher, data, "test", ebs, device))
    blocks = find_blocks(teacher.cpu(), data.input_shape, cfg.blocks.granularity)
    teacher.to(device)
    unknown = sorted(set(replace or {}) - {b.index for b in blocks})
    if unknown:
        raise ValueError(f"--blocks: no block(s) {unknown}; this teacher has blocks 0..{len(blocks) - 1}")
    replaced = [b.index for b in blocks if replace is None or b.index in replace]
    student = build_baseline_student(cfg, data.num_classes, blocks, replace=replace)
    models = ModelSizes(teacher=_model_size(teacher, data.input_shape),
                        student=_model_size(student, data.input_shape))
    teacher.to(device)
    return _Prepared(data, teacher, info["source"], score, blocks, replaced, student, models)


def _train(cfg: Config, prep: _Prepared, epochs: int, lr: float,
           device: torch.device) -> tuple[list[KDEpoch], float, Energy, float]:
    """Train the student; returns its epochs, the training wall time, the energy and the seconds the
    test evaluation after each epoch took (outside the training clock)."""
    from hpc_bkd.distill.finetune import kd_train
    from hpc_bkd.distill.teacher import accuracy
    from hpc_bkd.distributed.energy import EnergyMeter

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    tests: list[tuple[float, float]] = []
    meter = EnergyMeter(device)
    meter.start()
    t0 = time.time()

    def test_after_epoch(model: nn.Module, entry: dict[str, float]) -> None:  # outside kd_train's epoch clock
        t1 = time.perf_counter()
        tests.append((accuracy(model, prep.data, "test", cfg.data.eval_batch_size, device),
                      time.perf_counter() - t1))

    history = kd_train(prep.student, prep.teacher, prep.data, cfg, epochs, lr, device, label="kd-baseline",
                       on_epoch=test_after_epoch)
    train_wall = time.time() - t0
    energy = Energy(**meter.stop())
    rows, clock = [], 0.0
    for h, (test, _) in zip(history, tests):
        clock += h["time_s"]
        rows.append(KDEpoch(epoch=int(h["epoch"]), loss=h["loss"], val_acc=h["val_acc"], test_acc=test,
                            epoch_s=h["time_s"], cumulative_s=clock))
    return rows, train_wall, energy, sum(t for _, t in tests)


def run_baseline(cfg: Config, epochs: int | None = None, lr: float | None = None, within: float = 1.0,
                 run_dir: Path | None = None, write: bool = True, replace: dict[int, str] | None = None) -> KDRecord:
    """Train the baseline student; returns (and writes ``run_dir/kd_baseline.json``) its record.

    ``replace``: block indices given a student block (default: every block, the full PBKD student).
    """
    from hpc_bkd.data.batches import steps_per_epoch
    from hpc_bkd.distill.teacher import accuracy

    run_dir = Path(run_dir or cfg.run.dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    epochs = cfg.teacher.epochs if epochs is None else epochs
    lr = cfg.teacher.lr if lr is None else lr
    if epochs < 1:
        raise ConfigError(f"--epochs: must be >= 1, got {epochs}")
    threads = cfg.run.threads or available_cores()
    torch.set_num_threads(threads)
    device = pick_device(cfg.run.device)
    if device.type == "cpu":
        keep_freed_memory()  # as every PBKD rank does, so the comparison is fair
    wall0 = time.time()
    prep = _prepare(cfg, run_dir, device, replace)
    log.info("kd-baseline: %s student (%d/%d blocks replaced, %s params), %d epochs, lr %g; teacher val %.2f%%, "
             "test %.2f%%", cfg.model.arch, len(prep.replaced), len(prep.blocks), f"{prep.models.student.params:,}",
             epochs, lr, prep.score.val_acc, prep.score.test_acc)
    rows, train_wall, energy, test_eval_s = _train(cfg, prep, epochs, lr, device)
    final_test = (rows[-1].test_acc if rows else
                  accuracy(prep.student, prep.data, "test", cfg.data.eval_batch_size, device))
    clock = rows[-1].cumulative_s if rows else 0.0
    steps = steps_per_epoch(len(prep.data.train), cfg.data.batch_size)
    images = epochs * steps * cfg.data.batch_size
    record = KDRecord(
        method="end-to-end Hinton KD from scratch (the PBKD student architecture, all weights fresh)",
        config=cfg.to_dict(), run_dir=str(run_dir), device=str(device), threads=threads, teacher=prep.score,
        epochs=epochs, lr=lr, batch_size=cfg.data.batch_size, steps_per_epoch=steps,
        kd=KDLoss(alpha=cfg.finetune.alpha, temperature=cfg.finetune.temperature),
        blocks=len(prep.blocks), blocks_replaced=prep.replaced, models=prep.models, history=rows,
        final_val_acc=rows[-1].val_acc if rows else None, final_test_acc=final_test, within_points=within,
        time_to_within=TimeToWithin(val=_first_within(rows, "val", prep.score.val_acc - within),
                                    test=_first_within(rows, "test", prep.score.test_acc - within)),
        train_s=clock, train_wall_s=train_wall, test_eval_s=test_eval_s,
        images_per_s=images / clock if clock > 0 else None,
        peak_mem_mb=peak_memory_mb(device), energy=energy, wall_s=time.time() - wall0)
    if write:
        atomic_io.write_json(run_dir / RESULT_FILE, record.to_json())
        atomic_io.save({"state_dict": {k: v.cpu() for k, v in prep.student.state_dict().items()}},
                       run_dir / "kd_student.pt")
    hit = record.time_to_within.val
    log.info("kd-baseline: final test acc %.2f%% (teacher %.2f%%) after %.1fs of training; val within %.1f point(s) "
             "of the teacher %s", final_test, prep.score.test_acc, clock, within,
             f"at epoch {hit.epoch} ({hit.time_s:.1f}s)" if hit else "never")
    return record


# ------------------------------------------------------------------------------------------ command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.baseline",
                                description="End-to-end KD baseline: the PBKD student architecture trained from "
                                            "scratch against the teacher (writes RUN_DIR/kd_baseline.json).")
    add_job_arguments(p)
    p.add_argument("--epochs", type=int, default=None, help="training epochs (default: teacher.epochs)")
    p.add_argument("--lr", type=float, default=None, help="SGD learning rate (default: teacher.lr, a from-scratch rate)")
    p.add_argument("--blocks", default=None,
                   help="comma-separated blocks to replace, each INDEX (the job's first candidate) or "
                        "INDEX:CANDIDATE (default: all; e.g. the blocks a PBKD run replaced and with what)")
    p.add_argument("--within", type=float, default=1.0,
                   help="report when accuracy first comes within this many points of the teacher (default 1)")
    return p


def _parse_blocks(text: str | None, cfg: Config) -> dict[int, str] | None:
    """``--blocks 0,3`` or ``--blocks 0:lowrank-r0.25,3:separable-d1``: block -> candidate."""
    from hpc_bkd.config import job_candidates

    if text is None:
        return None
    first = job_candidates(cfg)[0].name
    try:
        pairs = [x.strip().split(":", 1) for x in text.split(",") if x.strip()]
        return {int(p[0]): p[1] if len(p) > 1 else first for p in pairs}
    except ValueError:
        raise ConfigError(f"--blocks: expected comma-separated INDEX or INDEX:CANDIDATE, got {text!r}") from None


def _summary(record: KDRecord, within: float) -> str:
    def at(hit: Reached | None) -> str:
        return f"{hit.time_s:.1f}s" if hit else "never"

    return (f"kd-baseline: {record.epochs} epochs in {record.train_s:.1f}s, test acc {record.final_test_acc:.2f}% "
            f"(teacher {record.teacher.test_acc:.2f}%); within {within:g} point(s) of the teacher: val "
            f"{at(record.time_to_within.val)}, test {at(record.time_to_within.test)}; "
            f"wrote {Path(record.run_dir) / RESULT_FILE}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(0, 1)
    try:
        record = run_baseline(job_config(args), args.epochs, args.lr, args.within, replace=_parse_blocks(args.blocks, job_config(args)))
    except ConfigError as exc:
        print(f"hpc-bkd baseline: config error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except (FileNotFoundError, ValueError) as exc:
        print(f"hpc-bkd baseline: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(_summary(record, args.within))
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
