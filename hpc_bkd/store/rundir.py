"""The run directory: the one owner of every file a job reads or writes under ``run.dir``.

Like submitit's ``JobPaths``: code asks a ``RunDir`` for a path instead of spelling file names,
so the layout below is written down once. The run directory also decides what may be resumed: a
finished block is reused only when the same job (the fingerprint of config, teacher and blocks)
wrote it; a finished block, checkpoint or cached teacher that cannot be read back is moved aside
(``NAME.damaged-<time>``, logged) and rebuilt, so that one bad file never fails every re-run.
A file is also trusted only for what it says it holds, not for its name: a finished block carries
its block index, name, candidate, tensor shapes and a checksum of its weights, and one that does
not match the unit it is read for (a file copied over another) is damaged in the same way. And a
job that is not the one whose blocks are here is refused before it writes anything
(``check_same_job``), and only one job at a time works here (``runlock``).

    job.lock               the lock the running job holds (``runlock``), empty when none runs
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
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hpc_bkd.config import Config, config_from_saved
from hpc_bkd.errors import UserError
from hpc_bkd.store import atomic_io

if TYPE_CHECKING:
    from hpc_bkd.blocks.candidates import Unit
    from hpc_bkd.blocks.surgery import BlockSpec


log = logging.getLogger("hpc_bkd")
_BLOCK_KEYS = ("fingerprint", "state_dict")


@dataclass(frozen=True)
class UnitShape:
    """What a unit's finished file must hold: its block's name and its student's tensor shapes."""

    name: str
    shapes: dict[str, tuple[int, ...]]


class RunDirConflict(UserError, RuntimeError):
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

    def has_blocks(self) -> bool:
        """Whether a job has left blocks here (finished or not): results a new job must not mix with."""
        return any((self.root / "blocks").glob("block-*.pt"))

    def check_same_job(self, cfg: Config) -> None:
        """Before anything is written: when blocks are here, ``cfg`` must be the job that wrote
        them, as far as config.json tells (the teacher's weights are checked once known, by the
        job fingerprint). A refused job so changes nothing: no teacher retrained over the cached
        one, no config.json of another job beside the blocks."""
        if not self.has_blocks() or not self.config.is_file():
            return
        try:
            saved = config_from_saved(atomic_io.load_json(self.config))
        except (atomic_io.DamagedFile, ValueError):
            return  # cannot tell from it: the job fingerprint decides
        changed = _changed_keys(job_settings(saved), job_settings(cfg))
        if changed:
            raise RunDirConflict(
                f"{self.root} holds blocks of a different job (changed: {'; '.join(changed[:6])}). Nothing "
                "was written. Use a new run.dir, or delete that run's blocks/ folder to start over.")

    # ------------------------------------------------------------------ blocks and resume

    def finished_units(self, fingerprint: str, units: Sequence[Unit],
                       expect: Callable[[Unit], UnitShape] | None = None) -> list[int]:
        """Ids of units already finished here by this same job; a unit of another job is a
        conflict (its results are never overwritten); a damaged one is moved aside (trained again),
        and so is one that holds another unit than its name says (``expect``: the block name and
        tensor shapes of a unit's student). A job that adds candidates keeps every unit it already has."""
        done = []
        for unit in units:
            path = self.block(unit)
            if not path.is_file():
                continue
            then = f"unit {unit.key} is trained again"
            saved = atomic_io.load_or_move_aside(path, then, _BLOCK_KEYS)
            if saved is None:
                continue
            self._check(saved, fingerprint, path)
            problem = unit_mismatch(saved, unit, expect(unit) if expect is not None else None)
            if problem:
                _set_aside(path, problem, then)
                continue
            done.append(unit.id)
        return done

    def load_block(self, unit: Unit) -> dict[str, Any]:
        """A finished unit's record: ``fingerprint``, ``state_dict`` and ``metrics``."""
        return atomic_io.load(self.block(unit), _BLOCK_KEYS)

    def load_teacher_cache(self) -> dict[str, Any] | None:
        """The cached teacher's record (``state_dict``, ``identity``), or None when there is none
        or it is damaged (moved aside: the teacher is trained again); weights that do not match
        the checksum saved with them are damaged."""
        then = "the teacher is trained again"
        saved = atomic_io.load_or_move_aside(self.teacher, then, ("state_dict", "identity"))
        if saved is not None and _bad_checksum(saved):
            _set_aside(self.teacher, "its weights do not match the checksum saved with them", then)
            return None
        return saved

    def save_teacher_cache(self, state: dict[str, Any], identity: dict[str, Any]) -> None:
        atomic_io.save({"state_dict": state, "identity": identity, "checksum": atomic_io.state_checksum(state)},
                       self.teacher)

    def save_block(self, unit: Unit, result: dict[str, Any]) -> None:
        """Write a finished unit and drop its unfinished checkpoint (in that order: a crash in
        between leaves the finished one, which wins)."""
        atomic_io.save(result, self.block(unit))
        self.block(unit, partial=True).unlink(missing_ok=True)

    def save_partial(self, unit: Unit, fingerprint: str, trainer_state: dict[str, Any]) -> None:
        atomic_io.save({"fingerprint": fingerprint, "unit": unit.key, "trainer": trainer_state},
                       self.block(unit, partial=True))

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
        if saved.get("unit", unit.key) != unit.key:  # older versions did not say
            _set_aside(path, f"it holds unit {saved['unit']}'s checkpoint, not unit {unit.key}'s",
                       f"unit {unit.key} starts from its beginning")
            return None
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
        self.run_dir.save_block(unit, {"fingerprint": self.fingerprint, **result, **block_identity(result["state_dict"])})


