"""Atomic files: a crash or a kill never leaves a half-written checkpoint, report or plot behind."""
from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

_UMASK = os.umask(0)
os.umask(_UMASK)


def write_atomically(path: str | Path, write: Callable[[str], object], keep_suffix: bool = False) -> None:
    """Call ``write(tmp)`` on a temporary file in ``path``'s folder, then rename it over ``path``.
    ``keep_suffix``: the temporary name ends like ``path`` (writers that pick a format by suffix:
    matplotlib, torch.export, the ONNX exporter)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = path.suffix if keep_suffix else ".tmp"
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; results are meant to be shared like any file
    try:
        write(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)  # atomic on POSIX within one filesystem
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save(obj: Any, path: str | Path) -> None:
    """``torch.save`` to a temp file in the same directory, then rename over ``path``."""
    write_atomically(path, lambda tmp: torch.save(obj, tmp))


def load(path: str | Path) -> Any:
    """Load a checkpoint safely: tensors and plain containers only (``weights_only=True``)."""
    return torch.load(path, map_location="cpu", weights_only=True)


def save_progress(path: Path | None, identity: Any, model: Any, optimizer: Any, scheduler: Any, epoch: int,
                  step: int, **extra: Any) -> None:
    """Save a training loop's progress (weights, optimizer, schedule, cursor and ``extra``) to
    ``path`` (nothing when ``path`` is None); ``load_progress`` resumes it."""
    if path is not None:
        save({"identity": identity, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
              "scheduler": scheduler.state_dict(), "epoch": epoch, "step": step, **extra}, path)


def load_progress(path: Path | None, identity: Any, model: Any, optimizer: Any, scheduler: Any) -> dict[str, Any] | None:
    """Restore ``model``, ``optimizer`` and ``scheduler`` from ``path`` when the same job (same
    ``identity``) wrote it; returns the saved record (``epoch``, ``step``, extras) or None."""
    if path is None or not Path(path).is_file():
        return None
    saved = load(path)
    if saved.get("identity") != identity:
        return None
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    return saved


def write_text(path: str | Path, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
    write_atomically(path, write)


def write_json(path: str | Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def savefig(fig: Any, path: str | Path) -> None:
    """Save a matplotlib figure atomically (the temp file keeps the .png suffix for the backend)."""
    write_atomically(path, lambda tmp: fig.savefig(tmp, format=Path(path).suffix.lstrip(".") or "png", dpi=120,
                                                   bbox_inches="tight"))
