"""Energy counters: NVML total energy for this rank's GPU, RAPL package energy for the CPU.

Both are cumulative hardware counters read at start and stop, so measuring costs nothing while
training. Where a counter cannot be read, the result says "unavailable" and why, instead of a number
that looks real. RAPL counts a whole CPU package, shared by every rank of a node: the report sums it
once per host, GPU energy once per rank.
"""
from __future__ import annotations

import glob
import os
from typing import Any

import torch

RAPL_GLOB = "/sys/class/powercap/intel-rapl:[0-9]*"


def _rapl_domains() -> tuple[list[str], str | None]:
    domains = [d for d in sorted(glob.glob(RAPL_GLOB)) if d.count(":") == 1]  # packages, not sub-zones
    if not domains:
        return [], "no RAPL package domains under /sys/class/powercap (not an Intel/AMD host with powercap)"
    try:
        for d in domains:
            with open(os.path.join(d, "energy_uj")) as fh:
                int(fh.read())
    except OSError as exc:
        return [], f"RAPL not readable ({exc.strerror}; needs root or a readable energy_uj)"
    return domains, None


def _read_rapl(domains: list[str]) -> list[tuple[int, int]]:
    out = []
    for d in domains:
        with open(os.path.join(d, "energy_uj")) as fh:
            value = int(fh.read())
        try:
            with open(os.path.join(d, "max_energy_range_uj")) as fh:
                wrap = int(fh.read())
        except OSError:
            wrap = 2**32
        out.append((value, wrap))
    return out


class EnergyMeter:
    """Reads energy counters around a phase: ``start()``, work, ``stop() -> dict``."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._gpu_handle: Any = None
        self.gpu_reason: str | None = None
        self._gpu0: int | None = None
        self.rapl, self.cpu_reason = _rapl_domains()
        self._rapl0: list[tuple[int, int]] = []
        if device.type == "cuda":
            try:
                import pynvml  # from the nvidia-ml-py package

                pynvml.nvmlInit()
                index = device.index if device.index is not None else torch.cuda.current_device()
                visible = os.environ.get("CUDA_VISIBLE_DEVICES")
                if visible:
                    ids = [v.strip() for v in visible.split(",")]
                    index = int(ids[index]) if ids[index].isdigit() else index
                self._gpu_handle = pynvml.nvmlDeviceGetHandleByIndex(index)
                pynvml.nvmlDeviceGetTotalEnergyConsumption(self._gpu_handle)
            except Exception as exc:  # NVML missing, old GPU without the counter, ...
                self._gpu_handle, self.gpu_reason = None, f"NVML energy counter unavailable ({exc})"
        else:
            self.gpu_reason = "no GPU on this rank"

    def start(self) -> None:
        if self._gpu_handle is not None:
            import pynvml
            self._gpu0 = pynvml.nvmlDeviceGetTotalEnergyConsumption(self._gpu_handle)
        if self.rapl:
            self._rapl0 = _read_rapl(self.rapl)

    def stop(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self._gpu_handle is not None and self._gpu0 is not None:
            import pynvml
            out["gpu_j"] = (pynvml.nvmlDeviceGetTotalEnergyConsumption(self._gpu_handle) - self._gpu0) / 1000.0
        else:
            out["gpu_j"], out["gpu_unavailable"] = None, self.gpu_reason
        if self.rapl and self._rapl0:
            total = 0
            for (v0, wrap), (v1, _) in zip(self._rapl0, _read_rapl(self.rapl)):
                total += v1 - v0 if v1 >= v0 else v1 + wrap - v0
            out["cpu_package_j"] = total / 1e6
        else:
            out["cpu_package_j"], out["cpu_unavailable"] = None, self.cpu_reason
        return out
