"""Rank 0's last phase: assemble the student from accepted blocks, fine-tune end to end with KD."""
from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hpc_bkd.blocks.students import TRAIN_FORMAT
from hpc_bkd.config import Config, FinetuneConfig
from hpc_bkd.data.batches import Data, steps_per_epoch, train_batch
from hpc_bkd.distill.precision import Amp
from hpc_bkd.distill.teacher import accuracy
from hpc_bkd.distributed.runtime import Interrupted, stop_requested
from hpc_bkd.store import atomic_io
from hpc_bkd.store.records import FinetuneEpoch

log = logging.getLogger("hpc_bkd")


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
            cfg: FinetuneConfig) -> torch.Tensor:
    """Hinton KD: alpha * T^2 * KL(soft student || soft teacher) + (1 - alpha) * CE."""
    t = cfg.temperature
    soft = F.kl_div(F.log_softmax(student_logits / t, 1), F.log_softmax(teacher_logits / t, 1),
                    reduction="batchmean", log_target=True) * (t * t)
    return cfg.alpha * soft + (1 - cfg.alpha) * F.cross_entropy(student_logits, labels)


def _kd_optimizer(student: nn.Module, lr: float, steps: int, epochs: int
                  ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """SGD with Nesterov momentum and a cosine schedule after one epoch of linear warm-up (an
    assembled student is fragile)."""
    total = max(1, epochs * steps)
    warmup = min(steps, total // 2)
    opt = torch.optim.SGD(student.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(warmup, 1)) * 0.5 * (
        1 + math.cos(math.pi * min(s, total) / total)))
    return opt, sched


def _kd_step(student: nn.Module, teacher: nn.Module, opt: torch.optim.Optimizer,
             sched: torch.optim.lr_scheduler.LRScheduler, x: torch.Tensor, y: torch.Tensor,
             cfg: FinetuneConfig, amp: Amp | None = None) -> float:
    """One KD step against the frozen teacher's logits; returns the loss. ``amp``: the forwards'
    precision (``run.precision``; the loss is computed in float32 from their logits)."""
    amp = amp or Amp()
    with torch.no_grad(), amp.autocast():
        target = teacher(x)
    with amp.autocast():
        logits = student(x.contiguous(memory_format=TRAIN_FORMAT))
    loss = kd_loss(logits.float(), target.float(), y, cfg)
    opt.zero_grad(set_to_none=True)
    amp.backward(loss)
    amp.step(opt)
    sched.step()
    return loss.item()


def kd_train(student: nn.Module, teacher: nn.Module, data: Data, cfg: Config, epochs: int, lr: float,
             device: torch.device, label: str = "fine-tune", seed_offset: int = 2,
             on_epoch: Callable[[nn.Module, dict[str, float]], None] | None = None,
             recalibrate_batches: int = 0, partial: Path | None = None, identity: str = "",
             extra: dict[str, Any] | None = None) -> list[dict[str, float]]:
    """Train ``student`` end to end against ``teacher`` logits (SGD, cosine schedule).

    With ``partial``, progress (and the caller's ``extra`` dict, updated in place) is saved there
    after every epoch and when a stop is requested (then ``Interrupted`` is raised); a later call
    with the same ``identity`` resumes at the same step.
    """
    student.to(device).to(memory_format=TRAIN_FORMAT).train()  # see students.TRAIN_FORMAT
    teacher = teacher.to(device).eval()
    bs = cfg.data.batch_size
    steps = steps_per_epoch(len(data.train), bs)
    opt, sched = _kd_optimizer(student, lr, steps, epochs)
    amp = Amp(cfg.run.precision, device)
    history: list[dict[str, float]] = []
    start_epoch = start_step = 0
    loss_sum = 0.0
    saved = atomic_io.load_progress(partial, identity, student, opt, sched)
    if saved is not None:
        start_epoch, start_step, loss_sum = saved["epoch"], saved["step"], saved["loss_sum"]
        history = saved["history"]
        if extra is not None:
            extra.update(saved["extra"])
        log.info("%s: resuming at epoch %d step %d from %s", label, start_epoch + 1, start_step, partial)

    def save(epoch: int, step: int, loss_sum: float) -> None:
        atomic_io.save_progress(partial, identity, student, opt, sched, epoch, step, loss_sum=loss_sum,
                                 history=history, extra=extra or {})

    for epoch in range(start_epoch, epochs):
        t0 = time.time()
        if epoch != start_epoch:
            loss_sum = 0.0
        student.train()
        for step in range(start_step if epoch == start_epoch else 0, steps):
            if stop_requested():
                save(epoch, step, loss_sum)
                log.warning("stop requested: %s saved at epoch %d step %d", label, epoch + 1, step)
                raise Interrupted(str(partial))
            x, y = train_batch(data, bs, cfg.run.seed + seed_offset, epoch, step, cfg.data.augment)
            loss_sum += _kd_step(student, teacher, opt, sched, x.to(device), y.to(device), cfg.finetune, amp)
        if recalibrate_batches:  # running statistics lag weights that moved a lot this epoch
            recalibrate_bn(student, data, cfg, recalibrate_batches, device)
        val = accuracy(student, data, "val", cfg.data.eval_batch_size, device)
        history.append({"epoch": epoch + 1, "loss": loss_sum / steps, "val_acc": val, "time_s": time.time() - t0})
        log.info("%s epoch %d/%d: KD loss %.4f, val acc %.2f%% (%.1fs)", label, epoch + 1, epochs,
                 loss_sum / steps, val, time.time() - t0)
        if on_epoch is not None:
            on_epoch(student, history[-1])  # outside the epoch's clock
        save(epoch + 1, 0, 0.0)
    return history


@torch.no_grad()
def recalibrate_bn(model: nn.Module, data: Data, cfg: Config, batches: int, device: torch.device) -> None:
    """Re-estimate every BatchNorm's running statistics (cumulative average) on training batches.

    Each student block learnt its statistics on the teacher's activations; once assembled, a block
    sees the previous students' outputs instead, and the mismatch compounds through the network.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns or batches <= 0:
        return
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average over the calibration batches
    was_training = model.training
    model.to(device).train()
    steps = steps_per_epoch(len(data.train), cfg.data.batch_size)
    for k in range(batches):
        x, _ = train_batch(data, cfg.data.batch_size, cfg.run.seed + 3, k // steps, k % steps)
        model(x.to(device))
    for m, momentum in zip(bns, saved):
        m.momentum = momentum
    model.train(was_training)


def finetune(student: nn.Module, teacher: nn.Module, data: Data, cfg: Config, device: torch.device,
             partial: Path | None = None, identity: str = "") -> list[FinetuneEpoch]:
    """Fine-tune the assembled student; keeps the teacher untouched. ``partial``: see ``kd_train``."""
    if cfg.finetune.epochs <= 0:
        return []
    best: dict[str, Any] = {"acc": -1.0, "state": None, "epoch": 0}

    def keep_best(model: nn.Module, entry: dict[str, float]) -> None:
        if entry["val_acc"] > best["acc"]:  # an assembled student can collapse for an epoch or two
            best.update(acc=entry["val_acc"], epoch=entry["epoch"], state=copy.deepcopy(model.state_dict()))

    history = kd_train(student, copy.deepcopy(teacher), data, cfg, cfg.finetune.epochs, cfg.finetune.lr, device,
                       on_epoch=keep_best if cfg.finetune.keep == "best-val" else None,
                       recalibrate_batches=cfg.finetune.recalibrate_bn_batches, partial=partial,
                       identity=identity, extra=best)
    if partial is not None:
        partial.unlink(missing_ok=True)
    if cfg.finetune.keep == "best-val":
        student.load_state_dict(best["state"])
    else:
        best.update(epoch=history[-1]["epoch"], acc=history[-1]["val_acc"])
    log.info("fine-tune: keeping epoch %d (val acc %.2f%%)", best["epoch"], best["acc"])
    return [FinetuneEpoch(int(h["epoch"]), h["loss"], h["val_acc"], h["time_s"], h["epoch"] == best["epoch"])
            for h in history]
