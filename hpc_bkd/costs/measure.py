"""Cost measurement: what each block costs to train on this rank's device, timed as the run will
execute it, and the cost table the planner (``plan``, torch-free) works from.

Owns the timing harness, the MAC-based estimate, folding validation and the teacher cache into
per-batch costs, the median over ranks (every rank measures at once, so ranks sharing a node are
timed with their contention) and the format of ``costs.json``.
"""
from __future__ import annotations

import copy
import logging
import math
import statistics
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from hpc_bkd.blocks.candidates import Candidate, Unit
from hpc_bkd.blocks.students import TRAIN_FORMAT, block_loss, build_candidate, matches_activation
from hpc_bkd.blocks.surgery import BlockSpec, BlockTap, SwappedForward, total_macs
from hpc_bkd.config import Config
from hpc_bkd.costs.inputs import copy_seconds_per_byte, input_seconds, shared_speed, with_input
from hpc_bkd.data.batches import Data, steps_per_epoch, train_batch
from hpc_bkd.distill.precision import autocast
from hpc_bkd.distill.teams import GhostLayout, ghost_batchnorms, prepare_student
from hpc_bkd.planning.inputs import InputCosts
from hpc_bkd.planning.planner import BlockCost, TeamModel, member_rows, rank_cost, team_layouts
from hpc_bkd.planning.schedule import Schedule
from hpc_bkd.planning.table import _FIELDS, CostTable
from hpc_bkd.store import atomic_io

log = logging.getLogger("hpc_bkd")

_STEP_FIELDS = _FIELDS[1:]  # timed per student; the teacher term is its block's prefix (``Timer.prefix_costs``)


def read_costs(path: Path, units: Sequence[Unit]) -> CostTable | None:
    """The table an earlier run of this job stored at ``path``, if it covers these units; a
    damaged file is named in the log and None returned (the costs are measured again)."""
    try:
        return CostTable.from_json(atomic_io.load_json(path), [u.key for u in units])
    except FileNotFoundError:
        return None
    except (atomic_io.DamagedFile, OSError, ValueError, KeyError, TypeError) as exc:
        damaged = exc if isinstance(exc, atomic_io.DamagedFile) else atomic_io.DamagedFile(path, repr(exc))
        log.warning("%s: measuring the costs again", damaged)
        return None


def team_sizes(cfg: Config, ranks: int, n_units: int) -> list[int]:
    """Team sizes (> 1) a plan on ``ranks`` ranks may use; none for a pure block split."""
    if not cfg.plan.hybrid or ranks < 2:
        return []
    tm = TeamModel.for_groups(cfg.distill.bn_groups)
    return sorted({m for sizes in team_layouts(ranks, n_units, True, cfg.plan.teams) for m in sizes
                   if m > 1 and tm.allows(m)})


