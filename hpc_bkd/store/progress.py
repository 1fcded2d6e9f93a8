"""Each rank's progress file: what ``hpc-bkd status`` reads while (and after) a job runs.

A batch job has no terminal to watch, so every rank keeps ``<run.dir>/progress/rank-NNNN.json``
up to date: its phase and the spans of the phases it went through, its units' cursors and losses,
what the plan predicted for it. The file is small and replaced atomically (``atomic_io``) at the
log's rate (``run.log_interval_s``) and at every phase change, so a reader never sees half a file
and the job never waits on its readers: ``status`` needs no MPI and nothing from the running ranks.
A thread of its own rewrites it at that rate also during long phases without steps (the teacher's
training, fine-tuning), so a file that stops changing means a rank that stopped.

The spans also travel to rank 0 in the gather (``RankOutcome.phases``/``work``): they are what the
report's schedule picture (``report.gantt``) draws for every rank.
"""
from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hpc_bkd.store import atomic_io
from hpc_bkd.store.records import JsonRecord

PROGRESS_VERSION = 1
RUNNING, DONE, INTERRUPTED, FAILED = "running", "done", "interrupted", "failed"


@dataclass(frozen=True)
class UnitProgress:
    """One unit's cursor: ``epoch`` epochs closed of ``epochs``, ``step`` of ``steps`` into the next;
    ``loss`` is the running mean of the open epoch (or the last closed one's)."""

    key: str
    block: int
    epoch: int
    epochs: int
    step: int
    steps: int
    loss: float | None = None
    done: bool = False

    @property
    def fraction(self) -> float:
        if self.done:
            return 1.0
        return min((self.epoch * self.steps + self.step) / max(self.epochs * self.steps, 1), 1.0)


@dataclass(frozen=True)
class RankProgressRecord(JsonRecord):
    """The content of one rank's progress file."""

    version: int
    rank: int
    size: int
    host: str
    pid: int
    started_at: float
    updated_at: float
    state: str                       # running | done | interrupted | failed
    phase: str                       # the phase now (the last one, once the rank is no longer running)
    phases: list[list[Any]]          # [name, start, end] per phase, end None while it runs
    log_interval_s: float
    units: list[UnitProgress] = field(default_factory=list)
    units_total: int = 0             # units this rank was given (finished ones of earlier runs not counted)
    predicted_distill_s: float | None = None  # the plan's predicted distillation seconds for this rank
    distill_started_at: float | None = None


def compress_ids(ids: Sequence[int]) -> str:
    """``0-3,7,9-10``: a rank's units, short enough for a label or a status line."""
    out: list[str] = []
    ids = sorted(ids)
    i = 0
    while i < len(ids):
        j = i
        while j + 1 < len(ids) and ids[j + 1] == ids[j] + 1:
            j += 1
        out.append(str(ids[i]) if i == j else f"{ids[i]}-{ids[j]}")
        i = j + 1
    return ",".join(out)


