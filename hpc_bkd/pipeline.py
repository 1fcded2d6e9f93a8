"""The job, start to end, on every rank: config -> plan -> per-rank distill -> gather -> assemble ->
fine-tune -> report. Rank 0 coordinates; every rank trains the blocks the plan gives it.

Phases and what travels over MPI:
1. rank 0 gets the teacher (cache, checkpoint or training) and finds the blocks, and broadcasts
   teacher weights + block list (no shared filesystem needed);
2. every rank times every block at once (so the costs include the ranks' contention for the node)
   and reports the finished blocks it can see under the run directory (resume); rank 0 takes the
   median costs, plans the remaining blocks and broadcasts the plan;
3. every rank distills its blocks, checkpointing each under the run directory;
4. trained blocks and metrics are gathered to rank 0, which assembles, fine-tunes, evaluates, saves
   the student and writes the report.
"""
from __future__ import annotations

import hashlib
import json
import logging
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import checkpoint
from .config import Config, ConfigError
from .data import Data, describe, load_data, steps_per_epoch, train_batch
from .distill import LocalDistiller, block_path, finished_blocks, load_finished
from .energy import EnergyMeter
from .finetune import accept_blocks, finetune, recalibrate_bn
from .models import build_model
from .plan import (BlockCost, Plan, TeamModel, make_plan, mac_costs, measure_team_costs, rank_cost,
                   team_layouts, with_validation)
from .runtime import Interrupted, Runtime, init_runtime, setup_logging
from .students import build_student, matches_activation
from .surgery import BlockSpec, SwappedForward, assemble, conv_params, find_blocks, total_macs
from .teacher_cache import CacheDecision, decide, memory_budget
from .teacher import accuracy, get_teacher, state_fingerprint
from .teams import Team, team_backend

log = logging.getLogger("hpc_bkd")

EXIT_INTERRUPTED = 3  # the job was stopped (preemption, time limit) after saving; re-run to resume


@dataclass
class Phases:
    """Wall time per phase, in seconds, measured on rank 0."""

    times: dict[str, float] = field(default_factory=dict)
    _t: float = field(default_factory=time.perf_counter)

    def mark(self, name: str) -> None:
        now = time.perf_counter()
        self.times[name] = self.times.get(name, 0.0) + now - self._t
        self._t = now


# distill keys that change how blocks are trained, never what they become
_NOT_IN_RESULT = ("checkpoint_interval_s", "schedule", "teacher_cache", "teacher_cache_gb", "team_backend")


def job_fingerprint(cfg: Config, teacher_fp: str, blocks: list[BlockSpec]) -> str:
    """What determines the trained blocks; a run directory is only resumed by the same job (how
    the teacher's activations are produced, cached or not, does not change them)."""
    d = cfg.distill
    key = {"model": vars(cfg.model), "data": vars(cfg.data), "blocks": vars(cfg.blocks), "seed": cfg.run.seed,
           "distill": {k: v for k, v in vars(d).items() if k not in _NOT_IN_RESULT},
           "teacher": teacher_fp, "specs": [b.members for b in blocks]}
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _team_sizes(cfg: Config, ranks: int, n_blocks: int) -> list[int]:
    """Team sizes (> 1) a plan on ``ranks`` ranks may use; none for a pure block split."""
    if not cfg.plan.hybrid or ranks < 2:
        return []
    tm = TeamModel.for_groups(cfg.distill.bn_groups)
    return sorted({m for sizes in team_layouts(ranks, n_blocks, True, cfg.plan.teams) for m in sizes
                   if m > 1 and tm.allows(m)})


def _cache_decision(cfg: Config, blocks: list[BlockSpec], data: Data, device, local_size: int) -> CacheDecision:
    return decide(cfg.distill.teacher_cache, cfg.data.augment, cfg.distill.schedule, blocks, len(data.train),
                  memory_budget(device, local_size, cfg.distill.teacher_cache_gb))