def block_costs(cfg: Config, teacher: nn.Module, specs: Sequence[BlockSpec], units: Sequence[Unit], data: Data,
                device: torch.device, ranks: int, schedule: Schedule, cached: bool, exchange: float = 0.0) -> CostTable:
    """This rank's cost table for the job's ``units`` (students of the teacher's blocks ``specs``),
    timed in the order ``schedule`` steps them. ``cached``: the teacher's activations are cached,
    so training pays its teacher pass once per run, not every epoch; ``exchange``: seconds per byte
    a team member receives when a team exchanges its cache rows."""
    blocks = [specs[u.block] for u in units]
    students = [build_candidate(specs[u.block], Candidate.parse(u.candidate), cfg.run.seed, teacher) for u in units]
    teacher_passes = 1.0 / cfg.distill.epochs if cached else 1.0
    if cfg.plan.cost_model == "macs":
        return CostTable(with_validation(mac_costs(blocks, students), 0.0, teacher_passes=teacher_passes), {}, "macs")
    sizes = team_sizes(cfg, ranks, len(blocks))
    steps = steps_per_epoch(len(data.train), cfg.data.batch_size)
    timed = timed_batches(cfg.plan.measure_batches, cfg.plan.measure_share, cfg.distill.epochs * steps, ranks,
                          1 + len(sizes))
    batches = [train_batch(data, cfg.data.batch_size, cfg.run.seed, 0, k, cfg.data.augment)[0]
               for k in range(timed + 1)]
    data.close()  # no worker decodes beside the timed compute: the input's share is priced apart (input_costs)
    stand_in = same_work(units, specs, cfg.distill.match)
    timed_units = sorted(set(stand_in))
    timer = Timer(teacher, [blocks[j] for j in timed_units], [students[j] for j in timed_units], device,
                  cfg.distill.bn_groups, [matches_activation(blocks[j], cfg.distill.match) for j in timed_units],
                  schedule.tap_each_block, prefixes=blocks)
    with autocast(cfg.run.precision, device):  # timed in the arithmetic the run will use
        timed_costs = timer.measure(batches, [1, *sizes], schedule.block_major)
    position = {j: p for p, j in enumerate(timed_units)}
    measured = {m: [BlockCost(timer.prefix_costs(m)[b.index], c[position[stand_in[j]]].student,
                              c[position[stand_in[j]]].forward) for j, b in enumerate(blocks)]
                for m, c in timed_costs.items()}
    inputs = measure_inputs(cfg, data, device, len(batches), cached, exchange)
    measured = {m: with_input(c, blocks, cfg.data.batch_size, inputs, cached, cfg.distill.epochs, m)
                for m, c in measured.items()}
    passes, shares_prefix = 0.0, True
    if cfg.distill.validate_every_epoch:
        passes = len(data.val) / cfg.data.batch_size / steps  # validation batches per train step
        shares_prefix = SwappedForward(teacher, blocks).shares_prefix
    measured = {m: with_validation(c, passes, shares_prefix, teacher_passes) for m, c in measured.items()}
    whole = rank_cost(range(len(blocks)), measured[1])
    return CostTable(measured[1], {m: rank_cost(range(len(blocks)), measured[m]) / whole for m in sizes}, "measured",
                     inputs=inputs)


def measure_inputs(cfg: Config, data: Data, device: torch.device, batches: int, cached: bool,
                   exchange: float) -> InputCosts:
    """This rank's ``input_costs.InputCosts``: the input pipeline's rate and its overlap with
    compute, and with the teacher cache its copy rates (``exchange``: measured by every rank at
    once beforehand, ``input_costs.exchange_seconds_per_byte``)."""
    d = cfg.data
    seconds = input_seconds(data, d.batch_size, cfg.run.seed, d.augment, batches)
    speed = shared_speed(data, d.batch_size, cfg.run.seed, d.augment, seconds, device)
    store, gather = copy_seconds_per_byte(device) if cached else (0.0, 0.0)
    return InputCosts(seconds, speed, store, gather, exchange if cached else 0.0)


def same_work(units: Sequence[Unit], specs: Sequence[BlockSpec], match: str) -> list[int]:
    """For each unit, the first unit whose student step is the same work: the same candidate on
    the same shapes, stride and loss (VGG16 has 13 blocks but 9 such shapes). Only those are timed
    ("measure a few, predict the rest"); every block's teacher prefix is still timed."""
    first: dict[tuple, int] = {}
    out = []
    for j, u in enumerate(units):
        b = specs[u.block]
        key = (u.candidate, b.in_shape, b.out_shape, b.stride, b.nonnegative_output, matches_activation(b, match))
        out.append(first.setdefault(key, j))
    return out


def timed_batches(most: int, share: float, train_steps: int, ranks: int, team_sizes: int) -> int:
    """Batches to time after the warm-up so that measuring stays within ``share`` of the
    distillation it plans, whatever the number of units or candidates: a measured batch steps
    every unit once per team size on every rank at once, the distillation steps every unit
    ``train_steps`` times spread over ``ranks``, so the ratio is (1 + timed) x team_sizes x ranks /
    train_steps. At least one, at most ``most``."""
    allowed = int(share * train_steps / (team_sizes * ranks)) - 1
    return max(1, min(most, allowed))


