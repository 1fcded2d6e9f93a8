"""What feeding the students costs, folded into the per-block costs the planner sees.

Costs the block timing (``costs.Timer``, on batches fetched beforehand) does not see:

* **The input pipeline.** Every rank that trains a block reads every batch (its rows of it). With
  streamed data the workers decode batches while the rank computes. How much of that overlaps is
  the machine's: on cores of their own the workers are hidden until they are the bottleneck (a
  batch takes max(C, I): compute C, input I); where they share the rank's cores both slow down,
  and without workers (the rank decodes between its steps) a batch takes C + I. So the rank's
  compute speed while its workers decode (``shared_speed``, p: 1 on cores of their own, 0.5 with
  none) is measured, the teacher term (paid once per batch whatever a rank owns) carries what
  decoding takes from the compute, I (1 - p)/p, and the plan bounds each rank by its input
  (``planning.inputs.Feed.bound``): a batch takes max(C + I(1 - p)/p, I + C(1 - p)/p), the time of the
  slower of the two sharing the machine. ``input_seconds`` is timed on every rank at once, so
  ranks' workers sharing a node slow each other as they will.
* **The teacher cache's bytes.** Filling the cache is not only a teacher pass: every image's input
  and target of every cached block are copied into the cache (channels-last), and every step
  gathers its rows back. Both are proportional to the bytes a block caches, so each block is
  charged its own bytes at this device's measured copy rate: the fill once per run (``1/epochs``
  of a step's share) and the gather every step. A rank owning the big early blocks of a
  full-width network then pays for them, which the teacher-pass-only price hid. A team's member
  fills its share of the rows and receives the others' (``Team.allgather_rows_``), at the rate
  this job's ranks exchange rows (``exchange_seconds_per_byte``, into fresh memory as the fill
  does). Unpriced, the exchange let a team look as cheap as a block split at paper scale and lose
  to it by 20 % (issue #16); a 128 MiB sample still underprices a whole cache's first touch on
  some VMs (docs/limitations.md).
"""
from __future__ import annotations

import math
import statistics
import time
from collections.abc import Sequence
from typing import Any

import torch

from hpc_bkd.blocks.surgery import BlockSpec
from hpc_bkd.data.batches import Data, train_batch
from hpc_bkd.distill.teams import MpiTransport
from hpc_bkd.planning.inputs import InputCosts
from hpc_bkd.planning.planner import BlockCost


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


def shared_speed(data: Data, batch_size: int, seed: int, augment: str, input_s: float,
                 device: torch.device, window_s: float = 0.1, pairs: int = 2) -> float:
    """p: this rank's compute speed while its input workers decode, as a fraction of its speed
    alone. A small convolution (the kind of work a rank does) is counted for a short window with
    no worker busy, then again just after a fresh feed has handed over its first batch (its
    workers are then decoding the ``data.prefetch`` batches after it); the best of ``pairs`` such
    windows each. 1 for data in memory or compute on a GPU; 0.5 without workers (the rank
    decodes between its steps: nothing overlaps)."""
    pool = getattr(data.train, "pool", None)
    if data.storage != "stream" or device.type == "cuda" or pool is None or input_s <= 0:
        return 1.0
    opts = pool.opts
    if opts.workers == 0:
        return 0.5
    window = min(window_s, 0.5 * (opts.prefetch - 1) * opts.workers * input_s)  # the workers stay busy that long
    if window < 0.005:
        return 1.0
    x, w = torch.randn(8, 32, 32, 32), torch.randn(32, 32, 3, 3)

    def rate() -> float:
        n, t0 = 0, time.perf_counter()
        while (t := time.perf_counter() - t0) < window:
            torch.nn.functional.conv2d(x, w, padding=1)
            n += 1
        return n / t

    alone, shared = 0.0, 0.0
    for k in range(pairs):
        pool.close()  # no feed prefetching in the background while timing alone
        alone = max(alone, rate())
        train_batch(data, batch_size, seed, 1 + k, 0, augment)  # a fresh feed: its workers decode what follows
        shared = max(shared, rate())
    pool.close()
    return min(1.0, max(0.25, shared / alone))


def exchange_seconds_per_byte(comm: Any, nbytes: int = 128 * 2**20) -> float:
    """Seconds per byte a rank receives when the ranks exchange rows as a team's cache fill does
    (``teams.MpiTransport.allgather_rows_`` into freshly allocated memory: the first touch of its
    pages is part of the price). Collective: every rank calls it. Host memory over MPI: a GPU team
    exchanging over NCCL, device to device, is priced pessimistically."""
    from mpi4py import MPI

    n = comm.size
    if n == 1:
        return 0.0
    rows = torch.empty(n, max(1, nbytes // n // 4))  # a row per rank: the whole is ``nbytes``, however many ranks
    rows[comm.rank].fill_(1.0)
    comm.Barrier()
    t0 = time.perf_counter()
    MpiTransport(comm).allgather_rows_(rows, list(range(n + 1)))
    seconds = time.perf_counter() - t0
    return comm.allreduce(seconds, op=MPI.MAX) / ((n - 1) * rows[0].numel() * 4)


def with_input(costs: Sequence[BlockCost], blocks: Sequence[BlockSpec], batch_size: int, inputs: InputCosts,
               cached: bool, epochs: int, members: int = 1) -> list[BlockCost]:
    """``costs`` (of the busiest member of a team of ``members``) with the input pipeline in each
    teacher term and, when ``cached``, each block's cache traffic added to its student term."""
    out = []
    for c, b in zip(costs, blocks):
        student = c.student
        if cached:
            student += inputs.cache_seconds(4 * batch_size * (math.prod(b.in_shape) + math.prod(b.out_shape)), epochs,
                                            members)
        out.append(BlockCost(inputs.teacher_term(c.teacher, members), student, c.forward))
    return out
