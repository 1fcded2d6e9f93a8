"""The plan: what each block costs and which rank trains which blocks.

Cost model. A rank that owns blocks B runs, per batch, one teacher pass as deep as its deepest block
and one train step per owned student, so its cost per batch is

    cost(B) = max_{b in B} teacher[b] + sum_{b in B} student[b]

where ``teacher[b]`` is the time of a teacher forward up to the end of block b. The plan minimises
the makespan max_r cost(B_r): exactly by branch and bound when the search is small, else by LPT
(deepest block first, to the rank it raises least) followed by move/swap local search.
"""
from __future__ import annotations

import itertools
import json
import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .surgery import BlockSpec, BlockTap


@dataclass(frozen=True)
class BlockCost:
    """Seconds per batch: teacher forward up to the end of this block, and one student train step."""

    teacher: float
    student: float


@dataclass
class Plan:
    """Which blocks each rank trains, and what the cost model predicts."""

    size: int
    assignment: list[list[int]]     # per rank, the block indices it trains (empty = idle)
    predicted: list[float]          # per rank, predicted seconds per batch
    makespan: float                 # predicted seconds per batch of the slowest rank
    lower_bound: float              # no assignment can beat this
    sequential: float               # predicted seconds per batch of one rank doing everything
    method: str                     # exact | lpt+local | trivial
    optimal: bool
    costs: list[BlockCost] = field(default_factory=list)

    def owner(self, block: int) -> int:
        return next(r for r, blocks in enumerate(self.assignment) if block in blocks)

    @property
    def idle_ranks(self) -> list[int]:
        return [r for r, blocks in enumerate(self.assignment) if not blocks]

    @property
    def predicted_speedup(self) -> float:
        return self.sequential / self.makespan if self.makespan > 0 else 1.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["predicted_speedup"] = self.predicted_speedup
        d["idle_ranks"] = self.idle_ranks
        return d


def rank_cost(blocks: Sequence[int], costs: Sequence[BlockCost]) -> float:
    if not blocks:
        return 0.0
    return max(costs[b].teacher for b in blocks) + sum(costs[b].student for b in blocks)


def lower_bound(costs: Sequence[BlockCost], ranks: int) -> float:
    """Max of: the deepest block alone, and the total work spread perfectly (every rank pays at
    least the cheapest teacher prefix it could have)."""
    if not costs:
        return 0.0
    ranks = min(ranks, len(costs))
    single = max(c.teacher + c.student for c in costs)
    by_depth = sorted(c.teacher for c in costs)
    spread = (sum(c.student for c in costs) + max(by_depth) + sum(by_depth[: ranks - 1])) / ranks
    return max(single, spread)


def _lpt(costs: Sequence[BlockCost], ranks: int) -> list[list[int]]:
    order = sorted(range(len(costs)), key=lambda b: (-costs[b].teacher, -costs[b].student, b))
    bins: list[list[int]] = [[] for _ in range(ranks)]
    for b in order:
        best = min(range(ranks), key=lambda r: (rank_cost(bins[r] + [b], costs), rank_cost(bins[r], costs), r))
        bins[best].append(b)
    return bins


def _local_search(bins: list[list[int]], costs: Sequence[BlockCost], max_rounds: int = 200) -> list[list[int]]:
    """Move or swap single blocks off the slowest rank while the makespan drops."""
    def span(bs: list[list[int]]) -> tuple[float, float]:
        loads = sorted((rank_cost(b, costs) for b in bs), reverse=True)
        return loads[0], sum(loads)

    for _ in range(max_rounds):
        current = span(bins)
        slow = max(range(len(bins)), key=lambda r: rank_cost(bins[r], costs))
        improved = False
        for b, other in itertools.product(list(bins[slow]), range(len(bins))):
            if other == slow:
                continue
            candidates = [(None, None)] + [(o, None) for o in bins[other]]
            for swap, _ in candidates:
                trial = [list(x) for x in bins]
                trial[slow].remove(b)
                trial[other].append(b)
                if swap is not None:
                    trial[other].remove(swap)
                    trial[slow].append(swap)
                if span(trial) < current:
                    bins, improved = trial, True
                    break
            if improved:
                break
        if not improved:
            break
    return bins


def _exact(costs: Sequence[BlockCost], ranks: int, upper: float, node_limit: int) -> tuple[list[list[int]] | None, bool]:
    """Branch and bound, deepest block first; returns (best assignment or None, search completed)."""
    order = sorted(range(len(costs)), key=lambda b: (-costs[b].teacher, -costs[b].student))
    suffix_student = [0.0] * (len(order) + 1)
    for i in range(len(order) - 1, -1, -1):
        suffix_student[i] = suffix_student[i + 1] + costs[order[i]].student
    best: list[list[int]] | None = None
    best_span = upper
    bins: list[list[int]] = [[] for _ in range(ranks)]
    loads = [0.0] * ranks
    heads = [0.0] * ranks  # teacher prefix paid by each rank (set by its first, deepest block)
    nodes = 0

    def visit(i: int) -> bool:
        nonlocal best, best_span, nodes
        nodes += 1
        if nodes > node_limit:
            return False
        if i == len(order):
            span = max(loads)
            if span < best_span - 1e-12:
                best_span, best = span, [list(b) for b in bins]
            return True
        b = order[i]
        c = costs[b]
        empty_tried = False
        for r in sorted(range(ranks), key=lambda r: loads[r]):
            if not bins[r]:
                if empty_tried:
                    continue  # empty ranks are interchangeable
                empty_tried = True
            add = c.student + (c.teacher if not bins[r] else 0.0)
            if loads[r] + add >= best_span - 1e-12:
                continue
            # bound: remaining student work spread over all ranks
            if (sum(loads) + add + suffix_student[i + 1]) / ranks >= best_span - 1e-12:
                continue
            bins[r].append(b)
            loads[r] += add
            if not visit(i + 1):
                return False
            loads[r] -= add
            bins[r].pop()
        return True

    completed = visit(0)
    return best, completed


