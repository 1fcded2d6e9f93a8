"""Student blocks with the teacher block's shapes: the builders of the built-in candidate kinds
(``candidates.KINDS`` names them), and ``build_candidate``, which builds any kind's student."""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from hpc_bkd.blocks.candidates import KINDS, Candidate, paper_candidate, unit_seed
from hpc_bkd.blocks.surgery import BlockSpec
from hpc_bkd.blocks.whole_units import NotApplicable, shrink_unit, skip_layers

# Students train in channels-last layout: on CPU (oneDNN) their depthwise and 1x1 convolutions and
# BatchNorms run up to 2-3x faster that way than in NCHW (measured on the default job's block shapes).
# Only the training copy uses it: checkpoints hold plain contiguous tensors.
TRAIN_FORMAT = torch.channels_last


def build_student(spec: BlockSpec, depth: int = 2, width: float = 1.0, seed: int = 0) -> nn.Sequential:
    """The paper's depthwise-separable replacement for ``spec``: the student a job that lists no
    candidates trains (``build_candidate`` of ``paper_candidate``, the same weights)."""
    return build_candidate(spec, paper_candidate(depth, width), seed)


def _separable(spec: BlockSpec, depth: int, width: float) -> Callable[[], list[nn.Module]]:
    """Same input/output shape and stride as ``spec``.

    Each layer is 3x3 depthwise + BN + ReLU + 1x1 pointwise + BN. Layers are joined by ReLUs, and
    the last layer ends in a ReLU only when the teacher's target is itself non-negative; a target
    taken before the activation (a BatchNorm output) can be negative and the student must be able
    to produce it.
    """
    _needs_maps(spec, "separable")
    in_ch, out_ch = spec.in_shape[0], spec.out_shape[0]
    hidden = max(4, int(round(out_ch * width)))

    def layers() -> list[nn.Module]:
        out: list[nn.Module] = []
        channels = in_ch
        for i in range(depth):
            last = i == depth - 1
            nxt = out_ch if last else hidden
            out += [
                nn.Conv2d(channels, channels, 3, stride=spec.stride if i == 0 else 1, padding=1,
                          groups=channels, bias=False),
                nn.BatchNorm2d(channels),
                nn.ReLU(inplace=True),
                nn.Conv2d(channels, nxt, 1, bias=False),
                nn.BatchNorm2d(nxt),
            ]
            if not last or spec.nonnegative_output:
                out.append(nn.ReLU(inplace=True))
            channels = nxt
        return out
    return layers


def _lowrank(spec: BlockSpec, rank: float) -> Callable[[], list[nn.Module]]:
    """A rank-r factorisation of the teacher's 3x3 convolution: 3x3 conv to r x the output
    channels, BN, 1x1 conv back, BN (linear in between, like the factorised convolution it
    approximates). Two dense operators where a separable student has four: fewer per-op costs."""
    _needs_maps(spec, "lowrank")
    in_ch, out_ch = spec.in_shape[0], spec.out_shape[0]
    inner = max(4, int(round(out_ch * rank)))

    def layers() -> list[nn.Module]:
        out: list[nn.Module] = [
            nn.Conv2d(in_ch, inner, 3, stride=spec.stride, padding=1, bias=False), nn.BatchNorm2d(inner),
            nn.Conv2d(inner, out_ch, 1, bias=False), nn.BatchNorm2d(out_ch)]
        if spec.nonnegative_output:
            out.append(nn.ReLU(inplace=True))
        return out
    return layers


def _needs_maps(spec: BlockSpec, kind: str) -> None:
    if spec.layout != "chw":
        raise NotApplicable(f"{kind} replaces convolutions on (C, H, W) maps; this block's tensors are {spec.layout}")


def _shrink(spec: BlockSpec, fraction: float, teacher: nn.Module | None) -> Callable[[], list[nn.Module]]:
    if teacher is None:
        raise ValueError(f"block {spec.index}: a shrink student is built from the teacher's unit; pass teacher=")
    unit = shrink_unit(teacher, spec, fraction)  # raises NotApplicable before any student is made
    return lambda: [unit]


Builder = Callable[[BlockSpec, dict[str, float], "nn.Module | None"], Callable[[], list[nn.Module]]]
"""A candidate kind's builder (``candidates.Kind.builder``): from the block, the candidate's
parameters and the teacher the block was found in, a function making the student's modules (called
under the unit's seed); raises ``NotApplicable`` where the kind does not fit the block."""