def with_validation(costs: Sequence[BlockCost], passes: float, shared_prefix: bool = True,
                    teacher_passes: float = 1.0) -> list[BlockCost]:
    """Fold the end-of-epoch validation into per-batch costs, spread over the epoch's steps, and
    charge the training teacher ``teacher_passes`` times per step (1/epochs when the teacher's
    activations are cached: one pass over the training set for the whole run, see
    ``teacher_cache.py``; validation is never cached: the student's output feeds the teacher).

    ``passes`` is validation batches per train step. Every block is checked with the teacher's
    prefix up to it shared by the blocks a rank validates together (``surgery.SwappedForward``), so
    a rank validating blocks B pays one prefix to its deepest block plus, per block, its student's
    forward and the rest of the network after it:
    passes x (max_B teacher[b] + sum_B (forward[b] + full - teacher[b])), with ``full`` the deepest
    block's prefix. That has the shape of ``rank_cost``, so it folds into the teacher and student
    terms exactly; for one block alone (the sequential schedule) it is one full pass. Without a
    shared prefix (``shared_prefix=False``) every block pays a full pass.
    """
    full = max(c.teacher for c in costs)
    if not shared_prefix:
        return [BlockCost(c.teacher * teacher_passes, c.student + passes * (full + c.forward), c.forward)
                for c in costs]
    return [BlockCost(c.teacher * (teacher_passes + passes), c.student + passes * (full - c.teacher + c.forward),
                      c.forward) for c in costs]



def mac_costs(blocks: Sequence[BlockSpec], students: Sequence[nn.Module], gmacs_per_s: float = 5.0) -> list[BlockCost]:
    """Estimate from MACs: teacher forward = prefix MACs; student step = 3x its forward MACs."""
    out = []
    for spec, student in zip(blocks, students):
        s_macs = total_macs(student, spec.in_shape)
        out.append(BlockCost(spec.prefix_macs / (gmacs_per_s * 1e9), 3 * s_macs / (gmacs_per_s * 1e9),
                             s_macs / (gmacs_per_s * 1e9)))
    return out




