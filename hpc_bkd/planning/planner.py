"""The plan: what each block costs and which rank trains which blocks.

Cost model. A rank that owns blocks B runs, per batch, one teacher pass as deep as its deepest block
and one train step per owned student, so its cost per batch is

    cost(B) = max_{b in B} teacher[b] + sum_{b in B} student[b]

where ``teacher[b]`` is the time of a teacher forward up to the end of block b (validation, which
has the same shape, is folded in by ``costs.with_validation``). The plan minimises
the makespan max_r cost(B_r): exactly by branch and bound when the search is small, else by LPT
(deepest block first, to the rank it raises least) followed by move/swap local search.

Hybrid plans (``plan.hybrid``) also consider splitting the ranks into k teams of near-equal size
(k = 1 .. ranks); a team of m ranks splits every batch m ways (see ``teams.py``), so its cost is
cost(B) times the measured share of its busiest member (about 1/m for long steps, more for short
ones), plus an allreduce overhead. The best layout over k wins; k = ranks is the pure block
split. This is what lets more ranks than blocks, or a dominant teacher prefix, still scale.
"""
from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any

from hpc_bkd.planning.inputs import NO_FEED, Feed


@dataclass(frozen=True)
class BlockCost:
    """Seconds per batch: teacher forward up to the end of this block, one student train step, and
    one student forward without gradients (what validating the block runs in the teacher's place)."""

    teacher: float
    student: float
    forward: float = 0.0


# Fraction added to a data-parallel team's measured compute (``TeamModel.member_share``) for its
# communication and for waiting on its slowest member at every step, calibrated with 2 CPU ranks on
# the default job. Whole-batch BatchNorm statistics (distill.bn_groups = 1) cost two host-staged
# allreduces per BatchNorm per step plus one for the gradients: a 2-rank team ran 1.6x its ideal
# time. Ghost batches (bn_groups > 1) need one allreduce per step for everything (``StepBucket``);
# what is left is mostly the members' step-to-step jitter: each waited 6 % of the run for the other.
TEAM_OVERHEAD_SYNC_BN = 0.6
TEAM_OVERHEAD_GHOST_BN = 0.08


def member_rows(batch: int, members: int, bn_groups: int = 1) -> int:
    """Rows of each batch that the busiest member of a ``members``-rank team works on: whole ghost
    batches (3 members of 4 groups hold 1, 1 and 2), else an even split."""
    if members <= 1:
        return batch
    if bn_groups > 1:
        return math.ceil(bn_groups / members) * batch // bn_groups
    return math.ceil(batch / members)


@dataclass(frozen=True)
class TeamModel:
    """What a data-parallel team of m ranks costs relative to one rank doing the same blocks.

    ``member_share[m]`` is the measured time of the busiest member of an m-rank team as a fraction
    of one rank's time for the same blocks (``measure_costs(..., members=m)``). It is above its share
    of the batch when steps are short, because per-op overheads do not shrink with the batch (a
    member's half batch takes more than half the full one's time, most so on narrow networks).
    Without a measurement (costs from a file or from MACs) the member's
    share of the batch is used, which is optimistic.
    """

    overhead: float = TEAM_OVERHEAD_SYNC_BN
    bn_groups: int = 1  # > 1: members hold whole ghost batches; teams of at most this many ranks
    member_share: dict[int, float] = field(default_factory=dict)

    @classmethod
    def for_groups(cls, bn_groups: int, member_share: dict[int, float] | None = None) -> TeamModel:
        return cls(TEAM_OVERHEAD_GHOST_BN if bn_groups > 1 else TEAM_OVERHEAD_SYNC_BN, bn_groups,
                   dict(member_share or {}))

    def allows(self, members: int) -> bool:
        return self.bn_groups == 1 or members <= self.bn_groups

    def share(self, members: int) -> float:
        """The busiest member's time as a fraction of one rank's, before communication: measured,
        else its share of the batch (in whole ghost batches)."""
        if members == 1:
            return 1.0
        if members in self.member_share:
            return self.member_share[members]
        g = self.bn_groups
        return math.ceil(g / members) / g if g > 1 else 1.0 / members

    def scale(self, members: int) -> float:
        """A team's seconds per batch as a multiple of one rank's: its busiest member's share
        plus the communication overhead."""
        return 1.0 if members == 1 else self.share(members) * (1 + self.overhead)

    def best_speedup(self, ranks: int) -> float:
        """The most ``ranks`` ranks can speed up one rank's work, overheads aside: ``ranks``, or
        more where a member's measured share is below its share of the batch."""
        return max([float(ranks)] + [ranks / (m * self.share(m)) for m in range(2, ranks + 1)
                                     if self.allows(m) and self.share(m) > 0])