def separable(spec: BlockSpec, params: dict[str, float], teacher: nn.Module | None) -> Callable[[], list[nn.Module]]:
    return _separable(spec, int(params["d"]), params["w"])


def lowrank(spec: BlockSpec, params: dict[str, float], teacher: nn.Module | None) -> Callable[[], list[nn.Module]]:
    return _lowrank(spec, params["r"])


def skip(spec: BlockSpec, params: dict[str, float], teacher: nn.Module | None) -> Callable[[], list[nn.Module]]:
    return lambda: skip_layers(spec)


def shrink(spec: BlockSpec, params: dict[str, float], teacher: nn.Module | None) -> Callable[[], list[nn.Module]]:
    return _shrink(spec, params["w"], teacher)


def build_candidate(spec: BlockSpec, candidate: Candidate, seed: int = 0,
                    teacher: nn.Module | None = None) -> nn.Sequential:
    """Block ``spec``'s student of kind ``candidate``, seeded by block and candidate (never rank).
    ``teacher``: the model ``spec`` was found in (``shrink`` starts from its unit's weights)."""
    build: Builder = KINDS[candidate.kind].load_builder()
    return _checked(spec, build(spec, candidate.params, teacher),
                    unit_seed(seed, spec.index, candidate.name))


def applies(spec: BlockSpec, candidate: Candidate, teacher: nn.Module | None = None) -> str | None:
    """None where ``candidate`` fits block ``spec``; else why not (the kind is left out for it)."""
    try:
        build_candidate(spec, candidate, 0, teacher)
    except NotApplicable as exc:
        return str(exc)
    return None


def _checked(spec: BlockSpec, layers: Callable[[], list[nn.Module]], seed: int) -> nn.Sequential:
    """The student made by ``layers`` under ``seed``, checked to give the teacher block's shape."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        student = nn.Sequential(*layers())
    with torch.no_grad():
        student.eval()
        got = tuple(student(torch.zeros(1, *spec.in_shape)).shape[1:])
        student.train()
    if got != tuple(spec.out_shape):
        raise ValueError(f"block {spec.index} ({spec.name}): student output {got} != teacher {spec.out_shape}")
    return student


def matches_activation(spec: BlockSpec, match: str) -> bool:
    """Whether ``spec`` trains on the activation (``distill.match: activation`` and the teacher
    applies a ReLU right after the block) rather than on the block's raw output."""
    return match == "activation" and spec.relu_after


def _flat(t: torch.Tensor) -> torch.Tensor:
    """A 1-d view of ``t`` in memory order (a copy only for layouts other than the two dense ones)."""
    if t.is_contiguous():
        return t.view(-1)
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last):
        return t.permute(0, 2, 3, 1).reshape(-1)
    return t.reshape(-1)


class _BlockMSE(torch.autograd.Function):
    """Mean squared error of ``out`` (or ReLU(out)) against ``target``, with the gradient returned
    in ``out``'s own memory layout.

    ``F.mse_loss`` hands back an NCHW gradient whatever the layout of its input; for a channels-last
    student every op of the backward pass then mixes layouts, and on CPU that costs several times a
    plain pass on large blocks. One difference tensor serves the forward and the backward.
    """

    @staticmethod
    def forward(ctx, out: torch.Tensor, target: torch.Tensor, relu: bool) -> torch.Tensor:
        diff = out.clamp_min(0).sub_(target) if relu else out - target
        ctx.relu = relu
        ctx.save_for_backward(out, diff)
        flat = _flat(diff)
        return torch.dot(flat, flat) / diff.numel()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        out, diff = ctx.saved_tensors
        scale = grad * (2.0 / diff.numel())
        if ctx.relu:
            return torch.ops.aten.threshold_backward(diff, out, 0).mul_(scale), None, None
        return diff * scale, None, None


def block_loss(out: torch.Tensor, target: torch.Tensor, match_activation: bool = False) -> torch.Tensor:
    """The distillation objective of one block: MSE to the teacher block's output, or, with
    ``match_activation`` (the teacher applies a ReLU right after the block), MSE after that ReLU,
    which is all the rest of the network sees. Shared by training and by the cost measurement,
    so the planner times exactly the work it plans."""
    if match_activation:
        target = F.relu(target)
    if out.dtype != target.dtype or out.shape != target.shape:
        return F.mse_loss(F.relu(out) if match_activation else out, target)
    return _BlockMSE.apply(out, target, match_activation)
