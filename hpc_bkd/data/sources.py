"""Datasets, and batches addressed by (epoch, step).

Every rank sees the same batch for the same (epoch, step): the order and the augmentation are seeded
from the global seed, the epoch and the step (streaming: the image index), never from the rank. That
is what lets one teacher pass serve all the blocks of a rank, a block resume mid-epoch, and a block
trained on rank 1 equal the same block trained on rank 0.

Two storages give the same views (``batch``: rows of a training batch; ``chunks``: rows in order):
``ImageSet`` holds every image as uint8 in memory (digits, CIFAR, small ImageFolders: no worker
processes, no rank ever waits for data; CIFAR-10 takes 150 MB), ``streaming.StreamSet`` reads an
ImageFolder from disk with DataLoader workers (ImageNet-scale data; ``data.storage``).
"""
from __future__ import annotations

import functools
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Union

import numpy as np
import torch
import torch.nn.functional as F

from hpc_bkd.config import Config, DataConfig

if TYPE_CHECKING:
    from hpc_bkd.data.streaming import StreamSet

log = logging.getLogger("hpc_bkd")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
STATS_SAMPLE = 1000  # streaming: images the mean and std are computed from

class DataError(RuntimeError):
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


Split = Union[ImageSet, "StreamSet"]


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


def _imagefolder(cfg: DataConfig, device: torch.device | None = None, stats: DataStats | None = None
                 ) -> tuple[Split, Split, int]:
    """An ImageFolder as two ``StreamSet``s (train, val-or-test) sharing one pool of workers;
    ``load_data`` decodes them into memory when ``data.storage`` says so."""
    from hpc_bkd.data.decode import Geometry
    from hpc_bkd.data.listing import FolderError
    from hpc_bkd.data.streaming import FeedPool, LoaderOptions, StreamSet, list_folder

    root = Path(cfg.root or "")
    test_dir = next((root / d for d in ("val", "test") if (root / d).is_dir()), None)
    layout = f"{root}/train/<class>/<image> and {root}/val/<class>/<image> (or test/ instead of val/)"
    if not (root / "train").is_dir() or test_dir is None:
        raise DataError(f"imagefolder: expected {layout}; found {sorted(p.name for p in root.glob('*')) or 'nothing'}")
    opts = LoaderOptions(cfg.workers, cfg.prefetch, device is not None and device.type == "cuda")
    pool = FeedPool(opts, stats if stats is not None else DataStats(), cfg.on_bad_image == "skip")
    geo = Geometry(cfg.image_size, cfg.crop_fraction)
    sets: list[tuple[Split, list[str]]] = []
    for folder in (root / "train", test_dir):
        try:
            files, labels, classes = list_folder(folder, cfg.follow_symlinks)
        except FolderError as exc:
            raise DataError(f"imagefolder: {exc}") from None
        except FileNotFoundError as exc:
            raise DataError(f"imagefolder: {exc}; expected {layout}") from None
        sets.append((StreamSet(files, labels, np.arange(len(files)), geo, pool), classes))
    (train, train_classes), (test, test_classes) = sets
    if train_classes != test_classes:
        raise DataError(f"imagefolder: train classes {train_classes} differ from {test_dir.name} classes {test_classes}")
    if storage_for(cfg, len(train) + len(test)) == "memory":
        assert isinstance(train, StreamSet) and isinstance(test, StreamSet)
        train, test = train.materialize(), test.materialize()
        pool.close()
    return train, test, len(train_classes)


def storage_for(cfg: DataConfig, images: int) -> str:
    """``data.storage`` resolved: auto holds an ImageFolder in memory when its decoded images fit
    ``data.memory_limit_gb``, else streams it; other datasets are always held in memory."""
    if cfg.dataset != "imagefolder":
        return "memory"
    if cfg.storage != "auto":
        return cfg.storage
    return "memory" if images * 3 * cfg.image_size ** 2 <= cfg.memory_limit_gb * 2**30 else "stream"


LOADERS = {"digits": _digits, "cifar10": _cifar, "cifar100": _cifar, "imagefolder": _imagefolder}


