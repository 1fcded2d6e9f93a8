"""One job per run directory: an exclusive OS file lock that rank 0 holds for the job's life.

Two jobs writing one directory would mix their state (one's config.json, the other's blocks and
report) and lose a job's results, as databases and SLURM's requeue never do. So rank 0 takes
``flock(LOCK_EX | LOCK_NB)`` on ``<run dir>/job.lock`` before it writes anything and keeps it until
the process ends. The kernel drops the lock when the process dies, however it dies (a kill -9, a
lost node's NFS client), so a crash never leaves a stale lock: there is no PID file to clean up.
While it holds the lock the job writes who it is (host, PID, start time) into the file, for the
message a second job gives; it empties the file when it lets go, so a finished run's directory
reads the same before and after any later job that was refused.

Linux implements ``flock`` on NFS (v4, and v3 with lockd) as a POSIX lock that the server
arbitrates, so the lock holds across nodes on a shared filesystem. Where the filesystem has no
locks (``ENOLCK``, ``EOPNOTSUPP``: some FUSE and old NFS mounts) the job says so and runs unlocked.
Readers (``evaluate``, ``export`` of a finished run) take no lock.
"""
from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from hpc_bkd.errors import UserError

log = logging.getLogger("hpc_bkd")
LOCK_NAME = "job.lock"


class RunDirLocked(UserError, RuntimeError):
    """Another job holds the run directory's lock; the message names it."""


@contextmanager
def run_dir_lock(root: str | Path) -> Iterator[Path]:
    """Hold ``root``'s job lock for the ``with`` block (``root`` is created if missing).
    Raises ``RunDirLocked`` at once, naming the holder, when another job has it."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    path = root / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        if not _try_lock(fd, path):
            raise RunDirLocked(f"{root} is in use by another job ({_holder(fd)}; lock file {path}). "
                               "Wait for it to end, or give this job another run.dir (--run-dir)")
        _write_holder(fd)
        try:
            yield path
        finally:
            os.ftruncate(fd, 0)  # still locked: no other job reads a half-cleared holder
    finally:
        os.close(fd)  # closing the only descriptor releases the lock


def _try_lock(fd: int, path: Path) -> bool:
    """Take the lock without waiting: False when another job holds it; True (with a warning)
    where the filesystem cannot lock at all."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError as exc:
        if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            raise
        log.warning("%s: this filesystem does not support file locks (%s): two jobs started on this run "
                    "directory at once are not prevented", path, exc.strerror or exc)
    return True


def _write_holder(fd: int) -> None:
    holder = {"host": socket.gethostname(), "pid": os.getpid(),
              "started": time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime())}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)


def _holder(fd: int) -> str:
    """Who holds the lock, from what it wrote (it may be between taking it and writing)."""
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        return f"host {info['host']}, PID {info['pid']}, started {info['started']}"
    except (ValueError, KeyError, TypeError, OSError):
        return "holder not yet recorded"
