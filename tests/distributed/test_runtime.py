"""Process-level runtime settings that the ranks rely on: allocator, machine facts, stop and abort."""
import os
import signal
import subprocess
import sys

import pytest
import torch

from hpc_bkd.distributed import runtime

FAULTS = r"""
import resource, sys, torch
from torch import nn
if sys.argv[1] == "keep":
    from hpc_bkd.distributed.runtime import keep_freed_memory
    assert keep_freed_memory()
torch.set_num_threads(1)
torch.manual_seed(0)
block = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.BatchNorm2d(16), nn.ReLU(),
                      nn.Conv2d(16, 16, 1), nn.BatchNorm2d(16))  # a default-job student layer
x = torch.randn(64, 16, 32, 32)
def step():
    block(x).square().mean().backward()
for _ in range(5):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_freed_activations_are_reused_not_faulted_in_again():
    """With glibc's defaults a student's train step maps its 4 MiB activations afresh at every step
    (thousands of page faults); after keep_freed_memory() the heap keeps and reuses them."""
    def faults(mode: str) -> int:
        return int(subprocess.run([sys.executable, "-c", FAULTS, mode], capture_output=True, text=True,
                                  check=True).stdout.strip())

    default, kept = faults("default"), faults("keep")
    assert default > 10 * 500, default  # measured: ~1500-4000 faults per step
    assert kept < default / 10, (kept, default)


# ------------------------------------------------------------------------------- machine facts

def test_available_cores_is_the_affinity_mask():
    cores = runtime.available_cores()
    assert cores >= 1
    if hasattr(os, "sched_getaffinity"):
        assert cores == len(os.sched_getaffinity(0))


@pytest.mark.skipif(not os.path.exists("/proc/meminfo"), reason="Linux /proc/meminfo")
def test_meminfo_fields_in_bytes():
    avail, total = runtime.mem_available_bytes(), runtime.mem_total_bytes()
    assert avail is not None and total is not None
    assert 0 < avail <= total and total % 1024 == 0
    assert runtime.meminfo_bytes("NoSuchField") is None


def test_peak_memory_on_cpu_is_the_max_rss():
    import resource

    peak = runtime.peak_memory_mb(torch.device("cpu"))
    assert peak == pytest.approx(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, rel=0.05)
    assert peak > 10  # a Python process with torch loaded


def test_pick_device(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert runtime.pick_device("cpu") == torch.device("cpu")
    assert runtime.pick_device("auto", local_rank=3) == torch.device("cpu")
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        runtime.pick_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert runtime.pick_device("auto", local_rank=3) == torch.device("cuda", 1)  # round-robin by node-local rank
    assert runtime.pick_device("cuda") == torch.device("cuda", 0)
    assert runtime.pick_device("cpu", local_rank=1) == torch.device("cpu")


# ------------------------------------------------------------------------------- stop and abort


@pytest.mark.skipif(not hasattr(signal, "SIGUSR1"), reason="POSIX signals")
def test_stop_handlers_flag_record_and_restore():
    def mine(signum, frame):  # a caller's own handler (submitit's, in the debug executor)
        pass

    signal.signal(signal.SIGUSR1, mine)
    runtime.clear_stop()
    received: list[int] = []
    previous = runtime.install_stop_handlers(("SIGUSR1", "SIGUSR2"), received=received)
    try:
        assert previous[signal.SIGUSR1] is mine
        os.kill(os.getpid(), signal.SIGUSR1)
        assert runtime.stop_requested() and received == [signal.SIGUSR1]
    finally:
        runtime.restore_handlers(previous)
        runtime.clear_stop()
    assert signal.getsignal(signal.SIGUSR1) is mine
    signal.signal(signal.SIGUSR1, signal.SIG_DFL)


@pytest.mark.skipif(not hasattr(signal, "SIGUSR2"), reason="POSIX signals")
def test_plain_stop_handlers_only_set_the_flag():
    previous = runtime.install_stop_handlers(("SIGUSR2",))
    try:
        assert signal.getsignal(signal.SIGUSR2) is runtime.request_stop
    finally:
        runtime.restore_handlers(previous)


class _FakeComm:
    def __init__(self, size: int) -> None:
        self.size, self.aborted = size, None

    def Abort(self, code: int) -> None:  # noqa: N802  (mpi4py's name)
        self.aborted = code
        raise KeyboardInterrupt  # MPI_Abort never returns: stand in for that


def test_abort_all_on_one_rank_just_exits(capsys: pytest.CaptureFixture[str]):
    comm = _FakeComm(1)
    with pytest.raises(SystemExit) as exc:
        runtime.abort_all(comm, 2, "hpc-bkd: bye")
    assert exc.value.code == 2 and comm.aborted is None
    assert capsys.readouterr().err == "hpc-bkd: bye\n"


def test_abort_all_aborts_every_rank_with_the_code(capsys: pytest.CaptureFixture[str]):
    comm = _FakeComm(4)
    with pytest.raises(KeyboardInterrupt):
        runtime.abort_all(comm, 1, "hpc-bkd: aborting all 4 ranks")
    assert comm.aborted == 1
    assert "aborting all 4 ranks" in capsys.readouterr().err