def block_identity(state: dict[str, Any]) -> dict[str, Any]:
    """What a finished block's file says about its weights (its metrics say which unit it is)."""
    return {"shapes": {k: list(v.shape) for k, v in state.items()}, "checksum": atomic_io.state_checksum(state)}


def unit_mismatch(saved: dict[str, Any], unit: Unit, expect: UnitShape | None) -> str:
    """Why a finished block's record is not ``unit``'s ("" when it is): another block or candidate
    by its own metrics, other tensor shapes than ``unit``'s student, or weights that no longer
    match their checksum. Records of older versions lack the checksum, which is then not checked."""
    metrics = saved.get("metrics") or {}
    index, name, kind = metrics.get("index"), metrics.get("name"), metrics.get("candidate")
    if index is not None and index != unit.block or kind and kind != unit.candidate:
        wanted = f"{expect.name}, " if expect is not None else ""
        return (f"it holds block {index} ({name}, candidate {kind}), not block {unit.block} "
                f"({wanted}candidate {unit.candidate})")
    if expect is not None and name is not None and name != expect.name:
        return f"it holds block {name}, not block {unit.block} ({expect.name})"
    if not isinstance(saved["state_dict"], dict):
        return "its state_dict is not a mapping of tensors"
    if expect is not None:
        shapes = {k: tuple(getattr(v, "shape", ())) for k, v in saved["state_dict"].items()}
        if shapes != expect.shapes:
            wrong = sorted(set(shapes) ^ set(expect.shapes)) or [k for k in shapes if shapes[k] != expect.shapes[k]]
            return (f"its tensors do not fit unit {unit.key}'s student (e.g. {wrong[0]}: "
                    f"{shapes.get(wrong[0])} vs {expect.shapes.get(wrong[0])})")
    if _bad_checksum(saved):
        return "its weights do not match the checksum saved with them"
    return ""


def _bad_checksum(saved: dict[str, Any]) -> bool:
    return "checksum" in saved and saved["checksum"] != atomic_io.state_checksum(saved["state_dict"])


def _set_aside(path: Path, problem: str, then: str) -> None:
    """A file that reads back but is not what its name says: damaged, handled like a truncated one."""
    damaged = atomic_io.DamagedFile(path, problem)
    moved = atomic_io.move_aside(path)
    where = f"moved aside to {moved}" if moved is not None else "already moved aside by another rank"
    log.warning("%s; %s; %s", damaged, where, then)


def job_settings(cfg: Config) -> dict[str, Any]:
    """The settings that decide what a job's blocks become, as ``job_fingerprint`` sees them, and
    how its teacher is trained when it trains one (the teacher's weights themselves are only
    known once it is loaded or trained)."""
    d = cfg.distill
    teacher = ({k: v for k, v in vars(cfg.teacher).items() if k in ("epochs", "lr", "weight_decay")}
               if not cfg.teacher.checkpoint else {})
    return {"model": vars(cfg.model), "data": _data_settings(cfg), "seed": cfg.run.seed,
            "blocks": {k: v for k, v in vars(cfg.blocks).items() if k not in _IN_FILE_NAME},
            "distill": {k: v for k, v in vars(d).items() if k not in _NOT_IN_RESULT}, "teacher": teacher}


def _data_settings(cfg: Config) -> dict[str, Any]:
    """data.* as the fingerprint has always seen it: a key added later counts only when it is set
    away from its default, so the run directories of earlier versions still resume."""
    data = dict(vars(cfg.data))
    if not data.get("follow_symlinks"):
        data.pop("follow_symlinks", None)
    return data


def _changed_keys(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """``section.key: old -> new`` for every setting that differs."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _changed_keys(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out


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
    key = {"model": vars(cfg.model), "data": _data_settings(cfg), "blocks": settings, "seed": cfg.run.seed,
           "distill": {k: v for k, v in vars(d).items() if k not in _NOT_IN_RESULT},
           "teacher": teacher_fp, "specs": [b.members for b in blocks]}
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
