"""Where the images come from: one ``DataSource`` per ``data.dataset``, each carrying what the
rest of the toolkit needs to know of it (how to load its splits, its class names, whether it reads
``data.root``). A new source is one class registered with :func:`register_source`; nothing else
in the toolkit lists datasets (the config takes any registered name, the export asks the source
for its class names).

``load_data`` turns a source's splits into the job's ``batches.Data``: a validation split fixed by
the seed, and the normalisation.
"""
from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from hpc_bkd.config import Config, DataConfig
from hpc_bkd.data.batches import Data, DataError, DataStats, ImageSet, Split

log = logging.getLogger("hpc_bkd")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
STATS_SAMPLE = 1000  # streaming: images the mean and std are computed from

# ------------------------------------------------------------------------------------ sources


class DataSource(ABC):
    """One ``data.dataset``: how to load its two splits and what else the toolkit needs of it.

    Subclass it, give it a ``name``, and :func:`register_source` an instance: the config accepts the
    name, ``load_data`` loads it, the export names its classes. Splits are ``ImageSet``s (uint8
    images in memory) or anything meeting ``batches.Split`` (``streaming.StreamSet``).
    """

    name: ClassVar[str]
    needs_root: ClassVar[bool] = True  # reads its files under data.root (refused without one)
    stats_sample: ClassVar[int | None] = None  # images the mean/std come from (None: all of them)
    streams: ClassVar[bool] = False  # can read its images from disk as it goes (data.storage: stream)

    @abstractmethod
    def load(self, cfg: DataConfig, device: torch.device | None, stats: DataStats) -> tuple[Split, Split, list[str]]:
        """(train, test, class names): the test split is also the validation split when
        ``data.val_fraction`` is 0. ``device`` and ``stats`` are for sources that stream."""

    def class_names(self, cfg: DataConfig) -> list[str] | None:
        """The names of the logits without loading the images (the export's card), if known."""
        return None

    def storage(self, cfg: DataConfig, images: int) -> str:
        """Where the images live while the job runs: memory (the default) or stream."""
        return "memory"


class Digits(DataSource):
    """scikit-learn's bundled digits: 1797 8x8 images, scaled to ``data.image_size``; no files."""

    name = "digits"
    needs_root = False

    def load(self, cfg: DataConfig, device: torch.device | None, stats: DataStats) -> tuple[Split, Split, list[str]]:
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
        return (ImageSet(images[train_idx], labels[train_idx]), ImageSet(images[test_idx], labels[test_idx]),
                self.class_names(cfg))

    def class_names(self, cfg: DataConfig) -> list[str]:
        return [str(i) for i in range(10)]


CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


class Cifar(DataSource):
    """CIFAR-10 or CIFAR-100, the python version extracted under ``data.root`` (never downloaded)."""

    def __init__(self, classes: int) -> None:
        self.classes = classes
        self.name = f"cifar{classes}"  # type: ignore[misc]

    @property
    def folder(self) -> str:
        return "cifar-10-batches-py" if self.classes == 10 else "cifar-100-python"

    def load(self, cfg: DataConfig, device: torch.device | None, stats: DataStats) -> tuple[Split, Split, list[str]]:
        import torchvision

        cls = torchvision.datasets.CIFAR10 if self.classes == 10 else torchvision.datasets.CIFAR100
        files = "data_batch_1..5, test_batch, batches.meta" if self.classes == 10 else "train, test, meta"
        try:
            sets = [cls(cfg.root, train=train, download=False) for train in (True, False)]
        except (RuntimeError, OSError, ValueError) as exc:
            raise DataError(
                f"{cfg.dataset} not found or corrupted under data.root={cfg.root!r} ({exc}). Expected "
                f"{cfg.root}/{self.folder}/ holding {files} (the python version from "
                f"https://www.cs.toronto.edu/~kriz/cifar.html, extracted). Nothing is downloaded at run time."
            ) from None
        out = []
        for ds in sets:
            images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
            if images.shape[-1] != cfg.image_size:
                images = F.interpolate(images.float(), size=(cfg.image_size,) * 2, mode="bilinear",
                                       align_corners=False).round_().clamp_(0, 255).to(torch.uint8)
            out.append(ImageSet(images, torch.tensor(ds.targets, dtype=torch.long)))
        return out[0], out[1], list(sets[0].classes)

    def class_names(self, cfg: DataConfig) -> list[str] | None:
        if self.classes == 10:
            return list(CIFAR10_CLASSES)
        meta = Path(cfg.root or "") / self.folder / "meta"
        if not meta.is_file():
            return None
        import pickle
        with open(meta, "rb") as fh:  # the dataset's own file, read as torchvision reads it
            return list(pickle.load(fh, encoding="latin1")["fine_label_names"])


