"""What feeding the students costs, folded into the per-block costs the planner sees.

Two costs the block timing (``costs.Timer``) does not see:

* **The input pipeline.** Every rank that trains a block reads every batch (its rows of it). With
  streamed data the workers decode batches while the rank computes, so a rank's step cannot be
  faster than the workers deliver: the measured seconds per batch (``input_seconds``, timed on
  every rank at once, so ranks' workers sharing a node slow each other as they will) are a floor
  under the teacher term, the term a rank pays once per batch whatever it owns
  (``plan.rank_cost`` takes its maximum over the rank's blocks). When data, not compute, is the
  bottleneck the plan's makespan is the input time plus the students' steps.
* **The teacher cache's bytes.** Filling the cache is not only a teacher pass: every image's input
  and target of every cached block are copied into the cache (channels-last), and every step
  gathers its rows back. Both are proportional to the bytes a block caches, so each block is
  charged its own bytes at this device's measured copy rate: the fill once per run (``1/epochs``
  of a step's share) and the gather every step. A rank owning the big early blocks of a
  full-width network then pays for them, which the teacher-pass-only price hid (issue #16: a team
  at 0.80 efficiency was chosen over a block split at 1.01).
"""
from __future__ import annotations

import math
import statistics
import time
from collections.abc import Sequence

import torch

from .data import Data, train_batch
from .plan import BlockCost
from .surgery import BlockSpec


def input_seconds(data: Data, batch_size: int, seed: int, augment: str, batches: int) -> float:
    """Seconds per training batch the input pipeline delivers on this rank in steady state (the
    first batch, which starts the workers, is not counted); 0 for data held in memory, whose rows
    are gathered inside the measured steps."""
    if data.storage != "stream" or batches < 2:
        return 0.0
    train_batch(data, batch_size, seed, 0, 0, augment)
    t0 = time.perf_counter()
    for k in range(1, batches):
        train_batch(data, batch_size, seed, 0, k, augment)
    return (time.perf_counter() - t0) / (batches - 1)


def copy_seconds_per_byte(device: torch.device, nbytes: int = 16 * 2**20, repeats: int = 5) -> tuple[float, float]:
    """(store, gather) seconds per byte on ``device``: a channels-last store as the cache fill does
    (``teacher_cache._store``) and a row gather as a cached step does (``teacher_cache._rows``)."""
    side = max(2, int(math.sqrt(nbytes / 4 / 64 / 32)))
    src = torch.randn(64, 32, side, side, device=device)
    dst = torch.empty(64, side, side, 32, device=device)
    index = torch.randperm(64, device=device)
    store, gather = [], []
    for _ in range(repeats):
        t0 = _now(device)
        dst.copy_(src.permute(0, 2, 3, 1))
        t1 = _now(device)
        dst.index_select(0, index)
        t2 = _now(device)
        store.append(t1 - t0)
        gather.append(t2 - t1)
    size = src.numel() * src.element_size()
    return statistics.median(store) / size, statistics.median(gather) / size


def _now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def with_input(costs: Sequence[BlockCost], blocks: Sequence[BlockSpec], batch_size: int, input_s: float,
               cached: bool, epochs: int, copy_rates: tuple[float, float] = (0.0, 0.0)) -> list[BlockCost]:
    """``costs`` with the input floor under each teacher term and, when ``cached``, each block's
    cache traffic (fill spread over the run's steps, gather every step) added to its student term."""
    store, gather = copy_rates
    out = []
    for c, b in zip(costs, blocks):
        student = c.student
        if cached:
            nbytes = 4 * batch_size * (math.prod(b.in_shape) + math.prod(b.out_shape))
            student += nbytes * (store / max(epochs, 1) + gather)
        out.append(BlockCost(max(c.teacher, input_s), student, c.forward))
    return out
