"""Streaming ImageFolders: images read and decoded from disk by DataLoader workers, batch by batch.

The in-memory datasets (``data.ImageSet``) hold every image decoded; ImageNet at 224x224 would need
about 190 GB per rank for that. A ``StreamSet`` holds only the file list and the labels and gives
the same two views as an ``ImageSet``:

* ``batch``: the training batch (epoch, step), the same images in the same order as
  ``data.batch_indices`` says, on every rank; only this rank's ``rows`` of it are read (a team
  member decodes its own rows), each sample augmented from (seed, epoch, image index) alone
  (``decode.py``), so neither the rank nor the number of workers changes a pixel;
* ``chunks``: consecutive rows in order with the evaluation geometry (validation, the teacher
  cache's fill, evaluation).

Behind both, a ``Feed`` runs one DataLoader whose batch sampler walks forward from the batch asked
for: while the consumer asks for the next batch in order (epoch, step), workers have it decoded
already (``data.prefetch`` batches each); when it asks for anything else (a resumed block starting
mid-epoch, the sequential schedule going back to epoch 0 for its next block) the feed restarts at
that batch, so nothing before it is read. Workers are started by forkserver (see ``_context``).
A file that cannot be decoded is reported by name (``data.on_bad_image: error``), or its place in
the batch is taken by the next readable image of the split (``skip``), so batches keep their size and
stay identical on every rank; skipped files are counted in ``DataStats``, logged once each and
reported.
"""
from __future__ import annotations

import logging
import multiprocessing as mp
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from hpc_bkd.data.batches import DataError, DataStats, ImageSet, batch_indices, steps_per_epoch
from hpc_bkd.data.decode import EVAL, BadImage, Geometry, load_sample, mode_for
from hpc_bkd.distributed.runtime import Interrupted, stop_requested

log = logging.getLogger("hpc_bkd")

Key = tuple[int, int, int, int]  # (image index in the split, seed, epoch, mode)
Batch = tuple[torch.Tensor, torch.Tensor, list[tuple[str, str]]]  # images, labels, (path, reason) skipped


