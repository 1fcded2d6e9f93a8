"""Per-rank local distillation: one truncated teacher pass per batch feeds every owned student.

Each owned block has a cursor (epoch, step). At every iteration the rank takes the blocks with the
smallest cursor, fetches that batch (the same batch on every rank, see ``data.py``), runs the frozen
teacher only as deep as the deepest of them, and takes one MSE step for each. Blocks that start
together move together, so normally one teacher pass serves all of them; blocks resumed from
different checkpoints simply run apart until their cursors meet.

Every block is checkpointed after each epoch, every ``checkpoint_interval_s`` and when a stop is
requested (SIGTERM, preemption), through a ``rundir.BlockStore``. A finished block is saved once and
never trained again.
"""
from __future__ import annotations

import copy
import logging
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hpc_bkd.blocks.candidates import Candidate, Unit
from hpc_bkd.blocks.students import TRAIN_FORMAT, block_loss, build_candidate, matches_activation
from hpc_bkd.blocks.surgery import BlockSpec, BlockTap, SwappedForward
from hpc_bkd.config import Config
from hpc_bkd.data.batches import Data, batch_indices, eval_batches, steps_per_epoch, train_batch
from hpc_bkd.distill.precision import Amp, autocast
from hpc_bkd.distill.teacher_cache import TeacherCache
from hpc_bkd.distill.teams import GhostLayout, StepBucket, Team, ghost_batchnorms, prepare_student
from hpc_bkd.distributed.runtime import stop_requested
from hpc_bkd.planning.schedule import Schedule
from hpc_bkd.store.progress import RankProgress, UnitProgress
from hpc_bkd.store.rundir import BlockStore

log = logging.getLogger("hpc_bkd")


@dataclass(frozen=True)
class BlockResult:
    """A trained unit (block ``index``'s student of kind ``candidate``): its best weights and how
    its training went. Travels from the rank that trained it to rank 0 and is saved as a plain
    dict (``to_dict``), so files load with ``weights_only=True``."""

    index: int
    name: str
    rank: int
    state_dict: dict[str, torch.Tensor]
    epochs: int
    train_time_s: float
    final_loss: float | None
    swapped_val_acc: float | None
    history: list[dict[str, float]]
    spans: list[list[float]]
    early_stopped: bool = False
    resumed: bool = False           # continued from an unfinished checkpoint
    resumed_finished: bool = False  # finished by an earlier run, read back from the run directory
    team_size: int = 1
    candidate: str = ""
    unit: int = -1
    swapped_val_kl: float | None = None  # KL(teacher || teacher with this student) on validation, nats/image

    def to_dict(self) -> dict[str, Any]:
        metrics = {k: v for k, v in vars(self).items() if k not in ("state_dict", "resumed_finished")}
        return {"state_dict": self.state_dict, "metrics": metrics}

    @classmethod
    def from_dict(cls, saved: dict[str, Any], resumed_finished: bool = False) -> BlockResult:
        fields_ = set(cls.__dataclass_fields__) - {"state_dict", "resumed_finished"}
        metrics = {k: v for k, v in saved["metrics"].items() if k in fields_}
        return cls(state_dict=saved["state_dict"], resumed_finished=resumed_finished, **metrics)