def make_plan(costs: Sequence[BlockCost], ranks: int, method: str = "auto", node_limit: int = 200_000) -> Plan:
    """Assign blocks to ``ranks`` ranks minimising the predicted makespan."""
    if ranks < 1:
        raise ValueError("ranks must be >= 1")
    n = len(costs)
    costs = list(costs)
    sequential = rank_cost(range(n), costs)
    bound = lower_bound(costs, ranks)
    if n == 0:
        return Plan(ranks, [[] for _ in range(ranks)], [0.0] * ranks, 0.0, 0.0, 0.0, "trivial", True, costs)
    if ranks == 1:
        bins, used, optimal = [list(range(n))], "trivial", True
    else:
        bins = _local_search(_lpt(costs, ranks), costs)
        used, optimal = "lpt+local", False
        if method in ("auto", "exact"):
            limit = node_limit if method == "auto" else max(node_limit, 5_000_000)
            exact, completed = _exact(costs, ranks, max(rank_cost(b, costs) for b in bins) + 1e-9, limit)
            if exact is not None:
                bins = exact
            if completed:
                used, optimal = "exact", True
            elif method == "exact":
                used = "exact (node limit reached: best found)"
    bins = [sorted(b) for b in bins]
    # deterministic layout: busiest rank first, so rank 0 (which also fine-tunes) gets the deepest
    bins.sort(key=lambda b: (-rank_cost(b, costs), b))
    bins += [[] for _ in range(ranks - len(bins))]
    predicted = [rank_cost(b, costs) for b in bins]
    makespan = max(predicted)
    if math.isclose(makespan, bound, rel_tol=1e-9):
        optimal = True
    return Plan(ranks, bins, predicted, makespan, bound, sequential, used, optimal, costs)


# ------------------------------------------------------------------------------------ costs


def costs_from_json(path: str | Path) -> list[BlockCost]:
    """Per-block costs from a file: a list of seconds, or of {"teacher": s, "student": s} objects."""
    raw = json.loads(Path(path).read_text())
    if isinstance(raw, dict) and "costs" in raw:
        raw = raw["costs"]
    if not isinstance(raw, list) or not raw:
        raise ValueError(f"{path}: expected a non-empty JSON list of per-block costs")
    out = []
    for i, item in enumerate(raw):
        if isinstance(item, (int, float)) and not isinstance(item, bool):
            out.append(BlockCost(0.0, float(item)))
        elif isinstance(item, dict) and {"teacher", "student"} <= set(item):
            out.append(BlockCost(float(item["teacher"]), float(item["student"])))
        else:
            raise ValueError(f"{path}: item {i} must be a number or an object with 'teacher' and 'student' "
                             f"seconds, got {item!r}")
        if out[-1].teacher < 0 or out[-1].student < 0:
            raise ValueError(f"{path}: item {i} has a negative cost")
    return out


def mac_costs(blocks: Sequence[BlockSpec], students: Sequence[nn.Module], gmacs_per_s: float = 5.0) -> list[BlockCost]:
    """Estimate from MACs: teacher forward = prefix MACs; student step = 3x its forward MACs."""
    from .surgery import total_macs

    out = []
    for spec, student in zip(blocks, students):
        s_macs = total_macs(student, spec.in_shape)
        out.append(BlockCost(spec.prefix_macs / (gmacs_per_s * 1e9), 3 * s_macs / (gmacs_per_s * 1e9)))
    return out


def measure_costs(teacher: nn.Module, blocks: Sequence[BlockSpec], students: Sequence[nn.Module],
                  batches: Sequence[torch.Tensor], device: torch.device) -> list[BlockCost]:
    """Time, on this device, the teacher forward up to each block and each student's train step.

    The first batch warms up; the median of the rest is kept. Students are trained on copies so
    measuring never changes the blocks that are then distilled.
    """
    import copy

    teacher = teacher.to(device).eval()
    stamps: dict[int, float] = {}
    handles = [teacher.get_submodule(b.members[-1]).register_forward_hook(
        lambda m, a, o, i=b.index: stamps.__setitem__(i, _now(device))) for b in blocks]
    teacher_times: dict[int, list[float]] = {b.index: [] for b in blocks}
    student_times: dict[int, list[float]] = {b.index: [] for b in blocks}
    tap = BlockTap(teacher, blocks)
    students = [copy.deepcopy(s).to(device).train() for s in students]
    optims = [torch.optim.RMSprop(s.parameters(), lr=1e-6) for s in students]
    try:
        for k, x in enumerate(batches):
            x = x.to(device)
            with torch.no_grad():
                t0 = _now(device)
                teacher(x)
            if k:
                for b in blocks:
                    teacher_times[b.index].append(stamps[b.index] - t0)
            for h in handles:
                h.remove()
            pairs = tap(x)
            handles = [teacher.get_submodule(b.members[-1]).register_forward_hook(
                lambda m, a, o, i=b.index: stamps.__setitem__(i, _now(device))) for b in blocks]
            for b, student, opt in zip(blocks, students, optims):
                inp, target = pairs[b.index]
                t0 = _now(device)
                loss = F.mse_loss(student(inp), target)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if k:
                    student_times[b.index].append(_now(device) - t0)
    finally:
        for h in handles:
            h.remove()
    return [BlockCost(statistics.median(teacher_times[b.index]), statistics.median(student_times[b.index]))
            for b in blocks]


def _now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()
