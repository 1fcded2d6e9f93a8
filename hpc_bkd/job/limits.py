"""Will the job fit this rank's memory? Estimated before anything is allocated.

``model.width: 200`` or ``data.image_size: 100000`` are a typo away, and allocating them first
means minutes of swapping and an allocator traceback (or the OOM killer) instead of a message.
So the teacher is built on PyTorch's ``meta`` device (shapes only, no memory) and run once on a
meta image: its parameter count and the activations one image leaves for the backward pass give
the memory training it takes, which is compared with what this rank has (``MemAvailable`` split
between the node's ranks, or the GPU's free memory) before the real model or data exist.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from hpc_bkd.blocks.models import build_model
from hpc_bkd.config import Config, ConfigError
from hpc_bkd.data.sources import SOURCES
from hpc_bkd.distributed.runtime import mem_available_bytes

# images held in memory by the built-in datasets (digits, CIFAR): decoded as uint8
_DATASET_IMAGES = {"digits": 1797, "cifar10": 60_000, "cifar100": 60_000}
# bytes per parameter while training: weights, gradients, optimizer state, a best copy (fp32)
_PER_PARAM = 4 * 4
# bytes per activation value kept for the backward pass (fp32; its gradient is transient): a low
# estimate on purpose, so only a job that cannot fit is refused, never a tight one that would
_PER_ACTIVATION = 4


@dataclass(frozen=True)
class Footprint:
    """The estimated memory of training the teacher (and of the decoded images held in memory)."""

    params: int
    activations_per_image: int
    data_bytes: int
    batch_size: int

    @property
    def bytes(self) -> int:
        return (self.params * _PER_PARAM + self.activations_per_image * self.batch_size * _PER_ACTIVATION
                + self.data_bytes)


def footprint(cfg: Config) -> Footprint | None:
    """The teacher's training footprint, from a model on the meta device; None when the model is
    too large even to describe (its sizes overflow)."""
    source = SOURCES.get(cfg.data.dataset)
    names = source.class_names(cfg.data) if source is not None else None
    classes = len(names) if names else 1000  # unknown until the source is loaded: ImageNet's count
    size = cfg.data.image_size
    try:
        with torch.device("meta"):
            # eval: a train-mode BatchNorm refuses one image on a 1x1 map (ResNet's last stage at 32x32)
            model = build_model(cfg.model.arch, classes, cfg.model.width, cfg.model.kwargs).eval()
            params = sum(p.numel() for p in model.parameters())
            activations = _activations(model, (1, 3, size, size))
    except (RuntimeError, ValueError, OverflowError, MemoryError) as exc:
        if "unknown" in str(exc):  # an architecture typo: the model's own message is the clear one
            raise
        return None
    data = _DATASET_IMAGES.get(cfg.data.dataset, 0) * 3 * size * size
    return Footprint(params, activations, data, cfg.data.batch_size)


def _activations(model: nn.Module, shape: tuple[int, ...]) -> int:
    """Values the leaf modules output for one image (what a training step keeps for backward)."""
    total = 0

    def count(_: nn.Module, __: object, out: object) -> None:
        nonlocal total
        if isinstance(out, torch.Tensor):
            total += out.numel()

    hooks = [m.register_forward_hook(count) for m in model.modules() if not list(m.children())]
    try:
        model(torch.empty(shape))
    finally:
        for h in hooks:
            h.remove()
    return total


def check_fits(cfg: Config, device: torch.device, ranks_on_node: int = 1) -> None:
    """A ``ConfigError`` with the figures when training the teacher would not fit this rank."""
    available = _available(device, ranks_on_node)
    what = (f"model.arch={cfg.model.arch}, model.width={cfg.model.width:g}, data.image_size={cfg.data.image_size}, "
            f"data.batch_size={cfg.data.batch_size}")
    fix = "lower model.width, data.image_size or data.batch_size"
    need = footprint(cfg)
    if need is None:
        raise ConfigError(f"{what}: the model is too large to build at all; {fix}")
    if available is not None and need.bytes > available:
        raise ConfigError(
            f"{what}: training needs at least {_gib(need.bytes)} ({need.params:,} parameters, "
            f"{need.activations_per_image:,} activation values per image"
            + (f", {_gib(need.data_bytes)} of decoded images" if need.data_bytes >= 2**27 else "")
            + f"), more than the {_gib(available)} this rank has ({device}); {fix}")


def _available(device: torch.device, ranks_on_node: int) -> int | None:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    left = mem_available_bytes()
    return None if left is None else left // max(ranks_on_node, 1)


def _gib(n: int) -> str:
    return f"{n / 2**30:,.1f} GiB"
