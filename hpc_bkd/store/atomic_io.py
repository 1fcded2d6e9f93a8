"""Atomic files: a crash or a kill never leaves a half-written checkpoint, report or plot behind.

And what goes wrong with files is said by file: a checkpoint that cannot be read back is a
``DamagedFile`` naming it (``load``), which callers that can rebuild it move aside
(``load_or_move_aside``) instead of failing every later run; a full disk is a ``DiskFull`` naming
the file and the space it needs, with no temporary file left behind (``write_atomically``).
"""
from __future__ import annotations

import errno
import io
import json
import logging
import os
import re
import shutil
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from hpc_bkd.errors import UserError

log = logging.getLogger("hpc_bkd")

_UMASK = os.umask(0)
os.umask(_UMASK)


class DamagedFile(UserError):
    """A file the toolkit wrote cannot be read back (truncated, overwritten, not what it should hold).

    It carries the path so that the message names the file (a bare zip-reader error does not), and
    so that a caller able to rebuild the file can move exactly that one aside.
    """

    advice = "; move it aside or delete it: running the job again rebuilds it"

    def __init__(self, path: str | Path, reason: str) -> None:
        super().__init__(path, reason)
        self.path, self.reason = Path(path), reason

    def __str__(self) -> str:
        return f"{self.path} is damaged or unreadable ({self.reason})"


class DiskFull(UserError):
    """No room to write ``path``: it needs ``needed`` bytes (None when unknown), ``free`` are left.

    Raised instead of the writer's own error (torch's says "unexpected pos 576 vs 534"), so that
    the user learns which file, on which filesystem, and how much space to make.
    """

    def __init__(self, path: str | Path, needed: int | None, free: int) -> None:
        super().__init__(path, needed, free)
        self.path, self.needed, self.free = Path(path), needed, free

    def __str__(self) -> str:
        need = f"it needs {_size(self.needed)}" if self.needed is not None else "no space left"
        return (f"no space left on the device to write {self.path}: {need}, {_size(self.free)} free in "
                f"{self.path.parent}; every earlier checkpoint is intact: make room (or use a run.dir "
                "with more space) and run the same command again to resume")


def _size(n: int) -> str:
    return f"{n} bytes" if n < 2**20 else f"{n / 2**20:.1f} MiB ({n} bytes)"


def write_atomically(path: str | Path, write: Callable[[str], object], keep_suffix: bool = False,
                     size: Callable[[], int] | None = None) -> None:
    """Call ``write(tmp)`` on a temporary file in ``path``'s folder, then rename it over ``path``.
    ``keep_suffix``: the temporary name ends like ``path`` (writers that pick a format by suffix:
    matplotlib, torch.export, the ONNX exporter). ``size``: how many bytes the file takes, asked
    only after a failed write, to tell a full disk (``DiskFull``) from another error."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = None
    try:
        tmp = _temp_file(path, keep_suffix)
        write(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)  # atomic on POSIX within one filesystem
    except BaseException as exc:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        full = _disk_full(path, exc, size) if isinstance(exc, Exception) else None
        if full is not None:
            raise full from exc
        raise


def _temp_file(path: Path, keep_suffix: bool) -> str:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix if keep_suffix else ".tmp",
                               dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; results are meant to be shared like any file
    return tmp


def _disk_full(path: Path, exc: Exception, size: Callable[[], int] | None) -> DiskFull | None:
    """A ``DiskFull`` when ``exc`` came from a full filesystem: ENOSPC/EDQUOT from Python's own
    writes, or (torch's C++ writer drops errno) a file larger than the space left once the
    temporary file is gone."""
    cause: BaseException | None = exc
    while cause is not None:  # a failed writer's open file, referenced from its frames, holds its space
        traceback.clear_frames(cause.__traceback__)
        cause = cause.__context__
    try:
        free = shutil.disk_usage(path.parent).free
    except OSError:
        return None
    no_space = isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)
    if size is None:
        return DiskFull(path, None, free) if no_space else None
    needed = size()
    return DiskFull(path, needed, free) if no_space or needed > free else None


def save(obj: Any, path: str | Path) -> None:
    """``torch.save`` to a temp file in the same directory, then rename over ``path``."""
    write_atomically(path, lambda tmp: torch.save(obj, tmp), size=lambda: _serialized_size(obj))


def _serialized_size(obj: Any) -> int:
    """Bytes ``torch.save`` writes for ``obj`` (serialized in memory: only after a failed write)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.tell()


def load(path: str | Path, keys: Sequence[str] = ()) -> Any:
    """Load a checkpoint safely: tensors and plain containers only (``weights_only=True``).

    A missing file is ``FileNotFoundError``; one that cannot be read back, or (``keys``) is not a
    mapping with those keys, is ``DamagedFile`` naming it.
    """
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as exc:  # zip, pickle and OS errors of a truncated or overwritten file
        raise DamagedFile(path, _why(path, exc)) from exc
    missing = [k for k in keys if not isinstance(obj, dict) or k not in obj]
    if missing:
        raise DamagedFile(path, f"no {', '.join(missing)} in it")
    return obj


def _why(path: str | Path, exc: Exception) -> str:
    try:
        size = f"{os.path.getsize(path)} bytes"
    except OSError:
        size = "size unknown"
    text = str(exc)
    if "Weights only load failed" in text:  # never pass on torch's advice to load it unsafely
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)|WeightsUnpickler error: ([^\n.]+)", text)
        what = (f" (it refers to {found.group(1)})" if found and found.group(1)
                else f" ({found.group(2).strip()})" if found else "")
        return (f"{size}; it holds Python objects, not only tensors{what}: this toolkit reads weights-only "
                "files and does not run code from a checkpoint; save a state_dict (torch.save(model.state_dict(), "
                "path)) instead")
    first = (text.strip().splitlines() or [""])[0][:200]
    return f"{size}; {type(exc).__name__}: {first}" if first else f"{size}; {type(exc).__name__}"


