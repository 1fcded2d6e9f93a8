"""The run directory: the one owner of every file a job reads or writes under ``run.dir``.

Like submitit's ``JobPaths``: code asks a ``RunDir`` for a path instead of spelling file names,
so the layout below is written down once. The run directory also decides what may be resumed: a
finished block is reused only when the same job (the fingerprint of config, teacher and blocks)
wrote it; a finished block, checkpoint or cached teacher that cannot be read back is moved aside
(``NAME.damaged-<time>``, logged) and rebuilt, so that one bad file never fails every re-run.

    config.json            the resolved config of the last start
    teacher.pt             the trained (or loaded) teacher; teacher.partial.pt while it trains
    costs.json             the measured cost table (``costs.CostTable``)
    blocks/block-NNN-CANDIDATE.pt  a finished unit (block NNN's student of that candidate);
                           ...partial.pt while it trains
    finetune.partial.pt    fine-tuning progress
    student.pt             the assembled, fine-tuned student
    report.json            the job record (``records.JobRecord``); summary.txt, gantt.png, pareto.png
    export/                deployable files (``export``)
    progress/rank-NNNN.json  each rank's live progress (``progress``; read by ``hpc-bkd status``)
    tensorboard/           TensorBoard event files (``run.tracking: [tensorboard]``)
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import atomic_io
from .config import Config

if TYPE_CHECKING:
    from .candidates import Unit
    from .surgery import BlockSpec


_BLOCK_KEYS = ("fingerprint", "state_dict")


class RunDirConflict(RuntimeError):
    """The run directory holds blocks from a different job; refusing to overwrite them."""


@dataclass(frozen=True)
class RunDir:
    """Paths and resume rules of one run directory."""

    root: Path

    def __init__(self, root: str | Path) -> None:
        object.__setattr__(self, "root", Path(root))

    def __str__(self) -> str:
        return str(self.root)

    config = property(lambda self: self.root / "config.json")
    teacher = property(lambda self: self.root / "teacher.pt")
    teacher_partial = property(lambda self: self.root / "teacher.partial.pt")
    costs = property(lambda self: self.root / "costs.json")
    finetune_partial = property(lambda self: self.root / "finetune.partial.pt")
    student = property(lambda self: self.root / "student.pt")
    report = property(lambda self: self.root / "report.json")
    summary = property(lambda self: self.root / "summary.txt")
    gantt = property(lambda self: self.root / "gantt.png")
    pareto = property(lambda self: self.root / "pareto.png")
    export_dir = property(lambda self: self.root / "export")
    progress_dir = property(lambda self: self.root / "progress")
    tensorboard_dir = property(lambda self: self.root / "tensorboard")

    def progress(self, rank: int) -> Path:
        return self.progress_dir / f"rank-{rank:04d}.json"

    def block(self, unit: Unit, partial: bool = False) -> Path:
        return self.root / "blocks" / f"block-{unit.key}{'.partial' if partial else ''}.pt"

    def create(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------------ blocks and resume

    def finished_units(self, fingerprint: str, units: Sequence[Unit]) -> list[int]:
        """Ids of units already finished here by this same job; a unit of another job is a
        conflict (its results are never overwritten); a damaged one is moved aside (trained again).
        A job that adds candidates keeps every unit it already has."""
        done = []
        for unit in units:
            path = self.block(unit)
            if not path.is_file():
                continue
            saved = atomic_io.load_or_move_aside(path, f"unit {unit.key} is trained again", _BLOCK_KEYS)
            if saved is not None:
                self._check(saved, fingerprint, path)
                done.append(unit.id)
        return done

    def load_block(self, unit: Unit) -> dict[str, Any]:
        """A finished unit's record: ``fingerprint``, ``state_dict`` and ``metrics``."""
        return atomic_io.load(self.block(unit), _BLOCK_KEYS)

    def load_teacher_cache(self) -> dict[str, Any] | None:
        """The cached teacher's record (``state_dict``, ``identity``), or None when there is none
        or it is damaged (moved aside: the teacher is trained again)."""
        return atomic_io.load_or_move_aside(self.teacher, "the teacher is trained again", ("state_dict", "identity"))

    def save_block(self, unit: Unit, result: dict[str, Any]) -> None:
        """Write a finished unit and drop its unfinished checkpoint (in that order: a crash in
        between leaves the finished one, which wins)."""
        atomic_io.save(result, self.block(unit))
        self.block(unit, partial=True).unlink(missing_ok=True)

    def save_partial(self, unit: Unit, fingerprint: str, trainer_state: dict[str, Any]) -> None:
        atomic_io.save({"fingerprint": fingerprint, "trainer": trainer_state}, self.block(unit, partial=True))

    def load_partial(self, unit: Unit, fingerprint: str) -> dict[str, Any] | None:
        """An unfinished unit's trainer state, when this job saved one."""
        path = self.block(unit, partial=True)
        if not path.is_file():
            return None
        saved = atomic_io.load_or_move_aside(path, f"unit {unit.key} starts from its beginning",
                                             ("fingerprint", "trainer"))
        if saved is None:
            return None
        self._check(saved, fingerprint, path)
        return saved["trainer"]

    @staticmethod
    def _check(saved: dict[str, Any], fingerprint: str, path: Path) -> None:
        if saved.get("fingerprint") != fingerprint:
            raise RunDirConflict(
                f"{path} was written by a different job (config, teacher or blocks changed). "
                "Use a new run.dir, or delete that run's blocks/ folder to start over.")


@dataclass(frozen=True)
class BlockStore:
    """Where the distiller saves and resumes its blocks: one job's blocks in one run directory.
    The distiller only calls these; which files they become is the run directory's business."""

    run_dir: RunDir
    fingerprint: str

    def resume(self, unit: Unit) -> dict[str, Any] | None:
        return self.run_dir.load_partial(unit, self.fingerprint)

    def save_partial(self, unit: Unit, trainer_state: dict[str, Any]) -> None:
        self.run_dir.save_partial(unit, self.fingerprint, trainer_state)

    def save_finished(self, unit: Unit, result: dict[str, Any]) -> None:
        self.run_dir.save_block(unit, {"fingerprint": self.fingerprint, **result})


# distill keys that change how blocks are trained, never what they become
_NOT_IN_RESULT = ("checkpoint_interval_s", "schedule", "teacher_cache", "teacher_cache_gb", "team_backend")
# blocks keys that name the students: each unit's file name carries its candidate (``Unit.key``)
_IN_FILE_NAME = ("student_depth", "student_width", "candidates")


def job_fingerprint(cfg: Config, teacher_fp: str, blocks: Sequence[BlockSpec]) -> str:
    """What determines the trained blocks; a run directory is only resumed by the same job (how
    the teacher's activations are produced, cached or not, and in which order blocks are stepped
    do not change them; nor does which candidates are listed, or how one is chosen: adding a
    candidate trains only its units)."""
    d = cfg.distill
    settings = {k: v for k, v in vars(cfg.blocks).items() if k not in _IN_FILE_NAME}
    key = {"model": vars(cfg.model), "data": vars(cfg.data), "blocks": settings, "seed": cfg.run.seed,
           "distill": {k: v for k, v in vars(d).items() if k not in _NOT_IN_RESULT},
           "teacher": teacher_fp, "specs": [b.members for b in blocks]}
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
