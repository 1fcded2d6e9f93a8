"""``hpc-bkd status``: where a job stands, from its run directory alone.

No MPI and nothing from the running ranks: it reads the ranks' progress files (``progress``) and,
once the job is done, its report, so it is safe while the job runs and works on a login node.
A rank whose file says it is running but that has stopped rewriting it (its process is gone, when
it ran on this host; or nothing heard for ``LOST_AFTER`` intervals) is reported lost.
"""
from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hpc_bkd.errors import UserError
from hpc_bkd.store import atomic_io
from hpc_bkd.store.progress import DONE, FAILED, INTERRUPTED, RUNNING, RankProgressRecord, UnitProgress, read_progress
from hpc_bkd.store.records import JobRecord, JsonRecord
from hpc_bkd.store.rundir import RunDir

LOST_AFTER = 3.0      # log intervals without a rewrite after which a running rank counts as lost
LOST_AFTER_MIN_S = 30.0
RATE_FROM = 0.05      # below this share of its work done, a rank's time left comes from the plan


class NoJob(UserError, FileNotFoundError):
    """The run directory holds no job to report on (a user error: exit 2)."""


@dataclass(frozen=True)
class RankStatus:
    """One rank as its progress file shows it."""

    rank: int
    host: str
    state: str                     # running | done | interrupted | failed | lost
    phase: str
    units_done: int
    units_in_progress: int
    units_left: int
    epoch: str                     # the least advanced unit's epoch, "3/8"
    loss: float | None             # mean running loss of the units in progress
    fraction: float                # of this rank's distillation (unit-steps)
    distill_elapsed_s: float | None
    distill_left_s: float | None
    left_from: str                 # plan | rate | "" (how distill_left_s was predicted)
    predicted_distill_s: float | None
    quiet_s: float                 # seconds since the file was last rewritten
    units: list[UnitProgress] = field(default_factory=list)


@dataclass(frozen=True)
class JobStatus(JsonRecord):
    """What ``status`` prints (``--json``: this, as JSON)."""

    run_dir: str
    state: str                     # running | finished | interrupted | failed | stopped (killed or lost)
    phase: str                     # rank 0's phase
    size: int
    elapsed_s: float
    distill_left_s: float | None   # the slowest rank's predicted distillation time left
    lost_ranks: list[int]
    unseen_ranks: list[int]        # no progress file here (a node-local run directory on another node)
    ranks: list[RankStatus]
    final: dict[str, Any] | None = None  # the report's figures, once finished


def job_status(run_dir: str | Path, now: float | None = None) -> JobStatus:
    """The status of the job in ``run_dir`` (``NoJob`` when there is none)."""
    rd = RunDir(run_dir)
    now = time.time() if now is None else now
    if not rd.root.is_dir():
        raise NoJob(f"{rd.root} does not exist: no job has run there (give the job's run.dir with --run-dir)")
    files = read_progress(rd.progress_dir)
    report = _report(rd)
    if not files:
        if report is None:
            raise NoJob(f"{rd.root} has no progress files and no report.json: no job has run there "
                        "(or one is still starting: try again in a few seconds)")
        return JobStatus(str(rd.root), "finished", "done", report.world_size, report.wall_s, 0.0, [], [], [],
                         final_figures(report))
    size = next((f.size for f in files if f.rank == 0), max(f.size for f in files))
    ranks = [rank_status(f, now) for f in files if f.rank < size]
    states = {r.state for r in ranks}
    lost = [r.rank for r in ranks if r.state == "lost"]
    state = _job_state(states, len(lost) == len(ranks))
    started = min(f.started_at for f in files)
    ended = max(f.updated_at for f in files)
    root = next((r for r in ranks if r.rank == 0), ranks[0])
    lefts = [r.distill_left_s for r in ranks if r.distill_left_s is not None]
    final = final_figures(report) if state == "finished" and report is not None else None
    return JobStatus(str(rd.root), state, root.phase, size, (now if state == "running" else ended) - started,
                     max(lefts) if lefts and state == "running" else None, lost,
                     sorted(set(range(size)) - {r.rank for r in ranks}), ranks, final)


def _job_state(states: set[str], all_lost: bool) -> str:
    if FAILED in states:
        return "failed"
    if INTERRUPTED in states:
        return "interrupted"
    if all_lost:
        return "stopped"
    if states == {DONE}:
        return "finished"
    return "running"


def _report(rd: RunDir) -> JobRecord | None:
    if not rd.report.is_file():
        return None
    try:
        return JobRecord.load(rd.report)
    except (atomic_io.DamagedFile, KeyError, TypeError, ValueError):
        return None


