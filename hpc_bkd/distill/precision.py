"""Mixed precision (``run.precision``): autocast for the teacher's forward and the students' steps.

* ``fp32``: nothing changes (every context is a no-op; results are bit-identical to before).
* ``bf16``: forwards under ``torch.autocast`` in bfloat16 (CPUs with AVX-512 BF16 / AMX, Ampere
  and later GPUs). bfloat16 has float32's range, so no loss scaling is needed.
* ``fp16``: forwards in float16 with a ``torch.amp.GradScaler`` per optimizer: float16's small
  range would flush small gradients to zero, so the loss is scaled up before ``backward`` and the
  gradients unscaled (and the step skipped on an overflow) before the optimizer step.

Weights, gradients, optimizer state, checkpoints and exported models stay float32: autocast only
changes the arithmetic of the forward, and losses are computed in float32 from its outputs.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@contextlib.contextmanager
def autocast(precision: str, device: torch.device) -> Iterator[None]:
    """The forward's arithmetic for ``precision`` on ``device`` (a no-op for fp32)."""
    dtype = DTYPES.get(precision)
    if dtype is None:
        yield
        return
    with torch.autocast(device.type, dtype=dtype):
        yield


class Amp:
    """One optimizer's precision: its autocast and, for fp16, its gradient scaler."""

    def __init__(self, precision: str = "fp32", device: torch.device | None = None) -> None:
        self.precision = precision
        self.device = device or torch.device("cpu")
        self.scaler = torch.amp.GradScaler(self.device.type) if precision == "fp16" else None

    def autocast(self) -> contextlib.AbstractContextManager[None]:
        return autocast(self.precision, self.device)

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        """The optimizer step (fp16: on unscaled gradients, skipped if any overflowed)."""
        if self.scaler is None:
            optimizer.step()
            return
        self.scaler.step(optimizer)
        self.scaler.update()

    def state_dict(self) -> dict[str, Any]:
        """The gradient scaler's scale and growth tracker (fp16; empty otherwise): a resumed block
        goes on with the scale it had, instead of re-learning it through skipped steps."""
        return self.scaler.state_dict() if self.scaler is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)