def list_folder(folder: Path, follow_symlinks: bool = False) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(paths, labels, classes) of an ImageFolder: one sub-folder per class, images anywhere below
    it (nested folders are walked), any extension torchvision's ImageFolder accepts (``.JPEG`` too).
    Each real file and folder once; links to folders only when ``follow_symlinks`` (``listing``)."""
    from torchvision.datasets.folder import IMG_EXTENSIONS

    from hpc_bkd.data.listing import list_images

    samples, classes = list_images(folder, IMG_EXTENSIONS, follow_symlinks)
    paths = np.array([p.encode() for p, _ in samples], dtype=bytes)  # compact: pickled to every worker
    return paths, np.array([c for _, c in samples], dtype=np.int64), classes


@dataclass
class FolderSamples(Dataset):
    """What a worker process holds: every file and label of the folder, the split's rows of it
    (``index``), and how to turn a key into a sample. ``skip_bad``: a file that cannot be decoded
    gives way to the next readable one in the folder's order (the same substitute whichever split,
    storage or rank reads it)."""

    files: np.ndarray
    labels: np.ndarray
    index: np.ndarray
    geo: Geometry
    skip_bad: bool

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, key: Key) -> tuple[torch.Tensor, int, list[tuple[str, str]]]:
        position, seed, epoch, mode = key
        bad: list[tuple[str, str]] = []
        n = len(self.files)
        first = int(self.index[position])
        for k in range(n):
            j = (first + k) % n
            try:  # augmentation seeded by the file's place in the folder: stable across splits
                image = load_sample(self.files[j].decode(), self.geo, mode, seed, epoch, j)
                return image, int(self.labels[j]), bad
            except BadImage as exc:
                bad.append((exc.path, exc.reason))
                if not self.skip_bad:
                    break
        return torch.zeros(3, self.geo.size, self.geo.size, dtype=torch.uint8), -1, bad


def collate(items: list[tuple[torch.Tensor, int, list[tuple[str, str]]]]) -> Batch:
    return (torch.stack([i[0] for i in items]), torch.tensor([i[1] for i in items], dtype=torch.long),
            [b for i in items for b in i[2]])


class TrainOrder:
    """Batch sampler: the keys of batches (epoch, step), (epoch, step + 1), ... from ``start`` on,
    across epochs without end; ``rows`` of each batch only."""

    def __init__(self, n: int, batch_size: int, seed: int, mode: int, rows: tuple[int, int] | None) -> None:
        self.n, self.batch_size, self.seed, self.mode, self.rows = n, batch_size, seed, mode, rows
        self.steps = steps_per_epoch(n, batch_size)
        self.start = (0, 0)

    def __iter__(self) -> Iterator[list[Key]]:
        epoch, step = self.start
        while True:
            index = batch_indices(self.n, self.batch_size, self.seed, epoch, step)
            if self.rows is not None:
                index = index[self.rows[0]: self.rows[1]]
            yield [(int(i), self.seed, epoch, self.mode) for i in index]
            epoch, step = (epoch, step + 1) if step + 1 < self.steps else (epoch + 1, 0)

    def after(self, epoch: int, step: int) -> tuple[int, int]:
        return (epoch, step + 1) if step + 1 < self.steps else (epoch + 1, 0)


class EvalOrder:
    """Batch sampler: ``rows`` in order, ``size`` at a time, evaluation geometry."""

    def __init__(self, rows: range, size: int) -> None:
        self.rows, self.size = rows, size

    def __iter__(self) -> Iterator[list[Key]]:
        for i in range(self.rows.start, self.rows.stop, self.size):
            yield [(j, 0, 0, EVAL) for j in range(i, min(i + self.size, self.rows.stop))]

    def __len__(self) -> int:
        return len(range(self.rows.start, self.rows.stop, self.size))


_CONTEXT: Any = None


def _context() -> Any:
    """Worker processes are started by forkserver, never forked from the rank (spawn where forkserver
    does not exist). Why: a rank is multi-threaded (the peers heartbeat thread, MPI's and CUDA's own
    threads) and holds MPI's network resources (PMI sockets, InfiniBand memory registrations). A
    forked child copies locks other threads may hold (a deadlock in the child) and shares those
    resources, which MPI libraries forbid or warn about after MPI_Init (Open MPI's
    mpi_warn_on_fork; verbs without fork support corrupt registered memory); CUDA cannot be used in
    a forked child at all. The forkserver is a fresh interpreter started by exec: it never
    initialises MPI or CUDA, imports torch and this module once, and forks each worker from that
    clean, single-threaded state, so workers start in a fraction of a second."""
    global _CONTEXT
    if _CONTEXT is None:
        if "forkserver" in mp.get_all_start_methods():
            _CONTEXT = mp.get_context("forkserver")
            _CONTEXT.set_forkserver_preload(["hpc_bkd.data.streaming"])
        else:
            _CONTEXT = mp.get_context("spawn")
    return _CONTEXT


@dataclass(frozen=True)
class LoaderOptions:
    """How a rank reads a streaming dataset (``data.workers``, ``data.prefetch``; pinned memory on a GPU)."""

    workers: int = 2
    prefetch: int = 4
    pin_memory: bool = False


class Feed:
    """One DataLoader over one order of batches, restarted where the consumer asks."""

    def __init__(self, samples: FolderSamples, order: TrainOrder | EvalOrder, opts: LoaderOptions) -> None:
        self.order = order
        workers = opts.workers
        self.loader = DataLoader(
            samples, batch_sampler=order, num_workers=workers, collate_fn=collate, pin_memory=opts.pin_memory,
            prefetch_factor=opts.prefetch if workers else None, persistent_workers=workers > 0,
            multiprocessing_context=_context() if workers else None)
        self.it: Iterator[Batch] | None = None
        self.expect: tuple[int, int] | None = None

    def batch_at(self, epoch: int, step: int) -> Batch:
        """Training batch (epoch, step): prefetched when it is the one after the last."""
        assert isinstance(self.order, TrainOrder)
        if self.it is None or self.expect != (epoch, step):
            self.order.start = (epoch, step)
            self.it = iter(self.loader)
        self.expect = self.order.after(epoch, step)
        return next(self.it)

    def each(self) -> Iterator[Batch]:
        """One pass over an evaluation order."""
        yield from self.loader

    def close(self) -> None:
        self.it = None
        self.loader = None  # type: ignore[assignment]  # the workers stop when it is collected


class FeedPool:
    """A rank's live feeds (at most ``keep``: the training stream, a second one such as BatchNorm
    recalibration's, and an evaluation pass alternate without restarting), the loader options and
    the dataset's ``DataStats``."""

    def __init__(self, opts: LoaderOptions, stats: DataStats, skip_bad: bool, keep: int = 3) -> None:
        self.opts, self.stats, self.skip_bad, self.keep = opts, stats, skip_bad, keep
        self.feeds: OrderedDict[tuple, Feed] = OrderedDict()

    def feed(self, key: tuple, make: Callable[[], Feed]) -> Feed:
        if key in self.feeds:
            self.feeds.move_to_end(key)
            return self.feeds[key]
        while len(self.feeds) >= self.keep:
            self.feeds.popitem(last=False)[1].close()
        self.feeds[key] = make()
        return self.feeds[key]

    def note(self, bad: list[tuple[str, str]]) -> None:
        """Raise on a bad file (``on_bad_image: error``), or log and count it once (``skip``)."""
        for path, reason in bad:
            if not self.skip_bad:
                raise DataError(f"{path}: {reason}. Remove or replace the file, or set data.on_bad_image: skip "
                                "to leave unreadable files out")
            if path not in self.stats.bad_images:
                self.stats.bad_images[path] = reason
                log.warning("skipping unreadable image %s (%s); the next readable image takes its place "
                            "(data.on_bad_image: skip; %d so far)", path, reason, len(self.stats.bad_images))

    def close(self) -> None:
        for f in self.feeds.values():
            f.close()
        self.feeds.clear()


