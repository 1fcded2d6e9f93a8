"""The MPI runtime: who am I, which device is mine, how ranks wait and talk.

Rank, size, node-local rank and device come from MPI itself (COMM_WORLD and a shared-memory split),
whatever started the processes: ``python -m hpc_bkd`` alone (an MPI singleton), ``mpirun``, ``srun``,
``sbatch`` or submitit. There is no launcher-specific code anywhere else.
"""
from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

import torch

log = logging.getLogger("hpc_bkd")


@dataclass
class Runtime:
    comm: Any  # mpi4py.MPI.Comm
    rank: int
    size: int
    local_rank: int
    local_size: int
    host: str
    device: torch.device
    threads: int

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    def idle_wait(self, poll_s: float = 0.01) -> None:
        """A barrier that sleeps instead of spinning.

        MPICH busy-polls inside blocking collectives; a rank that waits for rank 0 (training the
        teacher) or for a slower rank would steal a core from the rank doing the work.
        """
        if self.size == 1:
            return
        request = self.comm.Ibarrier()
        while not request.Test():
            time.sleep(poll_s)

    def bcast(self, obj: Any) -> Any:
        self.idle_wait()
        return self.comm.bcast(obj, root=0)

    def gather(self, obj: Any) -> list[Any] | None:
        self.idle_wait()
        return self.comm.gather(obj, root=0)

    def allgather(self, obj: Any) -> list[Any]:
        self.idle_wait()
        return self.comm.allgather(obj)

    def abort(self, code: int = 1) -> None:
        """End every rank now (a failed rank must not leave the others waiting forever)."""
        if self.size > 1:
            self.comm.Abort(code)
        sys.exit(code)


def _cpu_share(local_rank: int, local_size: int) -> int:
    """CPU threads for this rank: its srun CPU allocation, else an even share of the node's cores."""
    if os.environ.get("SLURM_CPUS_PER_TASK") and os.environ.get("SLURM_STEP_ID") is not None:
        return max(1, int(os.environ["SLURM_CPUS_PER_TASK"]))  # srun already gave this task its CPUs
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // local_size)


# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def keep_freed_memory() -> bool:
    """Let glibc keep freed memory for reuse instead of handing each large block back to the OS.

    PyTorch's CPU allocator is plain malloc/free. With glibc's defaults every activation of more than
    a few MiB is a fresh mmap, so each train step page-faults its activations in again (thousands of
    faults and megabytes of kernel page zeroing per step; measured on a student block of the default
    job: ~1500-4000 minor faults per step, 0-50 with this). Raising the mmap threshold (to 1 GiB, or
    32 MiB where glibc caps it) and the trim threshold keeps such blocks in the heap; raising only
    the trim threshold would be worse than nothing (it turns off glibc's adaptive mmap threshold).
    A no-op (returns False) where the C library is not glibc, or when a different allocator
    (jemalloc, tcmalloc) was preloaded, which caches by itself.
    """
    import ctypes
    import ctypes.util

    if sys.platform != "linux" or os.environ.get("LD_PRELOAD"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    if not (mallopt(_M_MMAP_THRESHOLD, 1 << 30) or mallopt(_M_MMAP_THRESHOLD, 32 << 20)):
        return False
    return bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))


def init_runtime(device: str = "auto", threads: int = 0) -> Runtime:
    """Initialise MPI (mpi4py), pick this rank's device and CPU threads."""
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    node_comm = comm.Split_type(MPI.COMM_TYPE_SHARED, key=comm.rank)
    local_rank, local_size = node_comm.rank, node_comm.size
    node_comm.Free()
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        if not torch.cuda.is_available():
            raise RuntimeError("run.device=cuda but CUDA is not available on this node")
        # devices are those left visible by CUDA_VISIBLE_DEVICES (e.g. by SLURM --gpus-per-task)
        dev = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
        keep_freed_memory()
    n_threads = threads or _cpu_share(local_rank, local_size)
    torch.set_num_threads(n_threads)
    return Runtime(comm, comm.rank, comm.size, local_rank, local_size, socket.gethostname(), dev, n_threads)


# ------------------------------------------------------------------------------- logging


class _RankFormatter(logging.Formatter):
    def __init__(self, rank: int, size: int) -> None:
        width = len(str(max(size - 1, 0)))
        super().__init__(f"%(asctime)s [rank {rank:>{width}}/{size}] %(levelname)s %(message)s", "%H:%M:%S")


def setup_logging(rank: int, size: int, level: int = logging.INFO) -> None:
    """Rank-prefixed lines on stderr, flushed at once (cluster logs are read while the job runs)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_RankFormatter(rank, size))
    log.handlers[:] = [handler]
    log.setLevel(level)
    log.propagate = False


# ------------------------------------------------------------------------------- stop requests

_stop = threading.Event()
STOP_SIGNALS = ("SIGTERM", "SIGUSR1", "SIGUSR2", "SIGINT")


class Interrupted(Exception):
    """A stop was requested (preemption, time limit, scancel); everything finished was saved."""


def request_stop(*_: Any) -> None:
    """Ask the training loop to checkpoint and return at its next step (signal-safe: sets a flag)."""
    _stop.set()


def stop_requested() -> bool:
    return _stop.is_set()


def clear_stop() -> None:
    _stop.clear()


def install_stop_handlers(signals: tuple[str, ...] = STOP_SIGNALS) -> None:
    """SIGTERM (scancel, preemption), SIGUSR1/2 (``--signal``), SIGINT: flag only, the loop saves."""
    if threading.current_thread() is not threading.main_thread():
        return
    for name in signals:
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), request_stop)