def _costs(cfg: Config, teacher, blocks, data: Data, device, ranks: int = 1,
           cached: bool = False) -> tuple[list[BlockCost], dict[int, float], str]:
    """Per-block costs on this rank, and the share of one rank's time that the busiest member of
    each team size the plan may use takes (see ``plan.TeamModel``). ``cached``: the teacher's
    activations are cached, so training pays its teacher pass once, not every epoch."""
    b = cfg.blocks
    students = [build_student(s, b.student_depth, b.student_width, cfg.run.seed) for s in blocks]
    teacher_passes = 1.0 / cfg.distill.epochs if cached else 1.0
    if cfg.plan.cost_model == "macs":
        return with_validation(mac_costs(blocks, students), 0.0, teacher_passes=teacher_passes), {}, "macs"
    batches = [train_batch(data, cfg.data.batch_size, cfg.run.seed, 0, k)[0]
               for k in range(cfg.plan.measure_batches + 1)]
    matches = [matches_activation(s, cfg.distill.match) for s in blocks]

    sizes = _team_sizes(cfg, ranks, len(blocks))
    # timed as the distiller runs them: students one at a time when cached or sequential (see
    # distill.next_group), and the sequential schedule's teacher one block's prefix at a time
    sequential = cfg.distill.schedule == "sequential"
    measured = measure_team_costs(teacher, blocks, students, batches, device, cfg.distill.bn_groups, matches,
                                  [1, *sizes], block_major=cached or sequential, tap_each_block=sequential)
    passes, shares_prefix = 0.0, True
    if cfg.distill.validate_every_epoch:
        steps = steps_per_epoch(len(data.train), cfg.data.batch_size)
        passes = len(data.val) / cfg.data.batch_size / steps  # validation batches per train step
        shares_prefix = SwappedForward(teacher, blocks).shares_prefix
    measured = {m: with_validation(c, passes, shares_prefix, teacher_passes) for m, c in measured.items()}
    costs = measured[1]
    whole = rank_cost(range(len(costs)), costs)
    shares = {m: rank_cost(range(len(costs)), measured[m]) / whole for m in sizes}
    return costs, shares, "measured"


def _combine(measured: list[tuple[list[BlockCost], dict[int, float], str]]) -> tuple[list[BlockCost], dict[int, float]]:
    """The per-field median over ranks of every rank's measurement (each rank measures while the
    others do too, so the costs include what ranks sharing a node do to each other)."""
    per_rank = [m[0] for m in measured]
    costs = [BlockCost(*(statistics.median(getattr(r[i], f) for r in per_rank) for f in ("teacher", "student", "forward")))
             for i in range(len(per_rank[0]))]
    shares = {m: statistics.median(r[1][m] for r in measured) for m in measured[0][1]}
    return costs, shares


