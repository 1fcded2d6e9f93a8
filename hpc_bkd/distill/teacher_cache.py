"""The teacher-activation cache: a rank runs the frozen teacher over the training set once and keeps
its blocks' inputs and targets in memory; every later batch fetches them by image index.

Why: the teacher is frozen and in eval mode, so without augmentation its activation for an image is
the same in every epoch. Re-running it on every batch (the paper's schedule, and
``distill.teacher_cache: off``) costs a forward as deep as the rank's deepest block per step: a fifth
of a 1-rank run on the default job, and the term that keeps the rank owning the deepest block from
splitting evenly with the others. Cached, that forward is paid once per image instead of once per
image per epoch. The inputs stay what PBKD prescribes: the teacher's own activations, computed on
the rank that trains the block (a data-parallel team splits the rows and exchanges them once).

Memory: per image, an owned block's input and target (C x H x W floats each). Whether the cache is
used is decided before planning (``decide``), for the worst case of one rank owning every block, so
no plan can run out of it; the costs the planner sees then charge the teacher once per run
(``costs.with_validation(teacher_passes=1/epochs)``).
"""
from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
from torch import nn

from hpc_bkd.blocks.surgery import BlockSpec, BlockTap
from hpc_bkd.distributed.runtime import mem_available_bytes
from hpc_bkd.planning.schedule import Schedule
from hpc_bkd.store.records import CacheReport

log = logging.getLogger("hpc_bkd")


@dataclass(frozen=True)
class CacheDecision:
    """Whether ranks cache teacher activations, and why (logged and reported)."""

    use: bool
    needed_bytes: int   # every block's inputs and targets for the whole training set
    budget_bytes: int   # what one rank may use
    reason: str

    def to_record(self) -> CacheReport:
        return CacheReport(self.use, self.needed_bytes / 2**20, self.budget_bytes / 2**20, self.reason)


def cache_bytes(blocks: Sequence[BlockSpec], images: int) -> int:
    """Bytes to cache the inputs and targets (float32) of ``blocks`` for ``images`` images."""
    return 4 * images * sum(math.prod(b.in_shape) + math.prod(b.out_shape) for b in blocks)


def memory_budget(device: torch.device, local_size: int, gb: float | None = None) -> int:
    """Bytes one rank may cache: ``gb`` if given, else half the node's available memory split
    between its ranks (40 % of the free memory of a GPU, which holds one rank)."""
    if gb is not None:
        return int(gb * 2**30)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(0.4 * free)
    available = mem_available_bytes()
    return int(0.5 * available / max(local_size, 1)) if available is not None else 0


def decide(setting: str, augment: str, schedule: Schedule, blocks: Sequence[BlockSpec], images: int,
           budget: int) -> CacheDecision:
    """Cache (``setting`` auto) when the teacher's inputs repeat every epoch, the schedule shares
    one teacher pass per batch, and every block's cache fits one rank's budget."""
    needed = cache_bytes(blocks, images)
    if setting == "off":
        return CacheDecision(False, needed, budget, "off (distill.teacher_cache: off)")
    if augment != "none":
        return CacheDecision(False, needed, budget,
                             f"off: data.augment={augment} changes the teacher's input every epoch")
    if not schedule.may_cache:
        return CacheDecision(False, needed, budget,
                             f"off: the {schedule.name} schedule re-runs the teacher for every block, as the paper does")
    if needed > budget:
        return CacheDecision(False, needed, budget,
                             f"off: every block's activations need {needed / 2**30:.2f} GiB per rank, over the "
                             f"budget of {budget / 2**30:.2f} GiB (distill.teacher_cache_gb); the teacher runs on every batch")
    return CacheDecision(True, needed, budget,
                         f"on: at most {needed / 2**20:.0f} MiB per rank (budget {budget / 2**20:.0f} MiB)")


class TeacherCache:
    """Inputs and targets of some blocks for every training image, filled by one teacher pass.

    4-d activations are stored as N x H x W x C, so a fetched batch is a channels-last N x C x H x W
    view (the layout students train in, ``students.TRAIN_FORMAT``) without a copy beyond the
    row gather itself.
    """

    def __init__(self, blocks: Sequence[BlockSpec], images: int, device: torch.device) -> None:
        self.blocks = list(blocks)
        self.images = images
        self.inputs = {b.index: _empty(images, b.in_shape, device) for b in self.blocks}
        self.targets = {b.index: _empty(images, b.out_shape, device) for b in self.blocks}
        self.fill_s = 0.0
        self.exchange_s = 0.0  # of fill_s: a team's exchange of the rows its members filled

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for d in (self.inputs, self.targets) for t in d.values())

    @torch.no_grad()
    def fill(self, teacher: nn.Module, images, normalize, chunk: int, team=None,
             log_interval_s: float = 30.0, autocast: Callable[[], AbstractContextManager] = nullcontext) -> None:
        """Run ``teacher`` over ``images`` (the raw training images: a uint8 tensor, or a split
        with ``chunks``, ``data.ImageSet`` or a streamed ``streaming.StreamSet``; normalised per
        chunk) as deep as the deepest cached block. In a team each member runs (and reads) its
        share of the rows and the members then exchange them, so the team pays one teacher pass
        between them. ``autocast``: the teacher's arithmetic (``run.precision``); the cache holds
        float32 whatever it is."""
        start = time.perf_counter()
        rows = team.row_range(self.images) if team is not None else range(self.images)
        tap = BlockTap(teacher, self.blocks)
        device = next(iter(self.inputs.values())).device
        last, i = start, rows.start
        for x in _chunks(images, rows, chunk):
            j = i + len(x)
            with autocast():
                pairs = tap(normalize(x).to(device))
            for b in self.blocks:
                inp, target = pairs[b.index]
                _store(self.inputs[b.index], i, j, inp)
                _store(self.targets[b.index], i, j, target)
            if time.perf_counter() - last >= log_interval_s:
                log.info("teacher cache: %d/%d images", j - rows.start, len(rows))
                last = time.perf_counter()
            i = j
        exchange_start = time.perf_counter()
        if team is not None:
            for d in (self.inputs, self.targets):
                for t in d.values():
                    team.allgather_rows_(t)
        self.fill_s = time.perf_counter() - start
        self.exchange_s = time.perf_counter() - exchange_start

    def fetch(self, index: torch.Tensor, blocks: Sequence[int]) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """``{block: (input, target)}`` for the images ``index``, as ``surgery.BlockTap`` gives them."""
        index = index.to(next(iter(self.inputs.values())).device)
        return {b: (_rows(self.inputs[b], index), _rows(self.targets[b], index)) for b in blocks}


def _chunks(images, rows: range, chunk: int) -> Iterator[torch.Tensor]:
    """Consecutive ``rows`` of a uint8 tensor or of a split, ``chunk`` at a time."""
    if isinstance(images, torch.Tensor):
        yield from (images[i: min(i + chunk, rows.stop)] for i in range(rows.start, rows.stop, chunk))
    else:
        yield from (x for x, _ in images.chunks(rows, chunk))


def _empty(images: int, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    if len(shape) == 3:
        c, h, w = shape
        return torch.empty((images, h, w, c), device=device)
    return torch.empty((images, *shape), device=device)


def _store(cache: torch.Tensor, i: int, j: int, value: torch.Tensor) -> None:
    cache[i:j].copy_(value.permute(0, 2, 3, 1) if value.dim() == 4 else value)


def _rows(cache: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    out = cache.index_select(0, index)
    return out.permute(0, 3, 1, 2) if out.dim() == 4 else out