class ImageFolder(DataSource):
    """``data.root``/train/<class>/<image> and val/ (or test/): streamed from disk with DataLoader
    workers, or decoded into memory when it fits (``data.storage``)."""

    name = "imagefolder"
    stats_sample = STATS_SAMPLE  # either storage: the same first images of the shuffled split
    streams = True

    def load(self, cfg: DataConfig, device: torch.device | None, stats: DataStats) -> tuple[Split, Split, list[str]]:
        """Two ``StreamSet``s (train, val-or-test) sharing one pool of workers, decoded into
        memory when ``data.storage`` says so."""
        from hpc_bkd.data.decode import Geometry
        from hpc_bkd.data.listing import FolderError
        from hpc_bkd.data.streaming import FeedPool, LoaderOptions, StreamSet, list_folder

        root = Path(cfg.root or "")
        test_dir = next((root / d for d in ("val", "test") if (root / d).is_dir()), None)
        layout = f"{root}/train/<class>/<image> and {root}/val/<class>/<image> (or test/ instead of val/)"
        if not (root / "train").is_dir() or test_dir is None:
            raise DataError(f"imagefolder: expected {layout}; found {sorted(p.name for p in root.glob('*')) or 'nothing'}")
        opts = LoaderOptions(cfg.workers, cfg.prefetch, device is not None and device.type == "cuda")
        pool = FeedPool(opts, stats, cfg.on_bad_image == "skip")
        geo = Geometry(cfg.image_size, cfg.crop_fraction)
        sets: list[tuple[StreamSet, list[str]]] = []
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
            raise DataError(f"imagefolder: train classes {train_classes} differ from {test_dir.name} classes "
                            f"{test_classes}")
        if self.storage(cfg, len(train) + len(test)) == "memory":
            pool.close()
            return train.materialize(), test.materialize(), train_classes
        return train, test, train_classes

    def class_names(self, cfg: DataConfig) -> list[str] | None:
        train = Path(cfg.root or "") / "train"
        return sorted(p.name for p in train.iterdir() if p.is_dir()) if train.is_dir() else None

    def storage(self, cfg: DataConfig, images: int) -> str:
        """auto holds the folder in memory when its decoded images fit ``data.memory_limit_gb``."""
        if cfg.storage != "auto":
            return cfg.storage
        return "memory" if images * 3 * cfg.image_size ** 2 <= cfg.memory_limit_gb * 2**30 else "stream"


SOURCES: dict[str, DataSource] = {}


def register_source(source: DataSource) -> DataSource:
    """Make ``source`` a valid ``data.dataset`` (by its name) in this process; returns it."""
    SOURCES[source.name] = source
    return source


for _source in (Digits(), Cifar(10), Cifar(100), ImageFolder()):
    register_source(_source)


def source_for(cfg: DataConfig) -> DataSource:
    """The registered source of ``data.dataset``, or a DataError naming the valid ones."""
    if cfg.dataset not in SOURCES:
        raise DataError(f"unknown data.dataset {cfg.dataset!r}; valid: {', '.join(SOURCES)}")
    return SOURCES[cfg.dataset]


def load_data(cfg: DataConfig, seed: int = 0, device: torch.device | None = None) -> Data:
    """Load a dataset and split a validation set off the training set (fixed by ``seed``).
    ``device``: where a streamed batch is going (pinned memory and non-blocking copies on a GPU)."""
    source = source_for(cfg)
    if source.needs_root and not cfg.root:
        raise DataError(f"data.root: required for dataset {cfg.dataset!r} (a local directory)")
    if cfg.root is not None and source.needs_root and not Path(cfg.root).is_dir():
        raise DataError(f"data.root={cfg.root!r} is not a directory (dataset {cfg.dataset}); "
                        "datasets are read from local files and never downloaded")
    if cfg.storage == "stream" and not source.streams:
        raise DataError(f"data.storage: stream reads image files (dataset imagefolder); {cfg.dataset} is "
                        "always held in memory: set data.storage to memory or auto")
    _check_reading(cfg)
    stats = DataStats()
    train, test, classes = source.load(cfg, device, stats)
    perm = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
    if cfg.train_limit:
        perm = perm[: cfg.train_limit]
    n_val = int(round(len(perm) * cfg.val_fraction))
    val_idx, train_idx = perm[:n_val], perm[n_val:]
    if len(train_idx) < 2:
        raise DataError(f"{cfg.dataset}: only {len(train_idx)} training images after the validation split")
    train_set = train.subset(train_idx)
    val_set = train.subset(val_idx) if n_val else test
    mean, std = _normalization(cfg, train_set, source.stats_sample)
    return Data(train_set, val_set, test, len(classes), mean, std, stats, device)


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


def _normalization(cfg: DataConfig, train: Split, sample: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std: ImageNet's (``data.normalization: imagenet``, for teachers trained
    with it), or the training images' (digits, CIFAR: all of them, as always; a source with a
    ``stats_sample`` such as an ImageFolder, in either storage: the first ``sample`` images of the
    shuffled split, summed chunk by chunk, so a rank's memory does not grow with the dataset and
    both storages agree to the bit)."""
    if cfg.normalization == "imagenet":
        return torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
    if sample is None:
        assert isinstance(train, ImageSet), "a source without stats_sample holds its images in memory"
        pixels = train.images.float().div(255.0)
        return pixels.mean(dim=(0, 2, 3)), pixels.std(dim=(0, 2, 3)).clamp_min(1e-3)
    total = torch.zeros(3, dtype=torch.float64)
    squares = torch.zeros(3, dtype=torch.float64)
    count = 0
    for x, _ in train.chunks(range(min(len(train), sample)), 64):
        pixels = x.double().div_(255.0)
        total += pixels.sum(dim=(0, 2, 3))
        squares += pixels.square().sum(dim=(0, 2, 3))
        count += pixels.numel() // 3
    mean = total / count
    var = (squares - count * mean.square()) / max(count - 1, 1)
    return mean.float(), var.clamp_min(0).sqrt().float().clamp_min(1e-3)