def _stored_costs(run_dir: Path, blocks: list[BlockSpec]) -> tuple[list[BlockCost], dict[int, float], str] | None:
    """The costs an earlier run of this job measured (``costs.json``), if they cover these blocks."""
    try:
        stored = json.loads((run_dir / "costs.json").read_text())
        if stored["blocks"] != [b.name for b in blocks]:
            return None
        costs = [BlockCost(**c) for c in stored["costs"]]
        return costs, {int(m): v for m, v in stored["member_share"].items()}, stored["cost_model"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def coordinate(cfg: Config, rt: Runtime, data: Data, run_dir: Path, phases: Phases) -> dict[str, Any]:
    """Rank 0: the teacher and its blocks. Returns what is broadcast to every rank."""
    teacher, teacher_info = get_teacher(cfg, data, run_dir, rt.device)
    phases.mark("teacher")
    teacher_val = accuracy(teacher, data, "val", cfg.data.eval_batch_size, rt.device)
    teacher_test = accuracy(teacher, data, "test", cfg.data.eval_batch_size, rt.device)
    teacher.cpu()
    log.info("teacher %s (%s): val acc %.2f%%, test acc %.2f%%", cfg.model.arch, teacher_info["source"],
             teacher_val, teacher_test)
    blocks = find_blocks(teacher, data.input_shape, cfg.blocks.granularity)
    phases.mark("teacher")
    state = teacher.state_dict()
    teacher_fp = state_fingerprint(state)
    return {"teacher_state": state, "teacher_info": teacher_info, "teacher_val": teacher_val,
            "teacher_test": teacher_test, "blocks": blocks,
            "fingerprint": job_fingerprint(cfg, teacher_fp, blocks), "teacher_fp": teacher_fp}


def run_job(cfg: Config, rt: Runtime | None = None) -> dict[str, Any] | None:
    """Run the whole job on this rank. Returns the report on rank 0, None on the others.

    Raises ``Interrupted`` on every rank if a stop was requested (everything finished is saved).
    """
    rt = rt or init_runtime(cfg.run.device, cfg.run.threads)
    setup_logging(rt.rank, rt.size)
    try:  # before any work: a backend this rank's device cannot use is a config error
        backend = team_backend(cfg.distill.team_backend, rt.device)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    phases = Phases()
    wall0 = time.time()
    run_dir = Path(cfg.run.dir)
    if rt.is_root:
        run_dir.mkdir(parents=True, exist_ok=True)
        checkpoint.write_json(run_dir / "config.json", cfg.to_dict())
        log.info("hpc_bkd: %d rank(s), run dir %s, device %s, %d thread(s) per rank", rt.size, run_dir,
                 rt.device, rt.threads)
    data = load_data(cfg.data, cfg.run.seed)
    if rt.is_root:
        log.info("data: %s: %s", cfg.data.dataset, describe(data))
    phases.mark("data")

    shared = None
    if rt.is_root:
        try:
            shared = coordinate(cfg, rt, data, run_dir, phases)
        except Interrupted:  # stopped while training the teacher: its progress is saved
            shared = {"interrupted": True}
    t_bcast = time.perf_counter()
    shared = rt.bcast(shared)
    bcast_s = time.perf_counter() - t_bcast
    if shared.get("interrupted"):
        raise Interrupted(str(run_dir))
    blocks: list[BlockSpec] = shared["blocks"]
    teacher = build_model(cfg.model.arch, data.num_classes, cfg.model.width)
    teacher.load_state_dict(shared["teacher_state"])
    teacher.eval()
    fingerprint = shared["fingerprint"]
    if rt.is_root:
        phases.mark("broadcast")

    # the teacher cache: used only if every rank can hold every block's activations
    decisions = rt.allgather(_cache_decision(cfg, blocks, data, rt.device, rt.local_size))
    cache = next((d for d in decisions if not d.use), decisions[0])
    if rt.is_root:
        log.info("teacher cache %s", cache.reason)
        shared["teacher_cache"] = cache.to_dict()

    # resume: which finished blocks can each rank see? (the run dir need not be shared)
    seen = rt.allgather(finished_blocks(run_dir, fingerprint, len(blocks)))
    finished = sorted(set().union(*seen))
    remaining = [b for b in blocks if b.index not in finished]

    # costs: every rank measures at once, so contention between ranks is in the figures; a re-run
    # with every block finished plans nothing and takes the first run's costs for its report
    stored = _stored_costs(run_dir, blocks) if rt.is_root and not remaining else None
    if remaining:
        measured = rt.gather(_costs(cfg, teacher, blocks, data, rt.device, rt.size, cache.use))
    elif rt.is_root and stored is None:  # nothing to plan: rank 0 alone measures, for the report
        measured = [_costs(cfg, teacher, blocks, data, rt.device, 1, cache.use)]
    if rt.is_root and stored is not None:
        log.info("every block is finished: no cost measurement (costs from %s)", run_dir / "costs.json")
        shared["costs"], shared["member_share"], shared["cost_model"] = stored
    elif rt.is_root:
        shared["costs"], member_share = _combine(measured)
        shared["cost_model"], shared["member_share"] = measured[0][2], member_share
        checkpoint.write_json(run_dir / "costs.json", {
            "cost_model": shared["cost_model"], "device": str(rt.device), "threads": rt.threads,
            "batch_size": cfg.data.batch_size, "blocks": [b.name for b in blocks],
            "teacher_cache": cache.use, "teacher_passes_per_step": 1.0 / cfg.distill.epochs if cache.use else 1.0,
            "costs": [vars(c) for c in shared["costs"]], "member_share": member_share,
            "per_rank": [[vars(c) for c in m[0]] for m in measured]})
    plan: Plan | None = None
    if rt.is_root:
        sub = make_plan([shared["costs"][b.index] for b in remaining], rt.size, cfg.plan.method,
                        cfg.plan.hybrid, cfg.plan.teams,
                        tm=TeamModel.for_groups(cfg.distill.bn_groups, shared["member_share"]))
        local_to_global = [b.index for b in remaining]
        sub.assignment = [[local_to_global[i] for i in blocks_] for blocks_ in sub.assignment]
        sub.costs = shared["costs"]
        plan = sub
        if finished:
            log.info("resuming: %d block(s) already finished (%s), %d to train", len(finished),
                     ",".join(map(str, finished)), len(remaining))
        _log_plan(plan, blocks)
        phases.mark("plan")
    t_bcast = time.perf_counter()
    plan = rt.bcast(plan)
    bcast_s += time.perf_counter() - t_bcast
    if rt.is_root:
        phases.mark("broadcast")

    # distill (a team of ranks shares its blocks and splits every batch; see teams.py)
    team_comm = rt.comm.Split(color=plan.team_of(rt.rank), key=rt.rank)
    team = Team(team_comm, cfg.distill.bn_groups, backend, rt.device) if team_comm.size > 1 else None
    if team is not None and team.is_leader:
        log.info("team of %d ranks: %s collectives", team.size, backend)
    owned = [blocks[i] for i in plan.assignment[rt.rank]]
    if not owned:
        log.info("idle: no blocks for this rank (%d ranks, %d blocks to train)", rt.size, len(remaining))
    meter = EnergyMeter(rt.device)
    meter.start()
    t0 = time.time()
    distiller = LocalDistiller(teacher, owned, data, cfg, run_dir, fingerprint, rt.device, rt.rank,
                               shared["teacher_val"], team, cache.use)
    results, interrupted = distiller.run(finished)
    if team is not None:  # not on an error: that aborts every rank, and a teardown could wait on them
        team.close()
    t1 = time.time()
    energy = meter.stop()
    peak_mem = _peak_memory_mb(rt.device)
    # forward finished blocks rank 0 cannot see itself (run dir not shared across nodes)
    carried = [load_finished(run_dir, i) for i in finished
               if i not in seen[0] and rt.rank == min(r for r, s in enumerate(seen) if i in s)]
    t_gather = time.perf_counter()
    gathered = rt.gather({"rank": rt.rank, "host": rt.host, "results": results, "carried": carried,
                          "interrupted": interrupted, "start": t0, "end": t1, "energy": energy,
                          "peak_mem_mb": peak_mem, "device": str(rt.device), "threads": rt.threads,
                          "blocks": [b.index for b in owned],
                          "teacher_cache": {"mb": distiller.cache.nbytes / 2**20, "fill_s": distiller.cache.fill_s}
                          if distiller.cache is not None else None})
    gather_s = time.perf_counter() - t_gather
    any_interrupted = rt.bcast(any(g["interrupted"] for g in gathered) if rt.is_root else None)
    if any_interrupted:
        if rt.is_root:
            log.warning("job interrupted: finished blocks and unfinished checkpoints are saved under %s; "
                        "re-run the same command to resume", run_dir)
        raise Interrupted(str(run_dir))
    if not rt.is_root:
        if rt.bcast(None) == "interrupted":  # sleep while rank 0 fine-tunes, then leave together
            raise Interrupted(str(run_dir))
        return None
    phases.mark("distill+gather")
    try:
        report = _finish(cfg, rt, data, run_dir, teacher, blocks, shared, plan, gathered, finished, phases,
                         {"broadcast_s": bcast_s, "gather_s": gather_s}, wall0)
    except Interrupted:
        rt.bcast("interrupted")
        raise
    rt.bcast("done")
    return report


def _finish(cfg, rt, data, run_dir, teacher, blocks, shared, plan, gathered, finished, phases, comm, wall0):
    """Rank 0: assemble accepted blocks, fine-tune, evaluate, save the student, write the report."""
    from .report import write_report

    results: dict[int, dict] = {}
    for g in gathered:
        for r in g["results"] + g["carried"]:
            results[r["metrics"]["index"]] = r
    for i in finished:
        if i not in results:
            results[i] = load_finished(run_dir, i)
            results[i]["metrics"]["resumed_finished"] = True
    for g in gathered:
        for r in g["carried"]:
            results[r["metrics"]["index"]]["metrics"]["resumed_finished"] = True
    b = cfg.blocks
    students = {}
    for i, r in results.items():
        s = build_student(blocks[i], b.student_depth, b.student_width, cfg.run.seed)
        s.load_state_dict(r["state_dict"])
        students[i] = s.eval()
    accs = {i: r["metrics"]["swapped_val_acc"] for i, r in results.items()}
    accepted = accept_blocks(accs, shared["teacher_val"], cfg.distill.accept_tolerance)
    student = assemble(teacher, {i: students[i] for i in accepted}, blocks)
    before = accuracy(student, data, "test", cfg.data.eval_batch_size, rt.device)
    recalibrate_bn(student, data, cfg, cfg.finetune.recalibrate_bn_batches, rt.device)
    recalibrated = accuracy(student, data, "test", cfg.data.eval_batch_size, rt.device)
    log.info("assembled student: %d/%d blocks accepted, test acc %.2f%% (%.2f%% after BN recalibration)",
             len(accepted), len(blocks), before, recalibrated)
    phases.mark("assemble")
    history = finetune(student, teacher, data, cfg, rt.device, run_dir / "finetune.partial.pt",
                       f"{shared['fingerprint']}:{accepted}:{sorted(vars(cfg.finetune).items())}")
    student.cpu()
    phases.mark("finetune")
    after = accuracy(student, data, "test", cfg.data.eval_batch_size, rt.device)
    student.cpu()
    phases.mark("evaluate")
    checkpoint.save({"state_dict": student.state_dict(), "accepted_blocks": accepted,
                     "config": cfg.to_dict()}, run_dir / "student.pt")
    shape = data.input_shape
    models = {
        "teacher": {"params": sum(p.numel() for p in teacher.parameters()), "conv_params": conv_params(teacher),
                    "macs": total_macs(teacher, shape)},
        "student": {"params": sum(p.numel() for p in student.parameters()), "conv_params": conv_params(student),
                    "macs": total_macs(student, shape)},
    }
    return write_report(cfg, run_dir, rt, blocks, plan, shared, results, accepted, gathered, models,
                        {"teacher_test": shared["teacher_test"], "teacher_val": shared["teacher_val"],
                         "student_assembled": before, "student_before_finetune": recalibrated,
                         "student_after_finetune": after},
                        history, phases, comm, wall0)


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _log_plan(plan: Plan, blocks: list[BlockSpec]) -> None:
    log.info("plan (%s%s): predicted makespan %.3fs/batch, lower bound %.3fs, one rank %.3fs, speedup %.2fx",
             plan.method, ", optimal" if plan.optimal else "", plan.makespan, plan.lower_bound, plan.sequential,
             plan.predicted_speedup)
    for members in plan.teams:
        owned, load = plan.assignment[members[0]], plan.predicted[members[0]]
        who = f"rank {members[0]}" if len(members) == 1 else f"ranks {members[0]}-{members[-1]} (team)"
        log.info("  %s: %.3fs/batch  blocks %s", who, load, ",".join(map(str, owned)) or "(idle)")


def plan_only(cfg: Config, ranks: int) -> dict[str, Any]:
    """`hpc-bkd plan`: blocks, the assignment and predicted loads, without training students.

    Needs the teacher's shape only: a fresh model when no checkpoint is given (costs then come from
    MACs unless measured on random weights, which time the same).
    """
    rt = init_runtime("cpu", cfg.run.threads)
    setup_logging(rt.rank, rt.size)
    data = load_data(cfg.data, cfg.run.seed)
    teacher = build_model(cfg.model.arch, data.num_classes, cfg.model.width).eval()
    if cfg.teacher.checkpoint:
        from .teacher import load_teacher_checkpoint
        load_teacher_checkpoint(cfg.teacher.checkpoint, teacher)
    blocks = find_blocks(teacher, data.input_shape, cfg.blocks.granularity)
    cache = _cache_decision(cfg, blocks, data, rt.device, ranks)  # as if the ranks shared this node
    costs, member_share, cost_model = _costs(cfg, teacher, blocks, data, rt.device, ranks, cache.use)
    plan = make_plan(costs, ranks, cfg.plan.method, cfg.plan.hybrid, cfg.plan.teams,
                     tm=TeamModel.for_groups(cfg.distill.bn_groups, member_share))
    return {"arch": cfg.model.arch, "granularity": cfg.blocks.granularity, "cost_model": cost_model,
            "member_share": member_share, "teacher_cache": cache.to_dict(),
            "blocks": [b.to_dict() for b in blocks], "plan": plan.to_dict()}


__all__ = ["run_job", "plan_only", "Interrupted", "EXIT_INTERRUPTED", "block_path"]