@dataclass(eq=False)
class StreamSet:
    """A split of an ImageFolder read from disk as it is used; same views as ``data.ImageSet``.
    ``files`` and ``all_labels`` list the whole folder; ``index`` is this split's rows of it."""

    files: np.ndarray
    all_labels: np.ndarray
    index: np.ndarray
    geo: Geometry
    pool: FeedPool
    _samples: FolderSamples | None = field(default=None, repr=False)

    storage: ClassVar[str] = "stream"

    def __len__(self) -> int:
        return len(self.index)

    @property
    def labels(self) -> torch.Tensor:
        return torch.from_numpy(self.all_labels[self.index])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (3, self.geo.size, self.geo.size)

    def subset(self, index: torch.Tensor) -> StreamSet:
        return StreamSet(self.files, self.all_labels, self.index[index.numpy()], self.geo, self.pool)

    def samples(self) -> FolderSamples:
        if self._samples is None:
            self._samples = FolderSamples(self.files, self.all_labels, self.index, self.geo, self.pool.skip_bad)
        return self._samples

    def batch(self, batch_size: int, seed: int, epoch: int, step: int, augment: str = "none",
              rows: slice | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``rows`` of training batch (epoch, step), decoded and augmented per sample (uint8)."""
        span = (rows.start or 0, rows.stop) if rows is not None else None
        mode = mode_for(augment)
        key = ("train", id(self), batch_size, seed, mode, span)
        feed = self.pool.feed(key, lambda: Feed(self.samples(), TrainOrder(len(self), batch_size, seed, mode, span),
                                                self.pool.opts))
        images, labels, bad = feed.batch_at(epoch, step)
        self.pool.note(bad)
        return images, labels

    def chunks(self, rows: range | None = None, size: int = 256) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Rows ``rows`` (all by default) in order, ``size`` at a time, evaluation geometry."""
        rows = rows if rows is not None else range(len(self))
        key = ("eval", id(self), rows.start, rows.stop, size)
        feed = self.pool.feed(key, lambda: Feed(self.samples(), EvalOrder(rows, size), self.pool.opts))
        for images, labels, bad in feed.each():
            self.pool.note(bad)
            yield images, labels

    def materialize(self, size: int = 256) -> ImageSet:
        """Every image decoded into memory (``data.storage: memory``), in order, by the workers."""
        images = torch.empty((len(self), *self.image_shape), dtype=torch.uint8)
        labels = torch.empty(len(self), dtype=torch.long)
        start = 0
        for x, y in self.chunks(range(len(self)), size):
            if stop_requested():  # a stop during a long decode ends the job now, not after it
                raise Interrupted(f"stopped while decoding images into memory ({start} of {len(self)} done)")
            images[start: start + len(y)] = x
            labels[start: start + len(y)] = y
            start += len(y)
        return ImageSet(images, labels)
