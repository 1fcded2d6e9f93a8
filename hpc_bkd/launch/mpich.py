"""MPICH's shared-memory segments in /dev/shm: find and remove the ones a killed job step left.

Why this exists
    MPICH (ch4) keeps each node's shared memory of a job step in
    ``/dev/shm/mpich_shm_<h>_<node>`` (and ``mpich_vci_<h>_*``), where ``<h>`` is the 32-bit FNV-1a
    hash of ``"<SLURM job id>.<step id>"`` in lower-case hex, and removes it in ``MPI_Finalize``
    only. A requeued SLURM job keeps its id and numbers its steps from 0 again, so a segment left by
    a killed step makes ``MPI_Init`` of the same step id fail or hang until the time limit; and a
    container's small /dev/shm fills up with the leftovers of killed runs.

    Both SLURM paths (``slurm/common.sh`` and the submitit backend) run :func:`cleanup_job` on every
    node, in a one-task-per-node step of its own, before the main step (requeues) and after it when
    it failed: ``srun --ntasks-per-node=1 ... python -m hpc_bkd.launch.mpich cleanup``. No live step
    of the job can own those segments then: the cleanup step runs alone.

Command line (defaults from the SLURM step's environment)::

    python -m hpc_bkd.launch.mpich cleanup [--job-id ID] [--last-step N] [--shm-dir DIR]
    python -m hpc_bkd.launch.mpich unused [--remove]     # segments no running process maps

This module imports nothing beyond the standard library (no MPI, no torch): it starts in a
fraction of a second on every node of a big job.
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

SHM_DIR = Path("/dev/shm")
PREFIXES = ("mpich_shm_", "mpich_vci_")

_FNV_OFFSET = 2166136261
_FNV_PRIME = 16777619


def step_hash(job_id: str | int, step: int) -> str:
    """MPICH's name for job step ``job_id.step``: FNV-1a (32 bit) of ``"<job>.<step>"``, hex."""
    h = _FNV_OFFSET
    for byte in f"{job_id}.{step}".encode():
        h = ((h ^ byte) * _FNV_PRIME) & 0xFFFFFFFF
    return f"{h:x}"


def step_segments(job_id: str | int, steps: Iterable[int], shm_dir: Path = SHM_DIR) -> list[Path]:
    """The segments in ``shm_dir`` that belong to the given steps of SLURM job ``job_id``."""
    found: list[Path] = []
    if not shm_dir.is_dir():
        return found
    for step in steps:
        h = step_hash(job_id, step)
        for prefix in PREFIXES:
            found += sorted(shm_dir.glob(f"{prefix}{h}_*"))
    return found


def cleanup_job(job_id: str | int, last_step: int, shm_dir: Path = SHM_DIR) -> list[Path]:
    """Remove what steps ``0..last_step`` of job ``job_id`` left in ``shm_dir``; return the removed.

    Only call it when no step of the job that uses MPI is running on this node (a step of its own).
    """
    removed = []
    for path in step_segments(job_id, range(last_step + 1), shm_dir):
        try:
            path.unlink()
        except FileNotFoundError:  # another task on this node got it first
            continue
        removed.append(path)
    return removed


def _mapped_paths() -> set[str]:
    """Every /dev/shm path some process on this machine maps (from /proc/*/maps)."""
    used: set[str] = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            text = Path(f"/proc/{pid}/maps").read_text()
        except OSError:
            continue
        used.update(line.split()[-1] for line in text.splitlines() if "/dev/shm/" in line)
    return used


def unused_segments(shm_dir: Path = SHM_DIR, ignore: Iterable[str] = ()) -> list[Path]:
    """MPICH segments in ``shm_dir`` that no process maps (leftovers of killed runs), except the
    names in ``ignore``: under plain ``mpirun`` there is no job id, so a segment's owner is known
    only by whether a live process still uses it."""
    if not shm_dir.is_dir():
        return []
    skip, in_use = set(ignore), _mapped_paths()
    return sorted(p for p in shm_dir.iterdir()
                  if p.name.startswith(PREFIXES) and p.name not in skip and str(p) not in in_use)


def srun_cleanup_command(python: str = sys.executable, srun_options: Sequence[str] = ()) -> str:
    """The batch-script line that runs :func:`cleanup_job` once on every node of the job.

    ``--mpi=none``: the step needs no PMI; one CPU per node, so that it fits any allocation.
    """
    options = ["--ntasks-per-node=1", '--ntasks="${SLURM_JOB_NUM_NODES:-1}"', "--mpi=none", "--cpus-per-task=1",
               *srun_options]
    return f"srun {' '.join(options)} {shlex.quote(python)} -m hpc_bkd.launch.mpich cleanup"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m hpc_bkd.launch.mpich",
                                     description="Remove MPICH shared memory that killed job steps left in /dev/shm.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("cleanup", help="remove the segments of steps 0..LAST of a SLURM job (run inside the job)")
    p.add_argument("--job-id", default=os.environ.get("SLURM_JOB_ID"), help="default: $SLURM_JOB_ID")
    p.add_argument("--last-step", type=int, default=None,
                   help="default: $SLURM_STEP_ID + 1 (this cleanup step's id, and the next one)")
    p.add_argument("--shm-dir", type=Path, default=SHM_DIR)
    p.add_argument("-v", "--verbose", action="store_true", help="print each removed file")
    p = sub.add_parser("unused", help="list MPICH segments no process maps (leftovers of killed mpirun runs)")
    p.add_argument("--remove", action="store_true", help="delete them")
    p.add_argument("--shm-dir", type=Path, default=SHM_DIR)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Exit 0 when done (also when there was nothing to remove), 2 when the job id is unknown."""
    args = _parser().parse_args(argv)
    if args.command == "unused":
        for path in unused_segments(args.shm_dir):
            if args.remove:
                path.unlink(missing_ok=True)
            print(path)
        return 0
    if not args.job_id:
        print("hpc_bkd.launch.mpich: no job id (not inside a SLURM job?): pass --job-id", file=sys.stderr)
        return 2
    last = args.last_step if args.last_step is not None else int(os.environ.get("SLURM_STEP_ID", "0")) + 1
    for path in cleanup_job(args.job_id, last, args.shm_dir):
        if args.verbose:
            print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
