"""The records the stages of a job hand each other (in order of the stages): frozen, typed, and
the only thing that crosses from one stage to the next; ``stages`` runs them, ``report`` turns them
into the job record."""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

from torch import nn

from hpc_bkd.blocks.candidates import Unit
from hpc_bkd.blocks.surgery import BlockSpec
from hpc_bkd.distill.distiller import BlockResult
from hpc_bkd.planning.schedule import Schedule
from hpc_bkd.store.records import (
    Accuracy,
    CacheReport,
    CacheUse,
    Energy,
    FinetuneEpoch,
    ModelSizes,
)

T = TypeVar("T")


@dataclass
class Clock:
    """Rank 0's wall time per phase and the seconds spent in the job's broadcasts and gathers.
    (Mutable on purpose: it is a stopwatch that stages tick, not data that flows between them.)"""

    phases: dict[str, float] = field(default_factory=dict)
    comm: dict[str, float] = field(default_factory=lambda: {"broadcast_s": 0.0, "gather_s": 0.0})
    started: float = field(default_factory=time.time)
    _t: float = field(default_factory=time.perf_counter)

    def mark(self, name: str) -> None:
        now = time.perf_counter()
        self.phases[name] = self.phases.get(name, 0.0) + now - self._t
        self._t = now

    def collective(self, kind: str, call: Callable[[], T]) -> T:
        t0 = time.perf_counter()
        out = call()
        self.comm[kind] += time.perf_counter() - t0
        return out


@dataclass(frozen=True)
class TeacherShare:
    """What rank 0 broadcasts about the teacher (``interrupted``: it was stopped while training)."""

    state: dict | None = None
    info: dict | None = None
    val_acc: float = 0.0
    test_acc: float = 0.0
    blocks: list[BlockSpec] = field(default_factory=list)
    fingerprint: str = ""
    interrupted: bool = False
    units: list[Unit] = field(default_factory=list)  # every candidate for every block it fits (rank 0's)
    built: dict = field(default_factory=dict)  # the narrowed units rank 0 built finding them (whole_units)
    error: str = ""  # why no candidate fits (raised on every rank)


@dataclass(frozen=True)
class PreparedTeacher:
    """The frozen teacher on this rank, its blocks and the job's fingerprint."""

    model: nn.Module
    info: dict
    val_acc: float
    test_acc: float
    blocks: list[BlockSpec]
    fingerprint: str
    units: list[Unit] = field(default_factory=list)


@dataclass(frozen=True)
class ScheduleChoice:
    """The step order every rank follows and whether ranks cache the teacher's activations."""

    schedule: Schedule
    cache: CacheReport


@dataclass(frozen=True)
class Resume:
    """Units finished by an earlier run of this job, and which ranks can see each."""

    finished: list[int]
    seen: list[list[int]]  # per rank

    def remaining(self, units: list[Unit]) -> list[Unit]:
        return [u for u in units if u.id not in self.finished]

    def carried_by(self, rank: int) -> list[int]:
        """Finished units rank 0 cannot see that this rank forwards (the lowest rank seeing it)."""
        return [i for i in self.finished if i not in self.seen[0]
                and rank == min(r for r, s in enumerate(self.seen) if i in s)]


@dataclass(frozen=True)
class RankOutcome:
    """One rank's distillation, as gathered to rank 0."""

    rank: int
    host: str
    device: str
    threads: int
    blocks: list[int]
    results: list[BlockResult]
    carried: list[BlockResult]  # finished blocks of an earlier run that rank 0 cannot see
    interrupted: bool
    start: float
    end: float
    energy: Energy
    peak_mem_mb: float
    cache: CacheUse | None
    local_rank: int = 0
    data_wait_s: float = 0.0  # seconds the distillation loop waited for its batches
    bad_images: int = 0       # unreadable files skipped (data.on_bad_image: skip)
    heartbeat_cpu_s: float | None = None  # CPU seconds of this rank's heartbeat thread so far (None: no heartbeat)
    heartbeat_wall_s: float | None = None  # and the seconds it has run: the thread's share of a core is their ratio
    phases: list[list] = field(default_factory=list)  # [name, start, end] up to the gather (``progress``)
    work: list[list] = field(default_factory=list)    # [start, end, epoch, unit ids, steps] (``progress``)


@dataclass(frozen=True)
class StudentResult:
    """The assembled, fine-tuned student and what it scored."""

    model: nn.Module
    accepted: list[int]
    accuracy: Accuracy
    finetune: list[FinetuneEpoch]
    sizes: ModelSizes
    kl: dict[str, float] = field(default_factory=dict)  # KL(teacher || student) on validation: assembled, finetuned
    chosen_units: list[int] = field(default_factory=list)


