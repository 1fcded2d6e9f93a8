"""``hpc-bkd data-bench``: can the input pipeline keep the plan's ranks fed?

Prints the decoded images per second one rank's DataLoader workers deliver, for each worker count
asked for, next to what one rank of the plan consumes (its batch every predicted seconds per batch,
from the blocks' measured costs on random weights: the same time as trained ones). Where the
workers deliver fewer images per second than a rank consumes, the rank waits for data; give it more
workers (and the cores for them: ``--cpus-per-task``) or hold the data in memory.
"""
from __future__ import annotations

import dataclasses
import resource
import time
from dataclasses import dataclass

import torch

from hpc_bkd.config import Config
from hpc_bkd.data.batches import Data, steps_per_epoch, train_batch
from hpc_bkd.data.sources import load_data


@dataclass(frozen=True)
class WorkerRate:
    """One worker count: steady-state decoded images/s, the first batch's wait (worker start-up
    included) and this process's peak resident memory so far."""

    workers: int
    images_per_s: float
    first_batch_s: float
    peak_rss_mb: float


@dataclass(frozen=True)
class DataBench:
    storage: str
    images: int
    batch_size: int
    image_size: int
    augment: str
    rates: list[WorkerRate]
    ranks: int
    predicted_s_per_batch: list[float]  # per rank, compute only ([] when not measured)
    bad_images: int

    @property
    def consumed_per_rank(self) -> float | None:
        """Images/s the busiest rank of the plan consumes (its batch every predicted seconds)."""
        busiest = max(self.predicted_s_per_batch, default=0.0)
        return self.batch_size / busiest if busiest > 0 else None

    def to_json(self) -> dict:
        return {**dataclasses.asdict(self), "consumed_per_rank_images_per_s": self.consumed_per_rank}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def decode_rate(data: Data, cfg: Config, workers: int, batches: int) -> WorkerRate:
    """Fetch ``batches`` training batches in order with ``workers`` workers (a fresh pool)."""
    pool = getattr(data.train, "pool", None)
    if pool is not None:
        pool.close()
        pool.opts = dataclasses.replace(pool.opts, workers=workers)
    bs, seed = cfg.data.batch_size, cfg.run.seed + 17 + workers  # a stream no other measurement warmed
    t0 = time.perf_counter()
    train_batch(data, bs, seed, 0, 0, cfg.data.augment)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    steps = steps_per_epoch(len(data.train), bs)
    for k in range(1, batches):
        train_batch(data, bs, seed, k // steps, k % steps, cfg.data.augment)
    rate = (batches - 1) * bs / max(time.perf_counter() - t0, 1e-9)
    if pool is not None:
        pool.close()
    return WorkerRate(workers, rate, first, peak_rss_mb())


def rank_consumption(cfg: Config, data: Data, ranks: int, device: torch.device) -> list[float]:
    """Per rank, predicted compute seconds per batch of the plan for ``ranks`` ranks: the blocks'
    teacher and student times measured on random weights and random batches (no data read)."""
    from hpc_bkd.blocks.models import build_model
    from hpc_bkd.blocks.students import build_student
    from hpc_bkd.blocks.surgery import find_blocks
    from hpc_bkd.costs.measure import measure_costs, with_validation
    from hpc_bkd.planning.planner import make_plan

    teacher = build_model(cfg.model.arch, data.num_classes, cfg.model.width, cfg.model.kwargs).eval()
    blocks = find_blocks(teacher, data.input_shape, cfg.blocks.granularity)
    students = [build_student(b, cfg.blocks.student_depth, cfg.blocks.student_width, cfg.run.seed) for b in blocks]
    batches = [torch.randn(cfg.data.batch_size, *data.input_shape) for _ in range(cfg.plan.measure_batches + 1)]
    costs = with_validation(measure_costs(teacher, blocks, students, batches, device, cfg.distill.bn_groups), 0.0)
    return make_plan(costs, ranks, cfg.plan.method).predicted


def run_bench(cfg: Config, workers: list[int], batches: int, ranks: int, consumption: bool = True,
              device: torch.device | None = None) -> DataBench:
    """Decode rates on this machine, and (``consumption``) what a rank of the plan for ``ranks``
    ranks consumes on ``device`` (a GPU: batches are pinned and copied as a run does)."""
    device = device or torch.device("cpu")
    data = load_data(cfg.data, cfg.run.seed, device)
    rates = [decode_rate(data, cfg, w, batches) for w in (workers if data.storage == "stream" else [0])]
    predicted = rank_consumption(cfg, data, ranks, device) if consumption else []
    bench = DataBench(data.storage, len(data.train), cfg.data.batch_size, cfg.data.image_size, cfg.data.augment,
                      rates, ranks, predicted, len(data.stats.bad_images))
    data.close()
    return bench


def describe(bench: DataBench) -> list[str]:
    lines = [f"data-bench: {bench.images} training images at {bench.image_size}x{bench.image_size}, "
             f"{bench.storage}, batch {bench.batch_size}, augment {bench.augment}, {torch.get_num_threads()} "
             f"compute thread(s)"]
    lines.append(f"{'workers':>8} {'images/s':>10} {'first batch s':>14} {'peak RSS MB':>12}")
    for r in bench.rates:
        lines.append(f"{r.workers:>8} {r.images_per_s:>10.0f} {r.first_batch_s:>14.2f} {r.peak_rss_mb:>12.0f}")
    need = bench.consumed_per_rank
    if need is not None:
        best = max(bench.rates, key=lambda r: r.images_per_s)
        verdict = ("enough" if best.images_per_s >= need else
                   f"the rank would wait for data {100 * (1 - best.images_per_s / need):.0f}% of the time")
        lines.append(f"a rank of the {bench.ranks}-rank plan consumes {need:.0f} images/s (batch every "
                     f"{max(bench.predicted_s_per_batch):.3f}s, compute only); {best.workers} worker(s): {verdict}")
    if bench.bad_images:
        lines.append(f"{bench.bad_images} unreadable image(s) skipped")
    return lines
