"""Process-level runtime settings that the ranks rely on."""
import subprocess
import sys

import pytest

FAULTS = r"""
import resource, sys, torch
from torch import nn
if sys.argv[1] == "keep":
    from hpc_bkd.runtime import keep_freed_memory
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