@dataclass(frozen=True)
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
    teams: list[list[int]] = field(default_factory=list)  # ranks of each team; [[0], [1], ...] if pure

    def __post_init__(self) -> None:
        if not self.teams:
            object.__setattr__(self, "teams", [[r] for r in range(self.size)])

    def team_of(self, rank: int) -> int:
        return next(t for t, members in enumerate(self.teams) if rank in members)

    def owner(self, block: int) -> int:
        """The rank that reports a block: the first member of the team that trains it."""
        return next(members[0] for members in self.teams if block in self.assignment[members[0]])

    @property
    def hybrid(self) -> bool:
        return any(len(m) > 1 for m in self.teams)

    @property
    def idle_ranks(self) -> list[int]:
        return [r for r, blocks in enumerate(self.assignment) if not blocks]

    @property
    def predicted_speedup(self) -> float:
        return self.sequential / self.makespan if self.makespan > 0 else 1.0

    def for_blocks(self, indices: Sequence[int], costs: Sequence[BlockCost]) -> Plan:
        """This plan of a subset of blocks (planned as 0..n-1) in the job's block numbering, with
        every block's costs (a resumed job plans only the blocks left to train)."""
        assignment = [[indices[i] for i in owned] for owned in self.assignment]
        return replace(self, assignment=assignment, costs=list(costs))

    def json_extra(self) -> dict[str, Any]:
        """Derived figures written beside the fields for people reading ``report.json``."""
        return {"predicted_speedup": self.predicted_speedup, "idle_ranks": self.idle_ranks}

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {f.name: getattr(self, f.name) for f in fields(self)}
        d["costs"] = [vars(c) for c in self.costs]
        return {**d, **self.json_extra()}


def describe_plan(plan: Plan) -> list[str]:
    """The plan for people: its makespan and bound, then one line per team or rank."""
    lines = [f"plan ({plan.method}{', optimal' if plan.optimal else ''}): predicted makespan "
             f"{plan.makespan:.4f}s/batch, lower bound {plan.lower_bound:.4f}s, one rank {plan.sequential:.4f}s, "
             f"speedup {plan.predicted_speedup:.2f}x"]
    for members in plan.teams:
        owned, load = plan.assignment[members[0]], plan.predicted[members[0]]
        who = f"rank {members[0]}" if len(members) == 1 else f"ranks {members[0]}-{members[-1]} (team)"
        lines.append(f"  {who}: {load:.4f}s/batch  blocks {','.join(map(str, owned)) or '(idle)'}")
    return lines


def rank_cost(blocks: Sequence[int], costs: Sequence[BlockCost]) -> float:
    if not blocks:
        return 0.0
    return max(costs[b].teacher for b in blocks) + sum(costs[b].student for b in blocks)


def team_cost(blocks: Sequence[int], costs: Sequence[BlockCost], members: int, tm: TeamModel = TeamModel()) -> float:
    """Seconds per batch for a team of ``members`` ranks splitting every batch of ``blocks``."""
    return rank_cost(blocks, costs) * tm.scale(members)


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


def _lpt(costs: Sequence[BlockCost], sizes: Sequence[int], tm: TeamModel) -> list[list[int]]:
    order = sorted(range(len(costs)), key=lambda b: (-costs[b].teacher, -costs[b].student, b))
    bins: list[list[int]] = [[] for _ in sizes]
    for b in order:
        best = min(range(len(sizes)), key=lambda r: (team_cost(bins[r] + [b], costs, sizes[r], tm),
                                                     team_cost(bins[r], costs, sizes[r], tm), r))
        bins[best].append(b)
    return bins


