"""The schedule picture (``gantt.png``): per rank, its phases and what it worked on over time.

A bar per unit says nothing under the parallel schedule (every unit of a rank trains from the
first step to the last), so each rank gets two rows instead: its phases (data, teacher, cost
timing, teacher cache fill, exchange, distillation, idle, gather, rank 0's finishing stages) and,
under the distillation, its stretches of work: which units it stepped in which epoch (one box per
epoch under the parallel schedule, one per unit and epoch under the sequential one). Labels are
written only where they fit, so the picture stays readable from 1 rank x 26 units to 8 ranks x
100 units. The phases come from each rank's progress timeline (``progress``), gathered to rank 0.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from hpc_bkd.store import atomic_io
from hpc_bkd.store.progress import compress_ids

if TYPE_CHECKING:
    from hpc_bkd.store.records import JobRecord

COLORS = {"data": "#d9d9d9", "teacher": "#c7a77c", "cost timing": "#f4a259", "plan": "#f6d55c",
          "teacher cache fill": "#9b7fd1", "exchange": "#e07bb3", "distillation": "#6fbf73", "idle": "#ffffff",
          "gather": "#5b8def", "waiting for rank 0": "#eeeeee", "finish": "#8fa8c8"}
FINISH_STAGES = ("select", "assemble", "finetune", "evaluate", "inference", "export")
_WIDTH_IN, _DPI, _CHAR_PX = 13.0, 120, 6.8  # _CHAR_PX: a 7-point character's width at 120 dpi


def rank_segments(record: JobRecord) -> dict[int, list[tuple[str, float, float]]]:
    """Per rank, (phase, start, end) in seconds since the job's first phase: each rank's own phases
    up to its distillation's end, idle until the slowest rank's, the gather, then rank 0's
    finishing stages (from its clock) while the others wait for it."""
    own = {r.rank: [(str(n), float(s), float(e)) for n, s, e in r.phases] for r in record.ranks}
    for r in record.ranks:  # reports from before the timeline: the distillation from the blocks' spans
        if not own[r.rank]:
            own[r.rank] = [("distillation", record.distill.start, record.distill.start + r.busy_s)]
    t0 = min(s for segs in own.values() for _, s, _ in segs)
    ends = {rank: _distill_end(segs) for rank, segs in own.items()}
    last = max(ends.values())
    root = own.get(0, [])
    gather_end = max([e for n, _, e in root if n == "gather"] + [last])
    out: dict[int, list[tuple[str, float, float]]] = {}
    finish = _finish_stages(record, gather_end)
    done = finish[-1][2] if finish else gather_end
    for rank, segs in own.items():
        kept = [seg for seg in segs if seg[1] < ends[rank] and seg[0] not in ("gather", "finish")]
        rows = [(n, s, min(e, ends[rank])) for n, s, e in kept]
        rows += [("idle", ends[rank], last), ("gather", last, gather_end)]
        rows += finish if rank == 0 else [("waiting for rank 0", gather_end, done)]
        out[rank] = [(n, s - t0, e - t0) for n, s, e in rows if e > s]
    return out


def _distill_end(segs: list[tuple[str, float, float]]) -> float:
    ends = [e for n, _, e in segs if n not in ("gather", "finish", "waiting for rank 0")]
    return max(ends)


def _finish_stages(record: JobRecord, start: float) -> list[tuple[str, float, float]]:
    out, t = [], start
    for name in FINISH_STAGES:
        seconds = record.phases_s.get(name, 0.0)
        if seconds > 0:
            out.append((name, t, t + seconds))
            t += seconds
    return out


def work_boxes(record: JobRecord, t0: float) -> dict[int, list[tuple[float, float, list[str], int, int]]]:
    """Per rank, (start, end, labels from the longest, colour key, epoch) of each stretch of
    distillation steps: the colour is the unit's when one unit was stepped alone."""
    out: dict[int, list[tuple[float, float, list[str], int, int]]] = {}
    for r in record.ranks:
        boxes = []
        for w in r.work:
            start, end, epoch, ids = float(w[0]), float(w[1]), int(w[2]), list(w[3])
            labels = ([f"unit {ids[0]} epoch {epoch}", f"u{ids[0]} e{epoch}", f"u{ids[0]}"] if len(ids) == 1 else
                      [f"epoch {epoch}: units {compress_ids(ids)}", f"epoch {epoch}", f"e{epoch}"])
            boxes.append((start - t0, end - t0, labels, ids[0] if len(ids) == 1 else -epoch, epoch))
        out[r.rank] = boxes
    return out


