"""Student blocks: stacked depthwise-separable convolutions with the teacher block's shapes."""
from __future__ import annotations

import torch
from torch import nn

from .surgery import BlockSpec


def block_seed(seed: int, index: int) -> int:
    """The seed of one block: from the global seed and the block index, never the rank."""
    return (seed * 1_000_003 + 7919 * (index + 1)) % (2**31 - 1)


def build_student(spec: BlockSpec, depth: int = 2, width: float = 1.0, seed: int = 0) -> nn.Sequential:
    """A depthwise-separable replacement for ``spec``: same input/output shape and stride.

    Each layer is 3x3 depthwise + BN + ReLU + 1x1 pointwise + BN. Layers are joined by ReLUs, and
    the last layer ends in a ReLU only when the teacher's target is itself non-negative; a target
    taken before the activation (a BatchNorm output) can be negative and the student must be able
    to produce it.
    """
    in_ch, out_ch = spec.in_shape[0], spec.out_shape[0]
    hidden = max(4, int(round(out_ch * width)))
    layers: list[nn.Module] = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(block_seed(seed, spec.index))
        channels = in_ch
        for i in range(depth):
            last = i == depth - 1
            nxt = out_ch if last else hidden
            layers += [
                nn.Conv2d(channels, channels, 3, stride=spec.stride if i == 0 else 1, padding=1,
                          groups=channels, bias=False),
                nn.BatchNorm2d(channels),
                nn.ReLU(inplace=True),
                nn.Conv2d(channels, nxt, 1, bias=False),
                nn.BatchNorm2d(nxt),
            ]
            if not last or spec.nonnegative_output:
                layers.append(nn.ReLU(inplace=True))
            channels = nxt
    student = nn.Sequential(*layers)
    with torch.no_grad():
        student.eval()
        got = tuple(student(torch.zeros(1, *spec.in_shape)).shape[1:])
        student.train()
    if got != tuple(spec.out_shape):
        raise ValueError(f"block {spec.index} ({spec.name}): student output {got} != teacher {spec.out_shape}")
    return student
