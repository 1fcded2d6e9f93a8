"""The teacher: trained by the toolkit (and cached), or loaded from a user checkpoint; evaluation."""
from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hpc_bkd.blocks.models import build_model
from hpc_bkd.config import Config
from hpc_bkd.data.batches import Data, eval_batches, steps_per_epoch, train_batch
from hpc_bkd.distributed.runtime import Interrupted, stop_requested
from hpc_bkd.errors import UserError
from hpc_bkd.store import atomic_io
from hpc_bkd.store.rundir import RunDir, RunDirConflict

log = logging.getLogger("hpc_bkd")


class TeacherMismatchError(UserError, ValueError):
    """A teacher checkpoint does not fit the configured architecture."""


@torch.no_grad()
def accuracy(model: nn.Module, data: Data, split: str = "test", batch_size: int = 256,
             device: torch.device | str = "cpu") -> float:
    """Top-1 accuracy in percent on ``split`` (train, val or test), in eval mode."""
    was_training = model.training
    model.eval()
    correct = total = 0
    for x, y in eval_batches(data, getattr(data, split), batch_size):
        pred = model(x.to(device)).argmax(1).cpu()
        correct += int((pred == y).sum())
        total += len(y)
    model.train(was_training)
    return 100.0 * correct / max(total, 1)


def _teacher_identity(cfg: Config, num_classes: int) -> dict[str, Any]:
    """What makes a cached teacher reusable: architecture, data and training settings."""
    return {"arch": cfg.model.arch, "width": cfg.model.width, "num_classes": num_classes,
            "dataset": cfg.data.dataset, "root": cfg.data.root, "image_size": cfg.data.image_size,
            "train_limit": cfg.data.train_limit, "val_fraction": cfg.data.val_fraction,
            "epochs": cfg.teacher.epochs, "lr": cfg.teacher.lr, "seed": cfg.run.seed,
            "augment": cfg.data.augment, "batch_size": cfg.data.batch_size,
            **({"kwargs": cfg.model.kwargs} if cfg.model.kwargs else {})}  # absent: caches before kwargs match


def state_fingerprint(state: dict[str, torch.Tensor]) -> str:
    """A short hash of a state dict's values (detects a changed teacher under a resumed run)."""
    return atomic_io.state_checksum(state)


def load_teacher_checkpoint(path: str | Path, model: nn.Module) -> nn.Module:
    """Load a user's state_dict into ``model`` with ``weights_only=True``; explain any mismatch."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"teacher.checkpoint={str(path)!r} does not exist")
    try:
        state = atomic_io.load(path)
    except Exception as exc:  # pickle errors, truncated files, non-weights content
        raise TeacherMismatchError(f"{path}: cannot be read as a weights-only checkpoint ({exc})") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise TeacherMismatchError(f"{path}: expected a state_dict (a mapping of tensors), got {type(state).__name__}")
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
             for k in own if k in state and hasattr(state[k], "shape") and state[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
        if wrong:
            parts.append(f"{len(wrong)} with other shapes (e.g. {'; '.join(wrong[:3])})")
        raise TeacherMismatchError(
            f"teacher checkpoint {path} does not match model.arch={type(model).__name__} as configured: "
            + ", ".join(parts) + ". Check model.arch, model.width and the dataset's number of classes.")
    model.load_state_dict(state)
    return model


def train_teacher(cfg: Config, data: Data, device: torch.device, partial: Path | None = None) -> nn.Module:
    """Train a teacher from scratch: SGD + Nesterov momentum, cosine learning rate, cross-entropy.

    With ``partial``, progress is saved there after every epoch and when a stop is requested
    (then ``Interrupted`` is raised), and a later call resumes from it at the same step.
    """
    torch.manual_seed(cfg.run.seed)
    model = build_model(cfg.model.arch, data.num_classes, cfg.model.width, cfg.model.kwargs).to(device)
    bs = cfg.data.batch_size
    steps = steps_per_epoch(len(data.train), bs)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.teacher.lr, momentum=0.9, nesterov=True,
                          weight_decay=cfg.teacher.weight_decay)
    total = max(1, cfg.teacher.epochs * steps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    identity = _teacher_identity(cfg, data.num_classes)
    start_epoch = start_step = 0
    saved = atomic_io.load_progress(partial, identity, model, opt, sched)
    if saved is not None:
        start_epoch, start_step = saved["epoch"], saved["step"]
        log.info("teacher: resuming at epoch %d step %d from %s", start_epoch + 1, start_step, partial)

    def save(epoch: int, step: int) -> None:
        atomic_io.save_progress(partial, identity, model, opt, sched, epoch, step)

    for epoch in range(start_epoch, cfg.teacher.epochs):
        t0, loss_sum = time.time(), 0.0
        model.train()
        first = start_step if epoch == start_epoch else 0
        for step in range(first, steps):
            if stop_requested():
                save(epoch, step)
                log.warning("stop requested: teacher training saved at epoch %d step %d", epoch + 1, step)
                raise Interrupted(str(partial))
            x, y = train_batch(data, bs, cfg.run.seed + 1, epoch, step, cfg.data.augment)
            loss = F.cross_entropy(model(x.to(device)), y.to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += loss.item()
        val = accuracy(model, data, "val", cfg.data.eval_batch_size, device)
        log.info("teacher epoch %d/%d: loss %.4f, val acc %.2f%% (%.1fs)", epoch + 1, cfg.teacher.epochs,
                 loss_sum / max(steps - first, 1), val, time.time() - t0)
        save(epoch + 1, 0)
    return model.eval()


def get_teacher(cfg: Config, data: Data, run_dir: RunDir, device: torch.device) -> tuple[nn.Module, dict[str, Any]]:
    """The teacher for this job and where it came from (checkpoint, cache, or trained now)."""
    model = build_model(cfg.model.arch, data.num_classes, cfg.model.width, cfg.model.kwargs)
    if cfg.teacher.checkpoint:
        load_teacher_checkpoint(cfg.teacher.checkpoint, model)
        source = f"checkpoint {cfg.teacher.checkpoint}"
    else:
        cache = run_dir.teacher
        identity = _teacher_identity(cfg, data.num_classes)
        cached = run_dir.load_teacher_cache() if cfg.teacher.cache and cache.is_file() else None
        if cached is not None and cached.get("identity") == identity:
            model.load_state_dict(cached["state_dict"])
            source = f"cache {cache}"
        else:
            if cached is not None and run_dir.has_blocks():  # retraining would orphan them: refuse first
                raise RunDirConflict(f"{cache} was trained with other settings than this job's, and {run_dir}/blocks "
                                     "holds its students. Nothing was written. Use a new run.dir, or delete that "
                                     "run's blocks/ folder to start over.")
            if cached is not None:
                log.warning("cached teacher %s was trained with other settings: training a new one", cache)
            t0 = time.time()
            log.info("training the teacher (%s, %d epochs) ...", cfg.model.arch, cfg.teacher.epochs)
            partial = run_dir.teacher_partial
            model = train_teacher(cfg, data, device, partial).cpu()
            if cfg.teacher.cache:
                run_dir.save_teacher_cache(model.state_dict(), identity)
            partial.unlink(missing_ok=True)
            source = f"trained in {time.time() - t0:.1f}s"
    return model.eval(), {"source": source}