def load_data(cfg: DataConfig, seed: int = 0, device: torch.device | None = None) -> Data:
    """Load a dataset and split a validation set off the training set (fixed by ``seed``).
    ``device``: where a streamed batch is going (pinned memory and non-blocking copies on a GPU)."""
    if cfg.dataset not in LOADERS:
        raise DataError(f"unknown data.dataset {cfg.dataset!r}; valid: {', '.join(LOADERS)}")
    if cfg.root is not None and cfg.dataset != "digits" and not Path(cfg.root).is_dir():
        raise DataError(f"data.root={cfg.root!r} is not a directory (dataset {cfg.dataset}); "
                        "datasets are read from local files and never downloaded")
    if cfg.storage == "stream" and cfg.dataset != "imagefolder":
        raise DataError(f"data.storage: stream reads image files (dataset imagefolder); {cfg.dataset} is "
                        "always held in memory: set data.storage to memory or auto")
    _check_reading(cfg)
    stats = DataStats()
    if cfg.dataset == "imagefolder":
        train, test, num_classes = _imagefolder(cfg, device, stats)
    else:
        train, test, num_classes = LOADERS[cfg.dataset](cfg)  # type: ignore[operator]
    perm = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
    if cfg.train_limit:
        perm = perm[: cfg.train_limit]
    n_val = int(round(len(perm) * cfg.val_fraction))
    val_idx, train_idx = perm[:n_val], perm[n_val:]
    if len(train_idx) < 2:
        raise DataError(f"{cfg.dataset}: only {len(train_idx)} training images after the validation split")
    train_set = train.subset(train_idx)
    val_set = train.subset(val_idx) if n_val else test
    mean, std = _normalization(cfg, train_set)
    return Data(train_set, val_set, test, num_classes, mean, std, stats, device)


def check_batches(cfg: Config, data: Data) -> None:
    """One full training batch at least: every phase trains on whole batches (BatchNorm), and
    the cost measurement divides by the batches per epoch."""
    n, bs = len(data.train), cfg.data.batch_size
    if n < bs:
        source = cfg.data.dataset + (f" at {cfg.data.root}" if cfg.data.root else "")
        limit = f" (data.train_limit={cfg.data.train_limit})" if cfg.data.train_limit else ""
        raise DataError(f"{source}{limit}: {n} training images after the validation split "
                        f"(data.val_fraction={cfg.data.val_fraction:g}), fewer than one batch of data.batch_size={bs}; "
                        f"set data.batch_size to at most {n}, or use more images")


def _check_reading(cfg: DataConfig) -> None:
    """The data keys' ranges (here, beside the code that uses them)."""
    if cfg.workers < 0 or cfg.prefetch < 1:
        raise DataError(f"data.workers must be >= 0 and data.prefetch >= 1, got {cfg.workers} and {cfg.prefetch}")
    if not 0.0 < cfg.crop_fraction <= 1.0:
        raise DataError(f"data.crop_fraction: must be in (0, 1], got {cfg.crop_fraction}")


def _normalization(cfg: DataConfig, train: Split) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std: ImageNet's (``data.normalization: imagenet``, for teachers trained
    with it), or the training images' (digits, CIFAR: all of them, as always; an ImageFolder, in
    either storage: the first ``STATS_SAMPLE`` of the shuffled split, summed chunk by chunk, so a
    rank's memory does not grow with the dataset and both storages agree to the bit)."""
    if cfg.normalization == "imagenet":
        return torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
    if cfg.dataset != "imagefolder":
        assert isinstance(train, ImageSet)
        pixels = train.images.float().div(255.0)
        return pixels.mean(dim=(0, 2, 3)), pixels.std(dim=(0, 2, 3)).clamp_min(1e-3)
    total = torch.zeros(3, dtype=torch.float64)
    squares = torch.zeros(3, dtype=torch.float64)
    count = 0
    for x, _ in train.chunks(range(min(len(train), STATS_SAMPLE)), 64):
        pixels = x.double().div_(255.0)
        total += pixels.sum(dim=(0, 2, 3))
        squares += pixels.square().sum(dim=(0, 2, 3))
        count += pixels.numel() // 3
    mean = total / count
    var = (squares - count * mean.square()) / max(count - 1, 1)
    return mean.float(), var.clamp_min(0).sqrt().float().clamp_min(1e-3)


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

