"""The MPI runtime: who am I, which device is mine, how ranks wait and talk.

Rank, size, node-local rank and device come from MPI itself (COMM_WORLD and a shared-memory split),
whatever started the processes: ``python -m hpc_bkd`` alone (an MPI singleton), ``mpirun``, ``srun``,
``sbatch`` or submitit. There is no launcher-specific code anywhere else.
"""
from __future__ import annotations

import logging
import os
import platform
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, NoReturn, Protocol

import torch

from hpc_bkd.errors import EXIT_INTERRUPTED, UserError

log = logging.getLogger("hpc_bkd")


class PeerWatch(Protocol):
    """What a rank's collectives need of the watch on its peers (``peers.Heartbeat``): a check that
    raises ``PeerLost`` once one stops answering. A protocol, so the runtime does not import it."""

    cpu_s: float  # the watch's own CPU seconds so far
    started: float  # time.monotonic() when it started

    def check(self) -> None: ...

    def close(self) -> None: ...


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
    peers: PeerWatch | None = None  # set while a job runs on several ranks (peers.watching_peers)

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    def idle_wait(self, poll_s: float = 0.01) -> None:
        """A barrier that sleeps instead of spinning.

        MPICH busy-polls inside blocking collectives; a rank that waits for rank 0 (training the
        teacher) or for a slower rank would steal a core from the rank doing the work. While it
        waits, a peer lost (``peers.Heartbeat``) raises ``peers.PeerLost`` instead of a hang.
        """
        if self.size == 1:
            return
        if self.peers is not None:  # a lost peer is never touched through MPI: its library may crash
            self.peers.check()
        request = self.comm.Ibarrier()
        while not request.Test():
            if self.peers is not None:
                self.peers.check()
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

    def abort(self, code: int = 1) -> NoReturn:
        """End every rank now (a failed rank must not leave the others waiting forever)."""
        abort_all(self.comm, code)


# ------------------------------------------------------------------------------- machine facts


def available_cores() -> int:
    """CPUs this process may run on: its affinity mask where the OS has one, else the machine's count.

    The mask, not ``os.cpu_count()``: SLURM, cgroups, ``taskset`` and MPI binding narrow it, and
    threads beyond it only contend for the same cores.
    """
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), so figures say which hardware produced them."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this rank in MiB: CUDA's allocator peak on a GPU, else the process's max RSS.

    The report compares ranks by it; on CPU the resident set is what competes for the node's RAM.
    """
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


def meminfo_bytes(field: str) -> int | None:
    """A ``/proc/meminfo`` field (e.g. ``MemAvailable``, ``MemTotal``) in bytes; None where unreadable.

    None rather than a guess, so that callers can fall back to their own default off Linux.
    """
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(f"{field}:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def mem_available_bytes() -> int | None:
    """Memory the kernel can give without swapping (MemAvailable), the budget for in-RAM caches."""
    return meminfo_bytes("MemAvailable")


def mem_total_bytes() -> int | None:
    """Installed memory (MemTotal), for describing a machine in benchmark records."""
    return meminfo_bytes("MemTotal")


def pick_device(setting: str, local_rank: int = 0) -> torch.device:
    """The device of ``run.device`` (auto|cpu|cuda) for the rank with node-local rank ``local_rank``.

    auto takes a GPU when CUDA is available. GPUs are those left visible by CUDA_VISIBLE_DEVICES
    (e.g. by SLURM ``--gpus-per-task``), shared round-robin by node-local rank so that ranks on one
    node do not all land on GPU 0. ``cuda`` without CUDA raises instead of silently using the CPU.
    """
    use_cuda = setting == "cuda" or (setting == "auto" and torch.cuda.is_available())
    if not use_cuda:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("run.device=cuda but CUDA is not available on this node")
    return torch.device("cuda", local_rank % torch.cuda.device_count())


def _cpu_share(local_rank: int, local_size: int) -> int:
    """CPU threads for this rank: its srun CPU allocation, else an even share of the node's cores."""
    if os.environ.get("SLURM_CPUS_PER_TASK") and os.environ.get("SLURM_STEP_ID") is not None:
        return max(1, int(os.environ["SLURM_CPUS_PER_TASK"]))  # srun already gave this task its CPUs
    return max(1, available_cores() // local_size)


# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def keep_freed_memory() -> bool:
    """Let glibc keep freed memory for reuse instead of handing each large block back to the OS.

    PyTorch's CPU allocator is plain malloc/free. With glibc's defaults every activation of more than
    a few MiB is a fresh mmap, so each train step page-faults its activations in again (thousands of
    faults and megabytes of kernel page zeroing per step). Raising the mmap threshold (to 1 GiB, or
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
    dev = pick_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    else:
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


class Interrupted(UserError):
    """A stop was requested (preemption, time limit, scancel); everything finished was saved."""

    exit_code = EXIT_INTERRUPTED


def request_stop(*_: Any) -> None:
    """Ask the training loop to checkpoint and return at its next step (signal-safe: sets a flag)."""
    _stop.set()


def stop_requested() -> bool:
    return _stop.is_set()


def clear_stop() -> None:
    _stop.clear()


def install_stop_handlers(signals: tuple[str, ...] = STOP_SIGNALS,
                          received: list[int] | None = None) -> dict[int, Any]:
    """SIGTERM (scancel, preemption), SIGUSR1/2 (``--signal``), SIGINT: flag only, the loop saves.

    A handler that only sets a flag, because the signal arrives on the main thread, which is the
    training loop: saving from the handler could catch a block between its optimizer step and its
    step counter, so the loop saves at its next step instead. ``received``, when given, gets each
    signal number as it arrives (a launcher decides by the signal whether to requeue). Returns the
    handlers replaced, for :func:`restore_handlers`; nothing is installed (and ``{}`` returned)
    off the main thread, where Python cannot set handlers.
    """
    if threading.current_thread() is not threading.main_thread():
        return {}
    def note_and_stop(signum: int, frame: Any) -> None:
        if received is not None:
            received.append(signum)
        request_stop()

    handler = request_stop if received is None else note_and_stop
    previous: dict[int, Any] = {}
    for name in signals:
        sig = getattr(signal, name, None)
        if sig is not None:
            previous[sig] = signal.signal(sig, handler)
    return previous


def current_stop_handlers(signals: tuple[str, ...] = STOP_SIGNALS) -> dict[int, Any]:
    """The handlers now set for ``signals``, for :func:`restore_handlers` after a job that installs
    its own (``{}`` off the main thread, where nothing is installed)."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {int(getattr(signal, name)): signal.getsignal(getattr(signal, name)) for name in signals}


def restore_handlers(previous: dict[int, Any]) -> None:
    """Put back the handlers :func:`install_stop_handlers` replaced (a default one where none was
    set from Python), so that a caller in the same process (submitit's debug executor) keeps its own."""
    for sig, handler in previous.items():
        signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


# ------------------------------------------------------------------------------- abort


def abort_all(comm: Any, code: int, message: str = "", delay_s: float = 0.0) -> NoReturn:
    """End every rank of ``comm``'s job with exit status ``code``; on one rank, just exit.

    A failed rank must not leave the others waiting forever in a collective, and only MPI_Abort
    reaches them all. ``message`` (if any) goes to stderr first; ``delay_s`` lets the launcher
    forward it before MPI_Abort tears its stdio down.
    """
    if message:
        print(message, file=sys.stderr, flush=True)
    if comm is not None and comm.size > 1:
        if delay_s > 0:
            time.sleep(delay_s)
        comm.Abort(code)
    raise SystemExit(code)