def _span(bins: list[list[int]], costs: Sequence[BlockCost], sizes: Sequence[int], tm: TeamModel) -> tuple[float, float]:
    loads = sorted((team_cost(b, costs, m, tm) for b, m in zip(bins, sizes)), reverse=True)
    return loads[0], sum(loads)


def _local_search(bins: list[list[int]], costs: Sequence[BlockCost], sizes: Sequence[int], tm: TeamModel,
                  max_rounds: int = 200) -> list[list[int]]:
    """Move or swap single blocks off the slowest bin while the makespan drops."""
    for _ in range(max_rounds):
        current = _span(bins, costs, sizes, tm)
        slow = max(range(len(bins)), key=lambda r: team_cost(bins[r], costs, sizes[r], tm))
        improved = False
        for b, other in itertools.product(list(bins[slow]), range(len(bins))):
            if other == slow:
                continue
            for swap in [None, *bins[other]]:
                trial = [list(x) for x in bins]
                trial[slow].remove(b)
                trial[other].append(b)
                if swap is not None:
                    trial[other].remove(swap)
                    trial[slow].append(swap)
                if _span(trial, costs, sizes, tm) < current:
                    bins, improved = trial, True
                    break
            if improved:
                break
        if not improved:
            break
    return bins


def _exact(costs: Sequence[BlockCost], sizes: Sequence[int], tm: TeamModel, upper: float,
           node_limit: int) -> tuple[list[list[int]] | None, bool]:
    """Branch and bound, deepest block first; returns (best assignment or None, search completed)."""
    order = sorted(range(len(costs)), key=lambda b: (-costs[b].teacher, -costs[b].student))
    suffix_student = [0.0] * (len(order) + 1)
    for i in range(len(order) - 1, -1, -1):
        suffix_student[i] = suffix_student[i + 1] + costs[order[i]].student
    scale = [tm.scale(m) for m in sizes]
    capacity = sum(1.0 / s for s in scale)  # bins' total speed, in single-rank units
    best: list[list[int]] | None = None
    best_span = upper
    bins: list[list[int]] = [[] for _ in sizes]
    raw = [0.0] * len(sizes)  # single-rank seconds per batch of each bin's blocks
    nodes = 0

    def visit(i: int) -> bool:
        nonlocal best, best_span, nodes
        nodes += 1
        if nodes > node_limit:
            return False
        if i == len(order):
            span = max(r * s for r, s in zip(raw, scale))
            if span < best_span - 1e-12:
                best_span, best = span, [list(b) for b in bins]
            return True
        b = order[i]
        c = costs[b]
        tried_empty: set[int] = set()
        for r in sorted(range(len(sizes)), key=lambda r: raw[r] * scale[r]):
            if not bins[r]:
                if sizes[r] in tried_empty:
                    continue  # empty bins of the same size are interchangeable
                tried_empty.add(sizes[r])
            add = c.student + (c.teacher if not bins[r] else 0.0)
            if (raw[r] + add) * scale[r] >= best_span - 1e-12:
                continue
            if (sum(raw) + add + suffix_student[i + 1]) / capacity >= best_span - 1e-12:
                continue  # even a perfect spread of the remaining work cannot beat the best
            bins[r].append(b)
            raw[r] += add
            if not visit(i + 1):
                return False
            raw[r] -= add
            bins[r].pop()
        return True

    completed = visit(0)
    return best, completed