def load_json(path: str | Path) -> Any:
    """A JSON file the toolkit wrote; ``DamagedFile`` when it cannot be parsed."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as exc:  # ValueError: bad JSON, bad UTF-8
        raise DamagedFile(path, _why(path, exc)) from exc


def move_aside(path: str | Path) -> Path | None:
    """Rename a damaged file to ``<name>.damaged-<time>`` beside it: kept for a look, out of the
    next run's way. None when it is gone already (another rank sharing the folder moved it)."""
    path = Path(path)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target, n = path.with_name(f"{path.name}.damaged-{stamp}"), 1
    while target.exists():
        target, n = path.with_name(f"{path.name}.damaged-{stamp}-{n}"), n + 1
    try:
        os.rename(path, target)
    except FileNotFoundError:
        return None
    return target


def load_or_move_aside(path: str | Path, then: str, keys: Sequence[str] = ()) -> Any | None:
    """``load(path, keys)``, or None when the file is missing or damaged; a damaged one is moved
    aside and logged with ``then`` (what the job does instead). For files the job can rebuild
    (finished blocks, checkpoints, the teacher cache): one bad file must not fail every re-run."""
    try:
        return load(path, keys)
    except FileNotFoundError:
        return None
    except DamagedFile as exc:
        try:
            moved = move_aside(exc.path)
        except OSError as err:
            raise DamagedFile(exc.path, f"{exc.reason}; and it cannot be moved aside: {err}") from err
        where = f"moved aside to {moved}" if moved is not None else "already moved aside by another rank"
        log.warning("%s: %s; %s", exc, where, then)
        return None


def save_progress(path: Path | None, identity: Any, model: Any, optimizer: Any, scheduler: Any, epoch: int,
                  step: int, **extra: Any) -> None:
    """Save a training loop's progress (weights, optimizer, schedule, cursor and ``extra``) to
    ``path`` (nothing when ``path`` is None); ``load_progress`` resumes it."""
    if path is not None:
        save({"identity": identity, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
              "scheduler": scheduler.state_dict(), "epoch": epoch, "step": step, **extra}, path)


def load_progress(path: Path | None, identity: Any, model: Any, optimizer: Any, scheduler: Any) -> dict[str, Any] | None:
    """Restore ``model``, ``optimizer`` and ``scheduler`` from ``path`` when the same job (same
    ``identity``) wrote it; returns the saved record (``epoch``, ``step``, extras) or None (a
    damaged record is moved aside: the loop starts over rather than fail every re-run)."""
    if path is None:
        return None
    saved = load_or_move_aside(path, "its training starts from the beginning", keys=("identity", "model", "optimizer", "scheduler"))
    if saved is None or saved.get("identity") != identity:
        return None
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    return saved


def state_checksum(state: dict[str, torch.Tensor]) -> str:
    """A short hash of a state dict's names and values: what a checkpoint says it holds, checked
    when it is read back (a file copied over another, or changed in place, no longer matches)."""
    import hashlib

    digest = hashlib.sha256()
    for key in sorted(state):
        digest.update(key.encode())
        value = state[key]
        digest.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
                      if value.numel() else b"")
    return digest.hexdigest()[:16]


def write_text(path: str | Path, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
    write_atomically(path, write, size=lambda: len(text.encode("utf-8")))


def write_json(path: str | Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def savefig(fig: Any, path: str | Path) -> None:
    """Save a matplotlib figure atomically (the temp file keeps the .png suffix for the backend)."""
    write_atomically(path, lambda tmp: fig.savefig(tmp, format=Path(path).suffix.lstrip(".") or "png", dpi=120,
                                                   bbox_inches="tight"))