class Timer:
    """Times, on one device, the teacher forward up to each block, each student's train step and
    each student's forward without gradients, as the distiller runs them.

    The teacher is timed as the distiller runs it: one truncated pass taking every block's input and
    target (``BlockTap``, its copies included), or with ``tap_each_block`` (the sequential schedule)
    a pass of its own per block copying only that block's input and target. The first batch warms
    up; the median of the rest is kept. Students are trained on copies, so measuring never changes
    the blocks that are then distilled, with the BatchNorm (ghost batches when ``bn_groups`` > 1)
    and the loss (``match_activation``, see ``students.block_loss``) they train with.
    """

    def __init__(self, teacher: nn.Module, blocks: Sequence[BlockSpec], students: Sequence[nn.Module],
                 device: torch.device, bn_groups: int = 1, match_activation: Sequence[bool] | None = None,
                 tap_each_block: bool = False, prefixes: Sequence[BlockSpec] = ()) -> None:
        self.blocks, self.device, self.bn_groups = list(blocks), device, bn_groups
        teacher = teacher.to(device).eval()
        # every block whose teacher prefix is timed (the students' blocks, and ``prefixes``): candidates
        # share a block, and a student timed for several identical blocks stands for all of them
        unique = sorted({b.index: b for b in [*blocks, *prefixes]}.values(), key=lambda b: b.index)
        self.prefix_times: dict[int, dict[int, list[float]]] = {}
        self.taps = ([BlockTap(teacher, [b], TRAIN_FORMAT, self.now) for b in unique] if tap_each_block
                     else [BlockTap(teacher, unique, TRAIN_FORMAT, self.now)])
        self.layout = GhostLayout(bn_groups) if bn_groups > 1 else None
        self.students = [prepare_student(copy.deepcopy(s).to(device).to(memory_format=TRAIN_FORMAT).train(), None,
                                         self.layout) for s in students]
        self.optims = [torch.optim.RMSprop(s.parameters(), lr=1e-6) for s in self.students]
        self.matches = list(match_activation) if match_activation is not None else [False] * len(blocks)
        self.times: dict[int, dict[str, dict[int, list[float]]]] = {}  # student and forward, per student

    def now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def measure(self, batches: Sequence[torch.Tensor], members: Sequence[int] = (1,),
                block_major: bool = False) -> dict[int, list[BlockCost]]:
        """Costs per block for each team size in ``members``: what the busiest member of a team of
        that many ranks runs (its rows of each batch, ``plan.member_rows``, with its ghost batches).
        Sizes are interleaved batch by batch, so a machine whose speed drifts shifts every size
        alike and their ratios (``TeamModel.member_share``) stay sound. Students are stepped in the
        distiller's order: every student on one batch before the next, or with ``block_major``
        (cached and sequential schedules) one student through every batch before the next."""
        self.times = {m: {key: {j: [] for j in range(len(self.blocks))} for key in _STEP_FIELDS} for m in members}
        self.prefix_times = {m: {b.index: [] for tap in self.taps for b in tap.blocks} for m in members}
        kept = []
        for k, batch in enumerate(batches):
            for m in members:
                n = len(batch)
                pairs = self._teacher(k, m, batch[: member_rows(n, m, self.bn_groups)].to(self.device))
                if block_major:
                    kept.append((k, m, n, pairs))
                else:
                    for j in range(len(self.blocks)):
                        self._student(j, k, m, n, pairs)
        for j in range(len(self.blocks) if block_major else 0):
            for k, m, n, pairs in kept:
                self._student(j, k, m, n, pairs)
        return {m: [BlockCost(self.prefix_costs(m)[b.index], *(statistics.median(self.times[m][key][j])
                                                             for key in _STEP_FIELDS))
                    for j, b in enumerate(self.blocks)] for m in members}

    def _teacher(self, k: int, m: int, x: torch.Tensor) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        pairs = {}
        for tap in self.taps:
            t0 = self.now()
            pairs.update(tap(x))
            if k:
                for b in tap.blocks:
                    self.prefix_times[m][b.index].append(tap.stamps[b.index] - t0)
        return pairs

    def prefix_costs(self, members: int = 1) -> dict[int, float]:
        """The median teacher prefix per timed block (after ``measure``), by block index."""
        return {i: statistics.median(t) for i, t in self.prefix_times[members].items()}

    def _student(self, j: int, k: int, m: int, n: int, pairs: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """One timed train step and forward of student ``j`` on batch ``k`` (``n`` rows in all, the
        busiest member of an ``m``-rank team's share of them in ``pairs``)."""
        b, student, opt = self.blocks[j], self.students[j], self.optims[j]
        inp, target = pairs[b.index]
        if self.layout is not None:
            self.layout.set(n, range(math.ceil(self.bn_groups / m)))
        t0 = self.now()
        loss = block_loss(student(inp), target, self.matches[j])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        for bn in ghost_batchnorms(student):
            bn.apply_own()
        opt.step()
        t1 = self.now()
        student.eval()
        with torch.no_grad():
            student(inp)
        student.train()
        if k:
            self.times[m]["student"][j].append(t1 - t0)
            self.times[m]["forward"][j].append(self.now() - t1)


def measure_costs(teacher: nn.Module, blocks: Sequence[BlockSpec], students: Sequence[nn.Module],
                  batches: Sequence[torch.Tensor], device: torch.device, bn_groups: int = 1,
                  match_activation: Sequence[bool] | None = None, members: int = 1,
                  block_major: bool = False, tap_each_block: bool = False) -> list[BlockCost]:
    """``Timer.measure`` for one team size (``members`` = 1: a rank alone)."""
    timer = Timer(teacher, blocks, students, device, bn_groups, match_activation, tap_each_block)
    return timer.measure(batches, (members,), block_major)[members]
