"""Datasets as in-memory uint8 tensors, and batches addressed by (epoch, step).

Every rank sees the same batch for the same (epoch, step): the order and the augmentation are seeded
from the global seed, the epoch and the step, never from the rank. That is what lets one teacher
pass serve all the blocks of a rank, a block resume mid-epoch, and a block trained on rank 1 equal
the same block trained on rank 0. Holding images as uint8 in memory means no DataLoader workers (no
fork under MPI) and no rank ever waits for data; CIFAR-10 takes 150 MB.
"""
from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .config import DataConfig


class DataError(RuntimeError):
    """A dataset is missing or malformed; the message names the expected layout."""


@dataclass
class ImageSet:
    images: torch.Tensor  # uint8, N x C x H x W
    labels: torch.Tensor  # int64, N

    def __len__(self) -> int:
        return int(self.labels.numel())


@dataclass
class Data:
    train: ImageSet
    val: ImageSet
    test: ImageSet
    num_classes: int
    mean: torch.Tensor  # per channel, in [0, 1] units
    std: torch.Tensor

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.train.images.shape[1:])  # type: ignore[return-value]

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float().div_(255.0)
        return (x - self.mean.view(1, -1, 1, 1)) / self.std.view(1, -1, 1, 1)


# ------------------------------------------------------------------------------------ loaders


def _digits(cfg: DataConfig) -> tuple[ImageSet, ImageSet, int]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()  # bundled with scikit-learn: 1797 8x8 images, no download
    images = torch.from_numpy(digits.images).float().unsqueeze(1) * (255.0 / 16.0)
    images = F.interpolate(images, size=(cfg.image_size, cfg.image_size), mode="bilinear", align_corners=False)
    images = images.clamp_(0, 255).round_().to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
    labels = torch.from_numpy(digits.target).long()
    train_idx, test_idx = train_test_split(np.arange(len(labels)), test_size=0.2, random_state=0,
                                           stratify=digits.target)
    train_idx, test_idx = torch.from_numpy(train_idx), torch.from_numpy(test_idx)
    return ImageSet(images[train_idx], labels[train_idx]), ImageSet(images[test_idx], labels[test_idx]), 10


def _cifar(cfg: DataConfig) -> tuple[ImageSet, ImageSet, int]:
    import torchvision

    ten = cfg.dataset == "cifar10"
    cls = torchvision.datasets.CIFAR10 if ten else torchvision.datasets.CIFAR100
    folder = "cifar-10-batches-py" if ten else "cifar-100-python"
    files = "data_batch_1..5, test_batch, batches.meta" if ten else "train, test, meta"
    try:
        sets = [cls(cfg.root, train=train, download=False) for train in (True, False)]
    except (RuntimeError, OSError, ValueError) as exc:
        raise DataError(
            f"{cfg.dataset} not found or corrupted under data.root={cfg.root!r} ({exc}). Expected "
            f"{cfg.root}/{folder}/ holding {files} (the python version from "
            f"https://www.cs.toronto.edu/~kriz/cifar.html, extracted). Nothing is downloaded at run time."
        ) from None
    out = []
    for ds in sets:
        images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
        if images.shape[-1] != cfg.image_size:
            images = F.interpolate(images.float(), size=(cfg.image_size,) * 2, mode="bilinear",
                                   align_corners=False).round_().clamp_(0, 255).to(torch.uint8)
        out.append(ImageSet(images, torch.tensor(ds.targets, dtype=torch.long)))
    return out[0], out[1], 10 if ten else 100


def _imagefolder(cfg: DataConfig) -> tuple[ImageSet, ImageSet, int]:
    import torchvision
    from torchvision.transforms import v2

    root = Path(cfg.root or "")
    test_dir = next((root / d for d in ("val", "test") if (root / d).is_dir()), None)
    layout = f"{root}/train/<class>/<image> and {root}/val/<class>/<image> (or test/ instead of val/)"
    if not (root / "train").is_dir() or test_dir is None:
        raise DataError(f"imagefolder: expected {layout}; found {sorted(p.name for p in root.glob('*')) or 'nothing'}")
    transform = v2.Compose([v2.ToImage(), v2.Resize((cfg.image_size, cfg.image_size), antialias=True),
                            v2.RGB(), v2.ToDtype(torch.uint8)])
    sets = []
    for folder in (root / "train", test_dir):
        try:
            ds = torchvision.datasets.ImageFolder(str(folder), transform=transform)
        except (FileNotFoundError, RuntimeError) as exc:
            raise DataError(f"imagefolder: {exc}; expected {layout}") from None
        images = torch.stack([ds[i][0] for i in range(len(ds))])
        sets.append((ImageSet(images, torch.tensor(ds.targets, dtype=torch.long)), ds.classes))
    (train, train_classes), (test, test_classes) = sets
    if train_classes != test_classes:
        raise DataError(f"imagefolder: train classes {train_classes} differ from {test_dir.name} classes {test_classes}")
    return train, test, len(train_classes)


LOADERS = {"digits": _digits, "cifar10": _cifar, "cifar100": _cifar, "imagefolder": _imagefolder}


def load_data(cfg: DataConfig, seed: int = 0) -> Data:
    """Load a dataset and split a validation set off the training set (fixed by ``seed``)."""
    if cfg.dataset not in LOADERS:
        raise DataError(f"unknown data.dataset {cfg.dataset!r}; valid: {', '.join(LOADERS)}")
    if cfg.root is not None and cfg.dataset != "digits" and not Path(cfg.root).is_dir():
        raise DataError(f"data.root={cfg.root!r} is not a directory (dataset {cfg.dataset}); "
                        "datasets are read from local files and never downloaded")
    train, test, num_classes = LOADERS[cfg.dataset](cfg)
    perm = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
    if cfg.train_limit:
        perm = perm[: cfg.train_limit]
    n_val = int(round(len(perm) * cfg.val_fraction))
    val_idx, train_idx = perm[:n_val], perm[n_val:]
    if len(train_idx) < 2:
        raise DataError(f"{cfg.dataset}: only {len(train_idx)} training images after the validation split")
    train_set = ImageSet(train.images[train_idx], train.labels[train_idx])
    val_set = ImageSet(train.images[val_idx], train.labels[val_idx]) if n_val else test
    pixels = train_set.images.float().div(255.0)
    mean = pixels.mean(dim=(0, 2, 3))
    std = pixels.std(dim=(0, 2, 3)).clamp_min(1e-3)
    return Data(train_set, val_set, test, num_classes, mean, std)


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
                augment: str = "none") -> tuple[torch.Tensor, torch.Tensor]:
    """The training batch number ``step`` of ``epoch``: identical on every rank."""
    idx = batch_indices(len(data.train), batch_size, seed, epoch, step)
    images = data.train.images[idx]
    if augment != "none":
        gen = torch.Generator().manual_seed((seed * 100_003 + epoch) * 100_019 + step)
        images = _augment(images, gen, flips=augment == "crop-flip")
    return data.normalize(images), data.train.labels[idx]


def eval_batches(data: Data, split: ImageSet, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for start in range(0, len(split), batch_size):
        yield data.normalize(split.images[start: start + batch_size]), split.labels[start: start + batch_size]


def describe(data: Data) -> str:
    return (f"{len(data.train)} train / {len(data.val)} val / {len(data.test)} test images "
            f"of {'x'.join(map(str, data.input_shape))}, {data.num_classes} classes")