def step_schedule(scheduler: torch.optim.lr_scheduler.LRScheduler) -> None:
    """The epoch's learning-rate decay. A unit resumed at the very end of its first epoch closes
    it before its restored optimizer steps in this process; torch then warns that the steps are
    out of order, which they are not (both states are the saved ones), so that warning is dropped."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", r"Detected call of `lr_scheduler\.step\(\)` before", UserWarning)
        scheduler.step()


def _make_optimizer(params, cfg: Config) -> torch.optim.Optimizer:
    d = cfg.distill
    if d.optimizer == "rmsprop":
        return torch.optim.RMSprop(params, lr=d.lr, weight_decay=d.weight_decay)
    if d.optimizer == "adam":
        return torch.optim.Adam(params, lr=d.lr, weight_decay=d.weight_decay)
    return torch.optim.SGD(params, lr=d.lr, momentum=0.9, weight_decay=d.weight_decay)


@dataclass
class BlockTrainer:
    """One unit's student with its optimizer, schedule, cursor and best weights."""

    spec: BlockSpec
    unit: Unit
    student: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    epochs: int
    steps: int
    epoch: int = 0
    step: int = 0
    loss_sum: float = 0.0
    loss_count: int = 0
    best_acc: float = -1.0
    best_kl: float | None = None
    best_state: dict[str, torch.Tensor] | None = None
    history: list[dict[str, float]] = field(default_factory=list)
    train_time: float = 0.0
    started_at: float | None = None
    spans: list[tuple[float, float]] = field(default_factory=list)  # wall-clock (start, end) per session
    resumed: bool = False
    early_stopped: bool = False
    match_activation: bool = False  # compare ReLU(student) with ReLU(target), see distill.match
    amp: Amp = field(default_factory=Amp)  # run.precision: autocast (and fp16's gradient scaler)

    @property
    def cursor(self) -> tuple[int, int]:
        return (self.epoch, self.step)

    @property
    def done(self) -> bool:
        return self.epoch >= self.epochs or self.early_stopped

    def progress(self) -> UnitProgress:
        """Where this unit is, for the rank's progress file (``hpc-bkd status``)."""
        loss = self.loss_sum / self.loss_count if self.loss_count else self.history[-1]["loss"] if self.history else None
        return UnitProgress(self.unit.key, self.spec.index, self.epoch, self.epochs, self.step, self.steps, loss,
                            self.done)

    def state(self) -> dict[str, Any]:
        return {"student": self.student.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "epoch": self.epoch, "step": self.step,
                "loss_sum": self.loss_sum, "loss_count": self.loss_count, "best_acc": self.best_acc,
                "best_kl": self.best_kl, "best_state": self.best_state, "history": self.history, "train_time": self.train_time,
                "spans": [list(s) for s in self.spans], "early_stopped": self.early_stopped, "amp": self.amp.state_dict()}

    def load(self, state: dict[str, Any]) -> None:
        self.student.load_state_dict(state["student"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        for key in ("epoch", "step", "loss_sum", "loss_count", "best_acc", "best_kl", "best_state", "history",
                    "train_time"):
            setattr(self, key, state[key])
        self.spans = [tuple(s) for s in state["spans"]]
        self.early_stopped = state.get("early_stopped", False)  # absent from checkpoints of older versions
        self.amp.load_state_dict(state.get("amp", {}))
        self.resumed = True

    def backward(self, inp: torch.Tensor, target: torch.Tensor, weight: float = 1.0, zero: bool = True) -> torch.Tensor:
        """Forward and backward of the MSE loss; returns the (weighted) loss. In a team, ``weight``
        is this member's share of the batch: the weighted losses sum to the full-batch mean, and
        the summed gradients equal the full-batch gradient. ``zero=False``: the gradients live in
        a team's ``StepBucket``, which was zeroed for this step."""
        self.student.train()
        with self.amp.autocast():
            out = self.student(inp)
        loss = block_loss(out.float(), target.float(), self.match_activation) * weight  # fp32: no-ops
        if zero:
            self.optimizer.zero_grad(set_to_none=True)
        self.amp.backward(loss)
        return loss.detach()

    def update(self, loss: float) -> None:
        """The optimizer step, once gradients (and BN statistics) are final for this step."""
        self.amp.step(self.optimizer)
        self.loss_sum += loss
        self.loss_count += 1
        self.step += 1


class LocalDistiller:
    """Trains the units one rank owns (alone, or with its team; see ``teams.py``): each a student
    of one of the teacher's ``blocks`` (the candidates of a block share its teacher activations).

    In a team every member runs the same loop on its slice of each batch; the leader alone writes
    checkpoints and returns results.
    """

    def __init__(self, teacher: nn.Module, blocks: Sequence[BlockSpec], units: Sequence[Unit], data: Data,
                 cfg: Config, store: BlockStore, device: torch.device, schedule: Schedule, rank: int = 0,
                 teacher_val_acc: float | None = None, team: Team | None = None,
                 progress: RankProgress | None = None) -> None:
        self.teacher = copy.deepcopy(teacher).to(device).eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.units = list(units)
        self.specs = {b.index: b for b in blocks}
        self.blocks = [self.specs[i] for i in sorted({u.block for u in self.units})]  # the blocks trained here
        self.data, self.cfg, self.store, self.schedule = data, cfg, store, schedule
        self.device, self.rank = device, rank
        self.teacher_val_acc = teacher_val_acc
        self.team = team if team is not None and team.size > 1 else None
        self.leader = self.team is None or self.team.is_leader
        self.steps = steps_per_epoch(len(data.train), cfg.data.batch_size)
        self._taps: dict[tuple[int, ...], BlockTap] = {}
        self._swapped: SwappedForward | None = None  # built on the first validation
        self._teacher_logits: list[torch.Tensor] | None = None  # on this rank's validation rows
        groups = cfg.distill.bn_groups
        self.layout = GhostLayout(groups) if groups > 1 else None
        self._team_stop = False  # a member's stop request, agreed through the step's allreduce
        self._buckets: dict[tuple[int, ...], StepBucket] = {}  # per group of blocks trained together
        self._attached: tuple[int, ...] | None = None  # the bucket the gradients now point into
        self.cache: TeacherCache | None = None  # see teacher_cache.py; filled when training starts
        self.progress = progress  # this rank's progress file and timeline (``hpc-bkd status``, the gantt)

    # ---------------------------------------------------------------- set-up and checkpoints

    def _trainer(self, unit: Unit) -> BlockTrainer:
        d, spec = self.cfg.distill, self.specs[unit.block]
        student = build_candidate(spec, Candidate.parse(unit.candidate), self.cfg.run.seed, self.teacher)
        student = student.to(self.device).to(memory_format=TRAIN_FORMAT)
        prepare_student(student, self.team, self.layout)
        opt = _make_optimizer(student.parameters(), self.cfg)
        sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=d.lr_decay)
        trainer = BlockTrainer(spec, unit, student, opt, sched, d.epochs, self.steps,
                               match_activation=matches_activation(spec, d.match))
        trainer.amp = Amp(self.cfg.run.precision, self.device)
        saved = self.store.resume(unit)
        if saved is not None:
            trainer.load(saved)
            log.info("unit %s (%s): resuming at epoch %d step %d", unit.key, spec.name, trainer.epoch, trainer.step)
        return trainer

    def _save_partial(self, t: BlockTrainer) -> None:
        if self.leader:
            self.store.save_partial(t.unit, t.state())

    def _finish(self, t: BlockTrainer) -> BlockResult:
        if t.best_state is None:  # validation disabled: keep the final weights
            t.best_state = copy.deepcopy(t.student.state_dict())
        result = BlockResult(
            index=t.spec.index, name=t.spec.name, rank=self.rank, epochs=t.epoch,
            state_dict={k: v.detach().cpu().contiguous() for k, v in t.best_state.items()},
            train_time_s=t.train_time, final_loss=t.history[-1]["loss"] if t.history else None,
            swapped_val_acc=t.best_acc if t.best_acc >= 0 else None, history=t.history,
            spans=[list(s) for s in t.spans], early_stopped=t.early_stopped, resumed=t.resumed,
            team_size=self.team.size if self.team is not None else 1, candidate=t.unit.candidate, unit=t.unit.id,
            swapped_val_kl=t.best_kl)
        if self.leader:
            self.store.save_finished(t.unit, result.to_dict())
        return result

    # ---------------------------------------------------------------- training

    @torch.no_grad()
    def _validate(self, trainers: Sequence[BlockTrainer]) -> list[tuple[float, float]]:
        """Per trainer, the teacher's validation accuracy with that student swapped in alone, and
        the KL divergence of the teacher's own logits from the swapped ones (nats per image; the
        finer quality score a budgeted selection sums). Several students run in one pass (their
        shared teacher prefix runs once per batch, see ``surgery.SwappedForward``). A team splits
        the validation set and sums the counts."""
        for t in trainers:
            t.student.eval()
        if self._swapped is None:
            self._swapped = SwappedForward(self.teacher, self.blocks)
        val = self.data.val
        rows = self.team.slice(len(val)) if self.team is not None else slice(0, len(val))
        sums = torch.zeros(2 * len(trainers) + 1, dtype=torch.float64)  # correct per trainer, KL per trainer, count
        bs, n = self.cfg.data.eval_batch_size, len(trainers)
        swaps = [(t.spec.index, t.student) for t in trainers]
        for k, (x, y) in enumerate(eval_batches(self.data, val, bs, range(rows.start, rows.stop))):
            x = x.to(self.device)
            reference = F.log_softmax(self._teacher_logits_of(k, x).float(), dim=1)
            for j, logits in enumerate(self._swapped.run(x, swaps)):
                sums[j] += float((logits.argmax(1).cpu() == y).sum())
                swapped = F.log_softmax(logits.float(), dim=1)
                sums[n + j] += float(F.kl_div(swapped, reference, log_target=True, reduction="sum"))
            sums[-1] += len(y)
        if self.team is not None:
            self.team.allreduce_(sums)
        total = max(float(sums[-1]), 1.0)
        return [(100.0 * float(sums[j]) / total, max(float(sums[n + j]) / total, 0.0)) for j in range(n)]

    def _teacher_logits_of(self, k: int, x: torch.Tensor) -> torch.Tensor:
        """The teacher's logits on validation batch ``k`` of this rank (computed once, then kept:
        the teacher is frozen)."""
        if self._teacher_logits is None:
            self._teacher_logits = []
        if k == len(self._teacher_logits):
            self._teacher_logits.append(self.teacher(x))
        return self._teacher_logits[k]

    def _validates(self, t: BlockTrainer) -> bool:
        return self.cfg.distill.validate_every_epoch or t.epoch + 1 == t.epochs

    def _end_epoch(self, t: BlockTrainer, score: tuple[float, float] | None) -> None:
        """Close ``t``'s epoch; ``score`` is its swapped validation accuracy and KL divergence, when
        it was validated. The best epoch has the highest accuracy, ties going to the lower KL."""
        loss = t.loss_sum / max(t.loss_count, 1)
        entry: dict[str, float] = {"epoch": t.epoch + 1, "loss": loss, "lr": t.optimizer.param_groups[0]["lr"]}
        if score is not None:
            acc, kl = score
            entry["swapped_val_acc"], entry["swapped_val_kl"] = acc, kl
            if acc > t.best_acc or (acc == t.best_acc and t.best_kl is not None and kl < t.best_kl):
                t.best_acc, t.best_kl = acc, kl
                t.best_state = copy.deepcopy(t.student.state_dict())
            tol = self.cfg.distill.early_stop_tolerance
            if tol is not None and self.teacher_val_acc is not None and acc >= self.teacher_val_acc - tol:
                t.early_stopped = True
        t.history.append(entry)
        if self.leader:
            log.info("unit %s %-18s epoch %d/%d  mse %.5f%s", t.unit.key, t.spec.name, t.epoch + 1, t.epochs, loss,
                     f"  swapped val acc {entry['swapped_val_acc']:.2f}%, KL {entry['swapped_val_kl']:.4f}"
                     if "swapped_val_acc" in entry else "")
        t.epoch, t.step, t.loss_sum, t.loss_count = t.epoch + 1, 0, 0.0, 0
        step_schedule(t.scheduler)

    def _sync_step(self, group: list[BlockTrainer], losses: list[torch.Tensor]) -> list[float]:
        """Finish a step's gradients and BN statistics; returns the (team-summed) losses.

        In a team, everything the step needs from the other members (every student's gradients,
        the ghost BatchNorms' running-statistic updates, the losses, and any stop request) travels
        in one allreduce of the group's ``StepBucket``.
        """
        if self.team is None:
            for bn in (bn for t in group for bn in ghost_batchnorms(t.student)):
                bn.apply_own()
            return [float(loss) for loss in losses]
        summed, self._team_stop = self._bucket(group).allreduce(self.team, losses, stop_requested())
        return summed

    def _bucket(self, group: list[BlockTrainer]) -> StepBucket:
        """The step bucket of this group of blocks, holding its students' gradients."""
        key = tuple(t.unit.id for t in group)
        bucket = self._buckets.get(key)
        if bucket is None:
            params = [p for t in group for p in t.student.parameters() if p.requires_grad]
            bns = [bn for t in group for bn in ghost_batchnorms(t.student)]
            bucket = self._buckets[key] = StepBucket(params, bns, len(group))
        elif self._attached != key:
            bucket.attach()
        self._attached = key
        return bucket

    def _fill_cache(self, specs: list[BlockSpec]) -> None:
        self._phase("teacher cache fill")
        self.cache = TeacherCache(specs, len(self.data.train), self.device)
        self.cache.fill(self.teacher, self.data.train, self.data.normalize,
                        self.cfg.data.eval_batch_size, self.team, self.cfg.run.log_interval_s,
                        lambda: autocast(self.cfg.run.precision, self.device))
        # every member says it: each fills its own rows, and their exchange is timed on each
        log.info("teacher cache: %d images x %d block(s), %.0f MiB, filled in %.1fs%s", self.cache.images,
                 len(specs), self.cache.nbytes / 2**20, self.cache.fill_s,
                 f" (team of {self.team.size}: 1/{self.team.size} of the rows each, then {self.cache.exchange_s:.1f}s "
                 "exchanging them)" if self.team else "")
        if self.progress is not None and self.team is not None:
            self.progress.split_last("exchange", self.cache.exchange_s)  # the fill's last part, timed by it

    def _phase(self, name: str) -> None:
        if self.progress is not None:
            self.progress.phase(name)

    def _inputs_and_targets(self, group: list[BlockTrainer], epoch: int, step: int
                            ) -> tuple[dict[int, tuple[torch.Tensor, torch.Tensor]], float]:
        """Each group block's (input, target) for this rank's rows of batch (epoch, step), from the
        teacher cache or a truncated teacher pass, and this rank's share of the batch."""
        bs, seed = self.cfg.data.batch_size, self.cfg.run.seed
        index = batch_indices(len(self.data.train), bs, seed, epoch, step)
        n = len(index)
        if self.layout is not None:
            self.layout.set(n, self.team.groups() if self.team is not None else range(self.layout.groups))
        rows = self.team.slice(n) if self.team is not None else slice(0, n)
        weight = (rows.stop - rows.start) / n
        if self.cache is not None:
            return self.cache.fetch(index[rows], sorted({t.spec.index for t in group})), weight
        x, _ = train_batch(self.data, bs, seed, epoch, step, self.cfg.data.augment, rows)  # this rank's rows only
        specs = sorted({t.spec.index: t.spec for t in group}.values(), key=lambda b: b.index)  # candidates share one
        key = tuple(b.index for b in specs)
        tap = self._taps.setdefault(key, BlockTap(self.teacher, specs, TRAIN_FORMAT))
        with autocast(self.cfg.run.precision, self.device):
            return tap(x.to(self.device)), weight

    def _step(self, group: list[BlockTrainer]) -> None:
        """One train step of every block in ``group`` on the batch at their common cursor."""
        epoch, step = group[0].cursor
        began = time.time()
        t0 = time.perf_counter()
        pairs, weight = self._inputs_and_targets(group, epoch, step)
        share = (time.perf_counter() - t0) / len(group)
        if self.team is not None:
            self._bucket(group).zero()
        losses: list[torch.Tensor] = []
        for t in group:
            if t.started_at is None:
                t.started_at = time.time()
            t1 = time.perf_counter()
            losses.append(t.backward(*pairs[t.spec.index], weight=weight, zero=self.team is None))
            t.train_time += share + time.perf_counter() - t1
        t1 = time.perf_counter()
        summed = self._sync_step(group, losses)
        share = (time.perf_counter() - t1) / len(group)
        for t, loss in zip(group, summed):
            t1 = time.perf_counter()
            t.update(loss)
            t.train_time += share + time.perf_counter() - t1
        if self.progress is not None:
            self.progress.worked_on(group[0].epoch + 1, [t.unit.id for t in group], began, time.time())

    def run(self, finished: Sequence[int] = ()) -> tuple[list[BlockResult], bool]:
        """Train every owned block not in ``finished``; returns (results, interrupted). Only a
        team's leader returns results."""
        trainers = [self._trainer(u) for u in self.units if u.id not in set(finished)]
        # done but not saved as finished: the process ended between the unit's last checkpoint and
        # its finished file (SIGKILL, a lost node); one more step would train an epoch too many
        done = [self._finish(t) for t in trainers if t.done]
        results = done if self.leader else []  # only a team's leader returns results
        active = [t for t in trainers if not t.done]
        progress = _Progress(sum(t.epochs * t.steps for t in active),
                             sum(t.epoch * t.steps + t.step for t in active), self.cfg.run.log_interval_s, self.rank)
        if self.schedule.uses_cache and active:
            self._fill_cache(sorted({t.spec.index: t.spec for t in active}.values(), key=lambda b: b.index))
        self._phase("distillation")
        if self.progress is not None:
            self.progress.units_now([t.progress() for t in trainers])
        last_save = time.time()
        interrupted = False
        while active:
            if self._team_stop if self.team is not None else stop_requested():
                interrupted = True
                break
            group = self.schedule.next_group(active)
            if group:
                self._step(group)
                progress.update(len(group), group)
                if self.progress is not None and self.progress.due():
                    self.progress.units_now([t.progress() for t in trainers])
            for t in self._close_epochs(active, group):
                active.remove(t)
                progress.skip(t.epochs * t.steps - (t.epoch * t.steps))
                if self.leader:
                    results.append(self._finish(t))
                    log.info("unit %s %-18s done in %.1fs (best swapped val acc %.2f%%)", t.unit.key,
                             t.spec.name, t.train_time, t.best_acc)
                else:
                    self._finish(t)
            if time.time() - last_save > self.cfg.distill.checkpoint_interval_s:
                for t in active:
                    self._save_partial(t)
                last_save = time.time()
        self._stop(active, interrupted)
        if self.progress is not None:
            self.progress.units_now([t.progress() for t in trainers])
        progress.close()
        return results, interrupted

    def _close_epochs(self, active: list[BlockTrainer], group: list[BlockTrainer]) -> list[BlockTrainer]:
        """Validate and close the epochs the schedule ends now (validation shared across them);
        returns the blocks that are done."""
        ending = self.schedule.epoch_ends(active, group)
        checked = [t for t in ending if self._validates(t)]
        t1 = time.perf_counter()
        scores = dict(zip((id(t) for t in checked), self._validate(checked))) if checked else {}
        share = (time.perf_counter() - t1) / max(len(checked), 1)
        done = []
        for t in ending:
            t1 = time.perf_counter()
            self._end_epoch(t, scores.get(id(t)))
            t.train_time += time.perf_counter() - t1 + (share if id(t) in scores else 0.0)
            self._save_partial(t)
            if t.done:
                t.spans.append((t.started_at or time.time(), time.time()))
                done.append(t)
        return done

    def _stop(self, active: list[BlockTrainer], interrupted: bool) -> None:
        """Keep every unfinished block up to this step (after an interruption, or nothing left)."""
        for t in active:
            if t.started_at is not None:
                t.spans.append((t.started_at, time.time()))
            self._save_partial(t)
        if interrupted:
            log.warning("stop requested: saved %d unfinished block(s) at their current step", len(active))


class _Progress:
    """A tqdm bar on a terminal; otherwise one log line per ``interval`` seconds."""

    def __init__(self, total: int, done: int, interval: float, rank: int) -> None:
        self.total, self.done, self.interval = total, done, interval
        self.first = done
        self.last = time.time()
        self.start = time.time()
        self.bar = None
        if sys.stderr.isatty() and total:
            from tqdm import tqdm
            self.bar = tqdm(total=total, initial=done, desc=f"rank {rank}", unit="step", position=rank, leave=False)

    def update(self, n: int, group: Sequence[BlockTrainer]) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif time.time() - self.last >= self.interval:
            t = group[0]
            rate = (self.done - self.first) / max(time.time() - self.start, 1e-9)
            log.info("progress %d/%d unit-steps (%.0f%%), units %s at epoch %d step %d/%d, %.1f steps/s",
                     self.done, self.total, 100 * self.done / max(self.total, 1),
                     ",".join(g.unit.key for g in group), t.epoch + 1, t.step, t.steps, rate)
            self.last = time.time()

    def skip(self, n: int) -> None:
        if n > 0:
            self.done += n
            if self.bar is not None:
                self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