class RankProgress:
    """This rank's progress file, and the timeline of its phases and of its distillation work.

    Mutable on purpose, like ``pipeline.Clock``: stages tick it. Until ``attach`` gives it a path it
    keeps the timeline without writing a file, so a job refused at its checks leaves none behind.
    """

    def __init__(self, rank: int, size: int, log_interval_s: float) -> None:
        self.path: Path | None = None  # set by ``attach``: until then the timeline is kept in memory only
        self.rank, self.size, self.interval = rank, size, log_interval_s
        self.started = time.time()
        self.phases: list[list[Any]] = []
        self.work: list[list[Any]] = []  # [start, end, epoch, unit ids, steps] per stretch of one group
        self.units: list[UnitProgress] = []
        self.units_total = 0
        self.predicted_distill_s: float | None = None
        self.distill_started: float | None = None
        self._last_write = 0.0
        self._host = socket.gethostname()
        self._lock = threading.Lock()  # the main thread's phases against the writer thread's copy of them
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _beat(self) -> None:
        while not self._stop.wait(self.interval):
            self.write()

    def attach(self, path: Path | None) -> None:
        """Write the file at ``path`` from now on: called once the run directory is known to be
        this job's, so that a job refused there leaves nothing behind (not even its progress)."""
        self.path = path
        if self._thread is None and path is not None:
            self._thread = threading.Thread(target=self._beat, name="hpc_bkd-progress", daemon=True)
            self._thread.start()
        self.write(force=True)

    # ------------------------------------------------------------------ phases

    def phase(self, name: str) -> None:
        """Close the open phase and open ``name`` (the file is written at once: a phase change is
        what a watcher most wants to see)."""
        now = time.time()
        with self._lock:
            if self.phases and self.phases[-1][2] is None:
                self.phases[-1][2] = now
            self.phases.append([name, now, None])
        if name == "distillation" and self.distill_started is None:
            self.distill_started = now
        self.write(force=True)

    def split_last(self, name: str, seconds: float) -> None:
        """The last ``seconds`` of the open phase were ``name`` (a part timed inside it: a team's
        exchange of the cache rows ends its fill)."""
        if not self.phases or seconds <= 0:
            return
        now = time.time()
        with self._lock:
            self.phases[-1][2] = max(self.phases[-1][1], now - seconds)
            self.phases.append([name, self.phases[-1][2], None])

    @property
    def current(self) -> str:
        return self.phases[-1][0] if self.phases else "start"

    def spans(self) -> list[list[Any]]:
        """Closed copies of the phases (the open one ends now)."""
        now = time.time()
        with self._lock:
            return [[n, s, e if e is not None else now] for n, s, e in self.phases]

    # ------------------------------------------------------------------ distillation

    def plan(self, predicted_s_per_batch: float, steps: int, epochs: int, units: int) -> None:
        """What the plan predicts for this rank's distillation (seconds per batch x batches)."""
        self.predicted_distill_s = predicted_s_per_batch * steps * epochs
        self.units_total = units

    def worked_on(self, epoch: int, ids: list[int], start: float, end: float) -> None:
        """One step of the units ``ids`` in (1-based) ``epoch``: extends the current stretch of work,
        or starts the next one."""
        last = self.work[-1] if self.work else None
        if last is not None and last[2] == epoch and last[3] == ids:
            last[1] = end
            last[4] += 1
        else:
            self.work.append([start, end, epoch, ids, 1])

    def due(self) -> bool:
        """Whether the log's interval has passed since the file was last written."""
        return time.time() - self._last_write >= self.interval

    def units_now(self, units: Sequence[UnitProgress]) -> None:
        """Record the units' cursors (the distiller builds them) and write the file."""
        self.units = list(units)
        self.write(force=True)

    # ------------------------------------------------------------------ the file

    def record(self, state: str = RUNNING) -> RankProgressRecord:
        with self._lock:
            phases = [list(p) for p in self.phases]
        return RankProgressRecord(
            PROGRESS_VERSION, self.rank, self.size, self._host, os.getpid(), self.started, time.time(), state,
            phases[-1][0] if phases else "start", phases, self.interval, list(self.units), self.units_total,
            self.predicted_distill_s, self.distill_started)

    def write(self, force: bool = False, state: str = RUNNING) -> None:
        """Replace the file atomically; a failure to write it is never the job's failure."""
        now = time.time()
        if self.path is None or (not force and now - self._last_write < self.interval * 0.9):
            return
        self._last_write = now
        try:
            atomic_io.write_json(self.path, self.record(state).to_json())
        except OSError:
            pass  # a full or read-only disk: the job's own files say so where it matters

    def finish(self, state: str) -> None:
        """The rank's last word: ``state`` (done, interrupted, failed); the writer thread stops."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5.0)
        with self._lock:
            if self.phases and self.phases[-1][2] is None:
                self.phases[-1][2] = time.time()
        self.write(force=True, state=state)


def read_progress(folder: Path) -> list[RankProgressRecord]:
    """Every readable rank file under ``folder`` (one being replaced right now is read next time)."""
    out = []
    for path in sorted(folder.glob("rank-*.json")):
        try:
            out.append(RankProgressRecord.from_json(atomic_io.load_json(path)))
        except (atomic_io.DamagedFile, FileNotFoundError, TypeError, KeyError):
            continue
    return out