def team_layouts(ranks: int, blocks: int, hybrid: bool, teams: int | None = None) -> list[list[int]]:
    """Team sizes to consider: one rank per bin, and (hybrid) k near-equal teams, k = 1 .. ranks - 1
    (only k = ``teams`` when given)."""
    if hybrid and teams is not None:
        k = min(teams, ranks)
        return [sorted(((j + 1) * ranks // k - j * ranks // k for j in range(k)), reverse=True)]
    layouts = [[1] * ranks]
    if hybrid and ranks > 1:
        for k in range(1, ranks):
            sizes = sorted(((j + 1) * ranks // k - j * ranks // k for j in range(k)), reverse=True)
            if k <= blocks and sizes not in layouts:
                layouts.append(sizes)
    return layouts


def _assign(costs: list[BlockCost], sizes: list[int], tm: TeamModel, method: str, node_limit: int) -> tuple[list[list[int]], str, bool]:
    if len(sizes) == 1:
        return [list(range(len(costs)))], "trivial", True
    bins = _local_search(_lpt(costs, sizes, tm), costs, sizes, tm)
    used, optimal = "lpt+local", False
    if method in ("auto", "exact"):
        limit = node_limit if method == "auto" else max(node_limit, 5_000_000)
        exact, completed = _exact(costs, sizes, tm, _span(bins, costs, sizes, tm)[0] + 1e-9, limit)
        if exact is not None:
            bins = exact
        if completed:
            used, optimal = "exact", True
        elif method == "exact":
            used = "exact (node limit reached: best found)"
    return bins, used, optimal


def make_plan(costs: Sequence[BlockCost], ranks: int, method: str = "auto", hybrid: bool = False,
              teams: int | None = None, node_limit: int = 200_000, tm: TeamModel = TeamModel(),
              feed: Feed = NO_FEED) -> Plan:
    """Assign blocks to ``ranks`` ranks (or, if ``hybrid``, to teams of ranks) minimising the
    predicted makespan. ``tm`` says what teams cost and how large they may be; ``feed`` what the
    input pipeline adds: every busy rank waits for its input whatever it owns, so the feed is
    applied to each layout's best assignment (``Feed.bound`` is monotone: with equal teams it does
    not change which assignment is best)."""
    if ranks < 1:
        raise ValueError("ranks must be >= 1")
    n = len(costs)
    costs = list(costs)
    sequential = feed.bound(rank_cost(range(n), costs))
    if n == 0:
        return Plan(ranks, [[] for _ in range(ranks)], [0.0] * ranks, 0.0, 0.0, 0.0, "trivial", True, costs)
    best = None
    for sizes in team_layouts(ranks, n, hybrid, teams):
        if not all(tm.allows(m) for m in sizes):
            continue
        bins, used, optimal = _assign(costs, sizes, tm, method, node_limit)
        span = max(feed.bound(team_cost(b, costs, m, tm), m) for b, m in zip(bins, sizes))
        if best is None or span < best[0] - 1e-12:
            best = (span, sizes, bins, used, optimal)
    if best is None:
        raise ValueError(f"plan.teams={teams} makes teams larger than distill.bn_groups={tm.bn_groups} "
                         "(each member must hold whole ghost batches): raise bn_groups or the number of teams")
    _, sizes, bins, used, optimal = best
    # deterministic layout: biggest team first, then busiest bin first, so rank 0 (which also
    # fine-tunes) leads the heaviest work; teams take consecutive ranks (same node when possible)
    order = sorted(range(len(bins)), key=lambda t: (-sizes[t], -team_cost(bins[t], costs, sizes[t], tm), sorted(bins[t])))
    team_ranks: list[list[int]] = []
    assignment: list[list[int]] = []
    predicted: list[float] = []
    next_rank = 0
    for t in order:
        members = list(range(next_rank, next_rank + sizes[t]))
        next_rank += sizes[t]
        team_ranks.append(members)
        for _ in members:
            assignment.append(sorted(bins[t]))
            predicted.append(feed.bound(team_cost(bins[t], costs, sizes[t], tm), sizes[t]))
    makespan = max(predicted)
    bound = max(lower_bound(costs, ranks), feed.seconds)
    if hybrid and ranks > 1:
        bound = min(bound, max((max(c.teacher for c in costs) + sum(c.student for c in costs)) / tm.best_speedup(ranks),
                               feed.seconds / ranks))
    if math.isclose(makespan, bound, rel_tol=1e-9):
        optimal = True
    return Plan(ranks, assignment, predicted, makespan, bound, sequential, used, optimal, costs, team_ranks)