def _epochs(boxes: list[tuple[float, float, list[str], int, int]]) -> list[tuple[int, float, float]]:
    """(epoch, start, end) of each epoch made of several stretches (one unit after another)."""
    spans: dict[int, list[float]] = {}
    count: dict[int, int] = {}
    for s, e, _, _, epoch in boxes:
        span = spans.setdefault(epoch, [s, e])
        span[0], span[1] = min(span[0], s), max(span[1], e)
        count[epoch] = count.get(epoch, 0) + 1
    return [(k, s, e) for k, (s, e) in sorted(spans.items()) if count[k] > 1]


def draw(record: JobRecord, path: Path) -> None:
    """Write the schedule picture of ``record`` to ``path`` (PNG)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    segments = rank_segments(record)
    cache = record.teacher_cache is not None and record.teacher_cache.use
    t0 = min(float(s) for r in record.ranks for _, s, _ in r.phases) if any(r.phases for r in record.ranks) \
        else record.distill.start
    boxes = work_boxes(record, t0)
    ranks = sorted(segments)
    span = max(e for segs in segments.values() for _, _, e in segs) or 1.0
    fig, ax = plt.subplots(figsize=(_WIDTH_IN, 1.6 + 0.8 * len(ranks)))
    px_per_s = _WIDTH_IN * 0.78 * _DPI / span
    seen: dict[str, Any] = {}
    for k, rank in enumerate(ranks):
        y = 2 * k
        for name, s, e in segments[rank]:
            color = COLORS.get(name, COLORS["finish"])
            seen.setdefault(name if name in COLORS else "finish (select, assemble, fine-tune, ...)", color)
            ax.barh(y, e - s, left=s, height=0.8, color=color, edgecolor="#555555", linewidth=0.4,
                    hatch="//" if name in ("idle", "waiting for rank 0") else None)
            _label(ax, [name], s, e, y, px_per_s)
        for s, e, labels, key, _ in boxes.get(rank, []):
            fill = plt.get_cmap("tab20")(key % 20) if key >= 0 else ("#6fbf73" if key % 2 else "#a5d6a7")
            ax.barh(y + 0.9, e - s, left=s, height=0.8, color=fill, edgecolor="#2e7d32", linewidth=0.4)
            _label(ax, labels, s, e, y + 0.9, px_per_s)
        for epoch, s, e in _epochs(boxes.get(rank, [])):  # units stepped one after another: mark each epoch
            ax.plot([s, s, e, e], [y + 1.38, y + 1.45, y + 1.45, y + 1.38], color="#2e7d32", lw=0.6)
            _label(ax, [f"epoch {epoch}", f"e{epoch}", f"{epoch}"], s, e, y + 1.58, px_per_s, size=6)
        row = next(r for r in record.ranks if r.rank == rank)
        units = compress_ids(row.blocks) or "none"
        ax.text(1.005, 1 - (y + 0.9 + 0.5) / (2 * len(ranks)), f"{len(row.blocks)} unit(s): "
                f"{units if len(units) <= 28 else units[:27] + '…'}", transform=ax.transAxes, fontsize=7,
                va="center")
    ax.set_yticks([2 * k + t for k in range(len(ranks)) for t in (0, 0.9)])
    ax.set_yticklabels([f"rank {r} {t}" for r in ranks for t in ("phases", "work")], fontsize=8)
    ax.set_ylim(2 * len(ranks) - 0.5, -0.6)
    ax.set_xlim(0, span * 1.01)
    ax.set_xlabel("seconds since the job started")
    ax.set_title(f"{record.config.model.arch}: {len(record.blocks)} units on {len(ranks)} rank(s) "
                 f"({record.config.distill.schedule} schedule"
                 f"{', teacher cache: units stepped one after another' if cache else ''})", fontsize=10)
    ax.legend(handles=[Patch(facecolor=c, edgecolor="#555555", label=n,
                             hatch="//" if n in ("idle", "waiting for rank 0") else None) for n, c in seen.items()],
              loc="upper center", bbox_to_anchor=(0.5, -0.5 / (1 + 0.5 * len(ranks))), ncol=6, fontsize=7,
              frameon=False)
    atomic_io.savefig(fig, path)
    plt.close(fig)


def _label(ax: Any, texts: list[str], start: float, end: float, y: float, px_per_s: float, size: int = 7) -> None:
    """The longest of ``texts`` that fits in the middle of a bar (the last one shortened, or nothing)."""
    room = (end - start) * px_per_s / (_CHAR_PX * size / 7) - 1
    text = next((t for t in texts if len(t) <= room), texts[-1][:max(int(room) - 1, 0)] + "…")
    if room >= 2 and len(text) > 1:
        ax.text((start + end) / 2, y, text, ha="center", va="center", fontsize=size)
