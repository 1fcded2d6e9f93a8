"""Listing an ImageFolder without trusting it: each real file and folder once, links on request.

torchvision's ``make_dataset`` walks with ``os.walk(followlinks=True)``: ``ln -s .. train/cat/loop``
then labels every other class's images "cat" (ten times over), and two such links make the walk
endless, its list growing until the node runs out of memory, deaf to SIGTERM. Here:

* a symbolic link to a folder is not followed (it is logged, once, by name) unless
  ``data.follow_symlinks`` is true; then each real folder, known by (st_dev, st_ino), is walked
  once, and a link back to one already walked is an error naming both paths (a loop);
* a file reached twice (two links to one image, a hard link, a link into another class) is an
  error naming both paths: it would be counted twice, maybe under two labels;
* the walk checks for a stop request (SIGTERM, SIGINT) every few hundred entries, so a huge
  folder on a slow filesystem can still be stopped; and since nothing is visited twice, its
  memory is bounded by the folder's real size.

The order is ``make_dataset``'s (classes sorted, then folders by path, then file names), so a
folder without links lists exactly as before.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from hpc_bkd.distributed.runtime import Interrupted, stop_requested
from hpc_bkd.errors import UserError

log = logging.getLogger("hpc_bkd")
_CHECK_EVERY = 256  # entries between stop checks


class FolderError(UserError, RuntimeError):
    """An ImageFolder that cannot be listed as it is (a loop, a file reached twice, unreadable)."""


@dataclass
class _Walk:
    """One listing's bookkeeping: what was visited (by device and inode) and under which path."""

    extensions: tuple[str, ...]
    follow: bool
    seen_dirs: dict[tuple[int, int], str] = field(default_factory=dict)
    seen_files: dict[tuple[int, int], str] = field(default_factory=dict)
    entries: int = 0

    def tick(self) -> None:
        self.entries += 1
        if self.entries % _CHECK_EVERY == 0 and stop_requested():
            raise Interrupted(f"stopped while listing the image folder ({self.entries} entries read)")

    def enter(self, path: str, st: os.stat_result) -> None:
        key = (st.st_dev, st.st_ino)
        if key in self.seen_dirs:
            raise FolderError(f"folder {path} is the same folder as {self.seen_dirs[key]} (a symbolic link loop, "
                              "or two links to one folder): it would be listed twice; remove the link, or set "
                              "data.follow_symlinks: false")
        self.seen_dirs[key] = path

    def add_file(self, path: str, st: os.stat_result) -> None:
        key = (st.st_dev, st.st_ino)
        if key in self.seen_files:
            raise FolderError(f"image {path} is the same file as {self.seen_files[key]} (a link or hard link): "
                              "it would be counted twice; remove one of them")
        self.seen_files[key] = path


def list_images(folder: Path, extensions: tuple[str, ...], follow_symlinks: bool = False
                ) -> tuple[list[tuple[str, int]], list[str]]:
    """(path, class index) of every image under ``folder``'s class folders, and the classes."""
    walk = _Walk(tuple(e.lower() for e in extensions), follow_symlinks)
    classes = _classes(folder, walk)
    if not classes:
        raise FileNotFoundError(f"no class folders in {folder}")
    samples: list[tuple[str, int]] = []
    empty = []
    for index, name in enumerate(classes):
        found = _walk_class(os.path.join(str(folder), name), walk)
        samples += [(p, index) for p in found]
        empty += [] if found else [name]
    if empty:
        raise FileNotFoundError(f"no image files ({', '.join(extensions)}) in class folder(s) "
                                f"{', '.join(empty)} of {folder}")
    return samples, classes


def _classes(folder: Path, walk: _Walk) -> list[str]:
    names = []
    for entry in _scan(str(folder)):
        walk.tick()
        if _is_dir(entry, walk):
            names.append(entry.name)
    return sorted(names)


def _walk_class(top: str, walk: _Walk) -> list[str]:
    """Every image below ``top`` in ``make_dataset``'s order (folders by path, names sorted)."""
    walk.enter(top, os.stat(top))
    per_dir: dict[str, list[str]] = {}
    pending = [top]
    while pending:
        here = pending.pop()
        files = per_dir.setdefault(here, [])
        for entry in _scan(here):
            walk.tick()
            if _is_dir(entry, walk):
                walk.enter(entry.path, entry.stat())
                pending.append(entry.path)
            elif entry.name.lower().endswith(walk.extensions) and _is_file(entry):
                files.append(entry.name)
    out = []
    for here in sorted(per_dir):
        for name in sorted(per_dir[here]):
            path = os.path.join(here, name)
            walk.add_file(path, os.stat(path))
            out.append(path)
    return out


def _scan(path: str) -> list[os.DirEntry]:
    try:
        with os.scandir(path) as it:
            return list(it)
    except OSError as exc:
        raise FolderError(f"cannot list folder {path}: {exc.strerror or exc}") from None


def _is_dir(entry: os.DirEntry, walk: _Walk) -> bool:
    """A folder to walk: a real one, or (``follow``) a link to one; a link not followed is logged."""
    try:
        if not entry.is_dir(follow_symlinks=True):
            return False
    except OSError:  # a dangling link
        return False
    if entry.is_symlink() and not walk.follow:
        log.warning("not following the symbolic link to a folder %s -> %s (set data.follow_symlinks: true to "
                    "follow such links)", entry.path, os.readlink(entry.path))
        return False
    return True


def _is_file(entry: os.DirEntry) -> bool:
    try:
        return entry.is_file(follow_symlinks=True)
    except OSError:
        return False
