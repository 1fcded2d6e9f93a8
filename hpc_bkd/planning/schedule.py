"""Schedules: in which order a rank steps its blocks, and what that order costs.

One small object per schedule owns every decision that used to be a string comparison spread over
the distiller, the cost measurement, the teacher cache and the benchmark:

* ``next_group``: which blocks take the next train step together;
* ``epoch_ends``: which blocks are validated now (together, one shared teacher prefix);
* ``block_major`` / ``tap_each_block``: the order the cost measurement times students and teacher
  in, so a prediction is timed the way the run will execute;
* ``may_cache`` / ``uses_cache``: whether the teacher's activations may be cached for it, and are;
* ``predicted_per_batch``: the plan's predicted seconds per batch under this schedule.

Torch-free: trainers are anything with ``spec.index``, ``epoch``, ``step``, ``steps``.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, TypeVar

from hpc_bkd.planning.planner import Plan


class _Spec(Protocol):
    @property
    def index(self) -> int: ...


class Stepped(Protocol):
    """What a schedule needs to know of a block being trained (``distill.BlockTrainer``)."""

    @property
    def spec(self) -> _Spec: ...
    @property
    def epoch(self) -> int: ...
    @property
    def step(self) -> int: ...
    @property
    def steps(self) -> int: ...


S = TypeVar("S", bound=Stepped)


def _ready(active: Sequence[S]) -> list[S]:
    return [t for t in active if t.step < t.steps]


class Schedule:
    """The PBKD schedule: every block at the earliest (epoch, step) steps together, sharing that
    batch's truncated teacher pass; blocks are validated as soon as their epoch ends."""

    name = "parallel"
    block_major = False      # the cost measurement times every student on a batch before the next
    tap_each_block = False   # one teacher pass serves every block's input and target
    may_cache = True         # the teacher cache may replace the per-batch teacher pass
    uses_cache = False       # this schedule trains from the teacher cache

    def next_group(self, active: Sequence[S]) -> list[S]:
        """The blocks that take the next train step together ([] when every block has ended its
        epoch)."""
        ready = _ready(active)
        if not ready:
            return []
        cursor = min((t.epoch, t.step) for t in ready)
        return [t for t in ready if (t.epoch, t.step) == cursor]

    def epoch_ends(self, active: Sequence[S], group: Sequence[S]) -> list[S]:
        """The blocks whose epoch ends now, to be validated together."""
        return [t for t in active if t.step >= t.steps]

    def predicted_per_batch(self, plan: Plan) -> float:
        """Predicted seconds per batch of the slowest rank."""
        return plan.makespan

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class CachedSchedule(Schedule):
    """PBKD with the teacher cache: there is no teacher pass left to share, so a rank steps one
    block at a time for a whole epoch, in index order (its weights and optimizer state stay in the
    CPU's caches; the blocks are bit-for-bit those of the parallel schedule). A block that ended its
    epoch waits, unchanged, until no block is left to step; then all are validated at once."""

    name = "parallel+cache"
    block_major = True
    uses_cache = True

    def next_group(self, active: Sequence[S]) -> list[S]:
        ready = _ready(active)
        return [min(ready, key=lambda t: (t.epoch, t.spec.index))] if ready else []

    def epoch_ends(self, active: Sequence[S], group: Sequence[S]) -> list[S]:
        return [] if group else super().epoch_ends(active, group)


class SequentialSchedule(Schedule):
    """The paper's schedule: one block at a time, each re-running its own teacher prefix."""

    name = "sequential"
    block_major = True
    tap_each_block = True
    may_cache = False

    def next_group(self, active: Sequence[S]) -> list[S]:
        ready = _ready(active)
        return [min(ready, key=lambda t: t.spec.index)] if ready else []

    def predicted_per_batch(self, plan: Plan) -> float:
        """Each block pays its own teacher prefix: a rank's cost is the sum of both terms."""
        return max((sum(plan.costs[b].teacher + plan.costs[b].student for b in owned)
                    for owned in plan.assignment), default=0.0)


def schedule_for(name: str, cached: bool = False) -> Schedule:
    """The schedule ``distill.schedule`` names, with the teacher cache in use or not."""
    if name == "sequential":
        return SequentialSchedule()
    if name != "parallel":
        raise ValueError(f"unknown schedule {name!r}: expected parallel or sequential")
    return CachedSchedule() if cached else Schedule()