def rank_status(f: RankProgressRecord, now: float) -> RankStatus:
    """One rank's figures; its time left from its measured rate once ``RATE_FROM`` of its work is
    done (the plan's prediction scaled by what is left before that)."""
    quiet = max(now - f.updated_at, 0.0)
    state = f.state
    if state == RUNNING and _gone(f, quiet):
        state = "lost"
    active = [u for u in f.units if not u.done]
    started = [u for u in active if u.epoch or u.step]
    total = sum(u.epochs * u.steps for u in f.units)
    fraction = sum(u.fraction * u.epochs * u.steps for u in f.units) / total if total else 0.0
    if f.phase == "distillation" and not f.units:
        fraction = 0.0
    elif f.distill_started_at is not None and f.phase not in ("distillation", "teacher cache fill", "exchange"):
        fraction = 1.0  # past its distillation (or had nothing to train)
    elapsed = (f.updated_at if state != RUNNING else now) - f.distill_started_at if f.distill_started_at else None
    left, source = _left(f, fraction, elapsed)
    losses = [u.loss for u in active if u.loss is not None]
    least = min(active, key=lambda u: (u.epoch, u.step), default=None)
    return RankStatus(
        f.rank, f.host, state, f.phase, len(f.units) - len(active), len(started), len(active) - len(started),
        f"{min(least.epoch + 1, least.epochs)}/{least.epochs}" if least is not None else "-",
        sum(losses) / len(losses) if losses else None, fraction, elapsed, left, source, f.predicted_distill_s, quiet,
        list(f.units))


def _left(f: RankProgressRecord, fraction: float, elapsed: float | None) -> tuple[float | None, str]:
    if f.state != RUNNING or fraction >= 1.0:
        return 0.0, ""
    if elapsed is not None and fraction >= RATE_FROM:
        return elapsed * (1.0 - fraction) / fraction, "rate"
    if f.predicted_distill_s is not None:
        return f.predicted_distill_s * (1.0 - fraction), "plan"
    return None, ""


def _gone(f: RankProgressRecord, quiet: float) -> bool:
    """A running rank that stopped: its process is gone (on this host), or its file went quiet."""
    if f.host == socket.gethostname():
        try:
            os.kill(f.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            pass  # alive, another user's
    return quiet > max(LOST_AFTER * f.log_interval_s, LOST_AFTER_MIN_S)


def final_figures(r: JobRecord) -> dict[str, Any]:
    """The finished job's headline figures."""
    a, m = r.accuracy, r.models
    out: dict[str, Any] = {
        "teacher_test_acc": a.teacher_test, "student_test_acc": a.student_after_finetune,
        "accepted_blocks": len(r.accepted_blocks), "blocks": len({b.index for b in r.blocks}),
        "teacher_params": m.teacher.params, "student_params": m.student.params,
        "teacher_macs": m.teacher.macs, "student_macs": m.student.macs,
        "distill_makespan_s": r.distill.makespan_s, "wall_s": r.wall_s, "finished_at": r.finished_at}
    if r.inference is not None:
        out["inference"] = r.inference.models.line
    return out


# ------------------------------------------------------------------------------ for people


def _duration(s: float | None) -> str:
    if s is None:
        return "-"
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def status_text(st: JobStatus) -> str:
    """The status as a few lines for a terminal or a log."""
    head = f"{st.run_dir}: {st.state}"
    if st.state == "running":
        head += f", phase {st.phase} (rank 0), elapsed {_duration(st.elapsed_s)}"
        if st.distill_left_s is not None:
            head += f", distillation left ~{_duration(st.distill_left_s)}"
    else:
        head += f" after {_duration(st.elapsed_s)}"
    lines = [head]
    if st.state == "stopped":
        lines.append("  no rank is running: the job was killed or its nodes were lost; run the same command "
                     "again to resume")
    if st.ranks:
        lines.append(f"{'rank':>4} {'host':<12} {'state':<11} {'phase':<20} {'units done/now/left':>19} "
                     f"{'epoch':>6} {'loss':>9} {'done':>5} {'left':>8}")
        for r in st.ranks:
            loss = f"{r.loss:9.5f}" if r.loss is not None else f"{'-':>9}"
            left = f"~{_duration(r.distill_left_s)}" + ("*" if r.left_from == "plan" else "")
            lines.append(f"{r.rank:>4} {r.host[:12]:<12} {r.state:<11} {r.phase[:20]:<20} "
                         f"{f'{r.units_done}/{r.units_in_progress}/{r.units_left}':>19} {r.epoch:>6} {loss} "
                         f"{100 * r.fraction:>4.0f}% {left if r.state == RUNNING and r.fraction < 1 else '-':>8}")
        if any(r.left_from == "plan" and r.state == RUNNING for r in st.ranks):
            lines.append("  * time left from the plan's predicted makespan (too little done yet to measure)")
    lines.append(f"lost ranks: {', '.join(map(str, st.lost_ranks)) or 'none'}"
                 + (f"; no progress file here for rank(s) {', '.join(map(str, st.unseen_ranks))} (run directory "
                    "not shared with their nodes?)" if st.unseen_ranks else ""))
    if st.final:
        f = st.final
        lines.append(f"result: test acc teacher {f['teacher_test_acc']:.2f}%, student {f['student_test_acc']:.2f}%; "
                     f"{f['accepted_blocks']}/{f['blocks']} blocks replaced; params {f['teacher_params']:,} -> "
                     f"{f['student_params']:,}; MACs {f['teacher_macs'] / 1e6:.1f}M -> {f['student_macs'] / 1e6:.1f}M")
        lines.append(f"time: distillation {_duration(f['distill_makespan_s'])}, job {_duration(f['wall_s'])} "
                     f"(finished {f['finished_at']}); details in {Path(st.run_dir) / 'summary.txt'}")
        if "inference" in f:
            lines.append(f"inference: {f['inference']}")
    return "\n".join(lines)
