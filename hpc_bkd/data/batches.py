"""Splits, and batches addressed by (epoch, step).

Every rank sees the same batch for the same (epoch, step): the order and the augmentation are seeded
from the global seed, the epoch and the step (streaming: the image index), never from the rank. That
is what lets one teacher pass serve all the blocks of a rank, a block resume mid-epoch, and a block
trained on rank 1 equal the same block trained on rank 0.

Two storages give the same views (``batch``: rows of a training batch; ``chunks``: rows in order):
``ImageSet`` holds every image as uint8 in memory (digits, CIFAR, small ImageFolders: no worker
processes, no rank ever waits for data; CIFAR-10 takes 150 MB), ``streaming.StreamSet`` reads an
ImageFolder from disk with DataLoader workers (ImageNet-scale data; ``data.storage``). Where the
images come from is ``sources``.
"""
from __future__ import annotations

import functools
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import ClassVar, Protocol

import torch
import torch.nn.functional as F

from hpc_bkd.errors import UserError


class DataError(UserError, RuntimeError):
    """A dataset is missing or malformed; the message names the expected layout."""


@dataclass
class DataStats:
    """What getting the data cost a rank: seconds its loops waited for batches (decoding,
    gathering, augmenting, or blocked on workers), and the unreadable files skipped (path: why)."""

    wait_s: float = 0.0
    batches: int = 0
    bad_images: dict[str, str] = field(default_factory=dict)


@dataclass
class ImageSet:
    """A split held in memory as uint8 tensors."""

    images: torch.Tensor  # uint8, N x C x H x W
    labels: torch.Tensor  # int64, N

    storage: ClassVar[str] = "memory"

    def __len__(self) -> int:
        return int(self.labels.numel())

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    def subset(self, index: torch.Tensor) -> ImageSet:
        return ImageSet(self.images[index], self.labels[index])

    def batch(self, batch_size: int, seed: int, epoch: int, step: int, augment: str = "none",
              rows: slice | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``rows`` of training batch (epoch, step) (uint8). The whole batch is augmented before
        the rows are taken: its random shifts are drawn per batch, from (seed, epoch, step)."""
        idx = batch_indices(len(self), batch_size, seed, epoch, step)
        images, labels = self.images[idx], self.labels[idx]
        if augment != "none":
            gen = torch.Generator().manual_seed((seed * 100_003 + epoch) * 100_019 + step)
            images = _augment(images, gen, flips=augment == "crop-flip")
        if rows is not None:
            images, labels = images[rows], labels[rows]
        return images, labels

    def chunks(self, rows: range | None = None, size: int = 256) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        rows = rows if rows is not None else range(len(self))
        for i in range(rows.start, rows.stop, size):
            j = min(i + size, rows.stop)
            yield self.images[i:j], self.labels[i:j]


class Split(Protocol):
    """A split as the stages use it, in memory (``ImageSet``) or streamed (``streaming.StreamSet``)."""

    storage: ClassVar[str]

    def __len__(self) -> int: ...

    @property
    def image_shape(self) -> tuple[int, int, int]: ...

    def subset(self, index: torch.Tensor) -> Split: ...

    def batch(self, batch_size: int, seed: int, epoch: int, step: int, augment: str = "none",
              rows: slice | None = None) -> tuple[torch.Tensor, torch.Tensor]: ...

    def chunks(self, rows: range | None = None, size: int = 256) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...


@dataclass
class Data:
    train: Split
    val: Split
    test: Split
    num_classes: int
    mean: torch.Tensor  # per channel, in [0, 1] units
    std: torch.Tensor
    stats: DataStats = field(default_factory=DataStats)
    device: torch.device | None = None  # streaming on a GPU: batches are copied there non-blocking

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return self.train.image_shape

    @property
    def storage(self) -> str:
        return self.train.storage

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float().div_(255.0)
        mean, std = self.mean.to(x.device), self.std.to(x.device)
        return (x - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)

    def to_device(self, images: torch.Tensor) -> torch.Tensor:
        """Streamed uint8 batches go to the GPU before normalising (a quarter of the bytes), from
        pinned memory without blocking; memory-held ones stay as they always were."""
        if self.storage == "stream" and self.device is not None and self.device.type == "cuda":
            return images.to(self.device, non_blocking=True)
        return images

    def close(self) -> None:
        """Stop the streaming workers, if any (they also stop with the process)."""
        pool = getattr(self.train, "pool", None)
        if pool is not None:
            pool.close()


# ------------------------------------------------------------------------------------ batches


def steps_per_epoch(n: int, batch_size: int) -> int:
    """Full batches only (BatchNorm needs more than one sample), at least one."""
    return max(1, n // batch_size)


@functools.lru_cache(maxsize=4)
def _epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


def _augment(images: torch.Tensor, gen: torch.Generator, flips: bool, pad: int = 4) -> torch.Tensor:
    n, _, h, w = images.shape
    padded = F.pad(images, (pad, pad, pad, pad))
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    flip = (torch.rand(n, generator=gen) < 0.5) & flips
    out = torch.empty_like(images)
    for i in range(n):
        crop = padded[i, :, dy[i]: dy[i] + h, dx[i]: dx[i] + w]
        out[i] = crop.flip(-1) if flip[i] else crop
    return out


def batch_indices(n: int, batch_size: int, seed: int, epoch: int, step: int) -> torch.Tensor:
    """Which of the ``n`` training images make batch number ``step`` of ``epoch``."""
    return _epoch_order(n, seed, epoch)[step * batch_size: (step + 1) * batch_size]


def train_batch(data: Data, batch_size: int, seed: int, epoch: int, step: int,
                augment: str = "none", rows: slice | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The training batch number ``step`` of ``epoch``: identical on every rank. ``rows``: only
    those rows of it (a team member's share; streaming reads only those files)."""
    t0 = time.perf_counter()
    images, labels = data.train.batch(batch_size, seed, epoch, step, augment, rows)
    images = data.to_device(images)
    data.stats.wait_s += time.perf_counter() - t0
    data.stats.batches += 1
    return data.normalize(images), labels


def eval_batches(data: Data, split: Split, batch_size: int,
                 rows: range | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``split`` (its ``rows`` only, if given) in order, normalised, ``batch_size`` at a time."""
    chunks = split.chunks(rows, batch_size)
    while True:
        t0 = time.perf_counter()
        try:
            images, labels = next(chunks)
        except StopIteration:
            return
        images = data.to_device(images)
        data.stats.wait_s += time.perf_counter() - t0
        yield data.normalize(images), labels


def describe(data: Data) -> str:
    return (f"{len(data.train)} train / {len(data.val)} val / {len(data.test)} test images "
            f"of {'x'.join(map(str, data.input_shape))}, {data.num_classes} classes"
            + (", streamed from disk" if data.storage == "stream" else ""))

