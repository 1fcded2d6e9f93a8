"""The job, start to end, on every rank, as a list of stages (``run_job``).

config -> teacher -> schedule -> resume -> costs -> plan -> per-rank distill -> gather ->
assemble/fine-tune -> report. Each stage takes and returns frozen records and does at most one
collective, so the MPI protocol reads in order in ``run_job``:

1. ``share_teacher``: rank 0 gets the teacher (cache, checkpoint or training) and its blocks, and
   broadcasts them (no shared filesystem needed);
2. ``agree_schedule``: every rank says whether it can hold the teacher cache (allgather);
3. ``find_finished``: every rank says which finished blocks it sees under the run directory
   (allgather; the run directory need not be shared);
4. ``measure_costs``: every rank times every block at once, so the costs include the ranks'
   contention for the node (gather to rank 0, which keeps the median);
5. ``share_plan``: rank 0 plans the remaining blocks and broadcasts the plan;
6. ``distill_owned``: every rank (or team of ranks: a communicator split) distills its blocks,
   checkpointing each under the run directory;
7. ``gather_outcomes``: trained blocks and metrics go to rank 0, which keeps a copy of every
   finished block it does not hold (``keep_on_root``: its run directory is the job's record);
8. ``stop_if_interrupted``: every rank learns whether any rank was stopped (broadcast);
9. rank 0 assembles, fine-tunes, evaluates, saves and reports (``finish_on_root``) while the
   others wait for it to say it is done (broadcast).
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from hpc_bkd.blocks.candidates import Candidate, Unit, job_units
from hpc_bkd.blocks.models import build_model
from hpc_bkd.blocks.students import applies, build_candidate
from hpc_bkd.blocks.surgery import BlockSpec, assemble, find_blocks
from hpc_bkd.blocks.whole_units import add_built_units, built_units
from hpc_bkd.config import Config, ConfigError, job_candidates
from hpc_bkd.costs.inputs import exchange_seconds_per_byte
from hpc_bkd.costs.measure import block_costs, read_costs, team_sizes
from hpc_bkd.data.batches import Data, describe
from hpc_bkd.data.sources import check_batches, load_data
from hpc_bkd.deploy.export import export_run
from hpc_bkd.deploy.form import TimingPlan, measure_models, model_size
from hpc_bkd.deploy.formats import missing_extra
from hpc_bkd.distill.distiller import BlockResult, LocalDistiller
from hpc_bkd.distill.finetune import finetune, recalibrate_bn
from hpc_bkd.distill.teacher import accuracy, get_teacher, state_fingerprint
from hpc_bkd.distill.teacher_cache import CacheDecision, decide, memory_budget
from hpc_bkd.distill.teams import Team, team_backend
from hpc_bkd.distributed.energy import EnergyMeter
from hpc_bkd.distributed.peers import watching_peers
from hpc_bkd.distributed.runtime import (
    Interrupted,
    Runtime,
    clear_stop,
    init_runtime,
    install_stop_handlers,
    peak_memory_mb,
    setup_logging,
)
from hpc_bkd.errors import EXIT_FAILED, RootFailed, exit_code_of
from hpc_bkd.job.limits import check_fits
from hpc_bkd.job.outcomes import (
    Clock,
    PreparedTeacher,
    RankOutcome,
    Resume,
    ScheduleChoice,
    StudentResult,
    TeacherShare,
)
from hpc_bkd.job.report import build_record, write_report
from hpc_bkd.job.tracking import Trackers
from hpc_bkd.planning.planner import Plan, TeamModel, describe_plan, make_plan
from hpc_bkd.planning.schedule import schedule_for
from hpc_bkd.planning.table import CostTable
from hpc_bkd.selection.options import Choice, TrainedUnits, check_prediction, choose_students, kl_to_teacher
from hpc_bkd.store import atomic_io
from hpc_bkd.store.lock import run_dir_lock
from hpc_bkd.store.progress import DONE, FAILED, INTERRUPTED, RankProgress
from hpc_bkd.store.records import (
    Accuracy,
    CacheReport,
    CacheUse,
    Comparison,
    Energy,
    ExportResult,
    InferenceReport,
    JobRecord,
    ModelSizes,
)
from hpc_bkd.store.rundir import BlockStore, RunDir, UnitShape, job_fingerprint

log = logging.getLogger("hpc_bkd")


def run_job(cfg: Config, rt: Runtime | None = None) -> JobRecord | None:
    """Run the whole job on this rank. Returns the job record on rank 0, None on the others.

    Raises ``Interrupted`` on every rank if a stop was requested (everything finished is saved),
    and ``PeerLost`` on the ranks left when one stops answering (``run.peer_timeout_s``).
    """
    rt = rt or init_runtime(cfg.run.device, cfg.run.threads)
    setup_logging(rt.rank, rt.size)
    with watching_peers(rt, cfg.run.peer_timeout_s), job_lock(cfg, rt):
        return _run_stages(cfg, rt)


def run_rank(cfg: Config, received: list[int] | None = None) -> JobRecord | None:
    """This rank's whole job as every entry point starts it (``hpc-bkd run``, a submitit task):
    stop signals only ask the loop to save and stop (``received`` collects their numbers), any stale
    stop request is cleared, then :func:`run_job`. Errors propagate: each entry point ends them its
    own way (an exit code; submitit's result file and requeue)."""
    install_stop_handlers(received=received)
    clear_stop()  # a caller's process (submitit's debug executor, a test) may hold a stale flag
    return run_job(cfg)


def job_lock(cfg: Config, rt: Runtime) -> AbstractContextManager:
    """Rank 0 holds the run directory's lock for the whole job (``runlock``); a second job there
    fails at once (``RunDirLocked``) before it reads or writes anything."""
    return run_dir_lock(cfg.run.dir) if rt.is_root else nullcontext()


def _run_stages(cfg: Config, rt: Runtime) -> JobRecord | None:
    """The stages of ``run_job`` with this rank's progress file kept up to date (``hpc-bkd status``)
    and, on rank 0, the job handed to the trackers (``run.tracking``) once it is reported."""
    backend = check_team_backend(cfg, rt)
    progress = RankProgress(rt.rank, rt.size, cfg.run.log_interval_s)  # a file once the run dir is ours (attach)
    try:
        trackers = Trackers.open(cfg, RunDir(cfg.run.dir)) if rt.is_root else None
        record = _stages(cfg, rt, backend, progress)
    except Interrupted:
        progress.finish(INTERRUPTED)
        raise
    except BaseException:
        progress.finish(FAILED)
        raise
    progress.finish(DONE)
    if record is not None and trackers is not None:
        trackers.log_job(record, RunDir(cfg.run.dir))
    return record


def _stages(cfg: Config, rt: Runtime, backend: str, progress: RankProgress) -> JobRecord | None:
    """The stages of ``run_job`` in order, one collective each (see the module's docstring)."""
    clock = Clock()
    progress.phase("data")
    run_dir = open_run_dir(cfg, rt)
    data = load_job_data(cfg, rt, clock)
    progress.attach(run_dir.progress(rt.rank))  # past the up-front checks: a refused job leaves no file
    progress.phase("teacher")
    teacher = share_teacher(cfg, rt, data, run_dir, clock)
    units = teacher.units
    choice = agree_schedule(cfg, rt, teacher, data)
    resume = find_finished(cfg, rt, run_dir, teacher, units)
    progress.phase("cost timing")
    costs = measure_costs(cfg, rt, teacher, units, data, choice, resume, run_dir)
    progress.phase("plan")
    plan = share_plan(cfg, rt, units, costs, resume, clock)
    outcome = distill_owned(cfg, rt, teacher, units, data, run_dir, plan, choice, resume, backend, progress)
    progress.phase("gather")
    outcomes = gather_outcomes(rt, outcome, clock)
    keep_on_root(rt, outcomes, run_dir, teacher, units)
    stop_if_interrupted(rt, outcomes, run_dir)
    if not rt.is_root:
        progress.phase("waiting for rank 0")
        await_root(rt, run_dir)
        return None
    outcomes = [replace(o, phases=progress.spans()) if o.rank == rt.rank else o for o in outcomes]
    progress.phase("finish")
    clock.mark("distill+gather")
    return finish_on_root(rt, lambda: report_job(cfg, rt, data, run_dir, teacher, units, choice, costs, plan,
                                                 outcomes, resume, clock))


# ------------------------------------------------------------------------------ set-up stages


def check_team_backend(cfg: Config, rt: Runtime) -> str:
    """Before any work: a team transport this rank's device cannot use is a config error."""
    try:
        return team_backend(cfg.distill.team_backend, rt.device)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def check_selection_runtime(cfg: Config, device: torch.device) -> None:
    """Before any work: ONNX Runtime timing or int8 options asked for where they cannot run is a
    config error now, not a failure after the distillation (every rank sees the same install)."""
    s = cfg.select
    if s.method != "budget":
        return
    int8 = "int8" in s.precisions
    why = missing_extra("onnx") if s.runtime == "onnxruntime" or int8 else None
    if why:
        raise ConfigError(f"select.runtime {s.runtime}, select.precisions {s.precisions}: {why}")
    if int8 and s.runtime == "auto" and device.type != "cpu":
        raise ConfigError(f"select.precisions int8: int8 options are ONNX Runtime CPU files, and this job runs on "
                          f"{device.type} (select.runtime auto times in PyTorch there): set select.runtime "
                          "onnxruntime to time on the CPU, or drop int8")


def open_run_dir(cfg: Config, rt: Runtime) -> RunDir:
    """Rank 0 checks, before anything is written, that blocks here are this job's (config.json
    is written once the job fingerprint agrees too, in ``find_finished``)."""
    check_selection_runtime(cfg, rt.device)
    run_dir = RunDir(cfg.run.dir)
    if rt.is_root:
        run_dir.create()
        run_dir.check_same_job(cfg)
        for stale in run_dir.progress_dir.glob("rank-*.json"):  # an earlier run's ranks beyond this job's
            number = stale.stem.split("-")[-1]
            if number.isdigit() and int(number) >= rt.size:
                stale.unlink(missing_ok=True)
        log.info("hpc_bkd: %d rank(s), run dir %s, device %s, %d thread(s) per rank", rt.size, run_dir,
                 rt.device, rt.threads)
        if cfg.run.export:
            usable_export_formats(cfg, warn=True)
    return run_dir


def load_job_data(cfg: Config, rt: Runtime, clock: Clock) -> Data:
    """The job's data, once the teacher is known to fit this rank (estimated, nothing allocated)."""
    check_fits(cfg, rt.device, rt.local_size)
    data = load_data(cfg.data, cfg.run.seed, rt.device)
    check_batches(cfg, data)
    if rt.is_root:
        log.info("data: %s: %s", cfg.data.dataset, describe(data))
    clock.mark("data")
    return data


def candidate_units(cfg: Config, teacher: nn.Module, blocks: Sequence[BlockSpec]) -> list[Unit]:
    """The job's units: every candidate for every block it fits. A kind that does not fit some
    blocks (separable on a transformer block, shrink on a single conv) is left out for them and
    said once per kind, not an error."""
    left_out: dict[str, list[tuple[int, str]]] = {}

    def fits(block: int, candidate: Candidate) -> bool:
        why = applies(blocks[block], candidate, teacher)
        if why is not None:
            left_out.setdefault(candidate.name, []).append((block, why))
        return why is None

    t0 = time.perf_counter()
    units = job_units(len(blocks), job_candidates(cfg), fits)
    log.info("candidates: %d unit(s) for %d block(s) found in %.1fs", len(units), len(blocks), time.perf_counter() - t0)
    for name, where in left_out.items():
        log.info("candidate %s left out for %d block(s) (%s): %s", name, len(where),
                 ", ".join(str(b) for b, _ in where), where[0][1])
    if not units:
        raise ValueError(f"no candidate in {', '.join(c.name for c in job_candidates(cfg))} fits any block "
                         f"of {cfg.model.arch} (blocks.candidates, blocks.granularity {cfg.blocks.granularity})")
    return units


def share_teacher(cfg: Config, rt: Runtime, data: Data, run_dir: RunDir, clock: Clock) -> PreparedTeacher:
    """Rank 0 prepares the teacher and finds its blocks and their candidates; every rank gets
    them (broadcast), with the narrowed units rank 0 built (``shrink``), so no other rank repeats
    Torch-Pruning's probing."""
    share = None
    if rt.is_root:
        try:
            share = _prepare_teacher(cfg, rt, data, run_dir, clock)
        except Interrupted:  # stopped while training the teacher: its progress is saved
            share = TeacherShare(interrupted=True)
    shared = clock.collective("broadcast_s", lambda: rt.bcast(share))
    assert isinstance(shared, TeacherShare)
    if shared.interrupted or shared.state is None:
        raise Interrupted(str(run_dir))
    if shared.error:
        raise ValueError(shared.error)
    teacher = build_model(cfg.model.arch, data.num_classes, cfg.model.width, cfg.model.kwargs)
    teacher.load_state_dict(shared.state)
    if rt.is_root:
        clock.mark("broadcast")
    else:
        add_built_units(shared.built)
    return PreparedTeacher(teacher.eval(), shared.info or {}, shared.val_acc, shared.test_acc, shared.blocks,
                           shared.fingerprint, shared.units)


def _prepare_teacher(cfg: Config, rt: Runtime, data: Data, run_dir: RunDir, clock: Clock) -> TeacherShare:
    teacher, info = get_teacher(cfg, data, run_dir, rt.device)
    clock.mark("teacher")
    val = accuracy(teacher, data, "val", cfg.data.eval_batch_size, rt.device)
    test = accuracy(teacher, data, "test", cfg.data.eval_batch_size, rt.device)
    teacher.cpu()
    log.info("teacher %s (%s): val acc %.2f%%, test acc %.2f%%", cfg.model.arch, info["source"], val, test)
    blocks = find_blocks(teacher, data.input_shape, cfg.blocks.granularity)
    clock.mark("teacher")
    state = teacher.state_dict()
    fingerprint = job_fingerprint(cfg, state_fingerprint(state), blocks)
    try:
        units = candidate_units(cfg, teacher, blocks)
    except ValueError as exc:  # nothing fits: every rank raises it after the broadcast
        return TeacherShare(state, info, val, test, blocks, fingerprint, error=str(exc))
    clock.mark("candidates")
    return TeacherShare(state, info, val, test, blocks, fingerprint, units=units, built=built_units())


def agree_schedule(cfg: Config, rt: Runtime, teacher: PreparedTeacher, data: Data) -> ScheduleChoice:
    """The teacher cache is used only if every rank can hold every block's activations."""
    decisions = rt.allgather(cache_decision(cfg, teacher.blocks, data, rt.device, rt.local_size))
    cache = next((d for d in decisions if not d.use), decisions[0])
    if rt.is_root:
        log.info("teacher cache %s", cache.reason)
    return ScheduleChoice(schedule_for(cfg.distill.schedule, cache.use), cache.to_record())


def cache_decision(cfg: Config, blocks: list[BlockSpec], data: Data, device: torch.device,
                   local_size: int) -> CacheDecision:
    """Whether this rank, one of ``local_size`` on its node, may cache every block's activations."""
    budget = memory_budget(device, local_size, cfg.distill.teacher_cache_gb)
    return decide(cfg.distill.teacher_cache, cfg.data.augment, schedule_for(cfg.distill.schedule), blocks,
                  len(data.train), budget)


def find_finished(cfg: Config, rt: Runtime, run_dir: RunDir, teacher: PreparedTeacher, units: list[Unit]) -> Resume:
    """Which units an earlier run of this job finished, as any rank sees them; each file is
    checked to hold the unit its name says. Once this job is known to own the directory (the
    same fingerprint), rank 0 records its config (config.json)."""
    seen = rt.allgather(run_dir.finished_units(teacher.fingerprint, units, unit_shapes(cfg, teacher)))
    if rt.is_root:
        atomic_io.write_json(run_dir.config, cfg.to_dict())
    return Resume(sorted(set().union(*seen)), seen)


def unit_shapes(cfg: Config, teacher: PreparedTeacher) -> Callable[[Unit], UnitShape]:
    """What a finished unit's file must hold: its block's name and its student's tensor shapes."""
    def expect(unit: Unit) -> UnitShape:
        spec = teacher.blocks[unit.block]
        student = build_candidate(spec, Candidate.parse(unit.candidate), cfg.run.seed, teacher.model)
        return UnitShape(spec.name, {k: tuple(v.shape) for k, v in student.state_dict().items()})
    return expect


# ------------------------------------------------------------------------------ costs and plan


def measure_costs(cfg: Config, rt: Runtime, teacher: PreparedTeacher, units: list[Unit], data: Data,
                  choice: ScheduleChoice, resume: Resume, run_dir: RunDir) -> CostTable | None:
    """Rank 0's cost table of every unit (None elsewhere): every rank measures at once, so
    contention between ranks is in the figures; a re-run with every unit finished plans nothing and
    takes the first run's costs for its report (rank 0 alone measures if it has none)."""
    def measure(ranks: int, exchange: float = 0.0) -> CostTable:
        return block_costs(cfg, teacher.model, teacher.blocks, units, data, rt.device, ranks, choice.schedule,
                           choice.cache.use, exchange)

    if resume.remaining(units):
        teams_cache = choice.cache.use and team_sizes(cfg, rt.size, len(units))  # members exchange cache rows
        measured = rt.gather(measure(rt.size, exchange_seconds_per_byte(rt.comm) if teams_cache else 0.0))
    elif not rt.is_root:
        return None
    else:
        stored = read_costs(run_dir.costs, units)
        if stored is not None:
            log.info("every unit is finished: no cost measurement (costs from %s)", run_dir.costs)
            return stored
        measured = [measure(1)]
    if measured is None:  # not rank 0
        return None
    table = CostTable.combine(measured)
    if described := table.inputs.describe():
        log.info("costs: %s", described)
    atomic_io.write_json(run_dir.costs, table.to_json(
        [u.key for u in units], device=str(rt.device), threads=rt.threads, batch_size=cfg.data.batch_size,
        teacher_cache=choice.cache.use, teacher_passes_per_step=1.0 / cfg.distill.epochs if choice.cache.use else 1.0))
    return table


def share_plan(cfg: Config, rt: Runtime, units: list[Unit], costs: CostTable | None, resume: Resume,
               clock: Clock) -> Plan:
    """Rank 0 plans the units left to train (units of one block share its teacher pass: the cost
    model's max over prefixes); every rank gets the plan (broadcast)."""
    plan = None
    if rt.is_root:
        assert costs is not None
        remaining = [u.id for u in resume.remaining(units)]
        plan = make_plan([costs.costs[i] for i in remaining], rt.size, cfg.plan.method, cfg.plan.hybrid,
                         cfg.plan.teams, tm=TeamModel.for_groups(cfg.distill.bn_groups, costs.member_share),
                         feed=costs.inputs.feed).for_blocks(remaining, costs.costs)
        if resume.finished:
            keys = [units[i].key for i in resume.finished]
            log.info("resuming: %d unit(s) already finished (%s), %d to train", len(keys),
                     ",".join(keys) if len(keys) <= 8 else ",".join(keys[:8]) + ",...", len(remaining))
        for line in describe_plan(plan):
            log.info("%s", line)
        clock.mark("plan")
    shared = clock.collective("broadcast_s", lambda: rt.bcast(plan))
    assert isinstance(shared, Plan)
    if rt.is_root:
        clock.mark("broadcast")
    return shared


# ------------------------------------------------------------------------------ distillation


def distill_owned(cfg: Config, rt: Runtime, teacher: PreparedTeacher, units: list[Unit], data: Data,
                  run_dir: RunDir, plan: Plan, choice: ScheduleChoice, resume: Resume, backend: str,
                  progress: RankProgress | None = None) -> RankOutcome:
    """Distill the units the plan gives this rank, alone or with its team (a communicator split;
    a team of ranks shares its units and splits every batch, see ``teams.py``)."""
    team_comm = rt.comm.Split(color=plan.team_of(rt.rank), key=rt.rank)
    team = Team(team_comm, cfg.distill.bn_groups, backend, rt.device) if team_comm.size > 1 else None
    if team is not None and team.is_leader:
        log.info("team of %d ranks: %s collectives", team.size, backend)
    owned = [units[i] for i in plan.assignment[rt.rank]]
    if not owned:
        log.info("idle: no units for this rank (%d ranks, %d units to train)", rt.size, len(resume.remaining(units)))
    meter = EnergyMeter(rt.device)
    meter.start()
    start, waited = time.time(), data.stats.wait_s
    distiller = LocalDistiller(teacher.model, teacher.blocks, owned, data, cfg, BlockStore(run_dir, teacher.fingerprint),
                               rt.device, choice.schedule, rt.rank, teacher.val_acc, team, progress)
    if progress is not None:
        progress.plan(plan.predicted[rt.rank], distiller.steps, cfg.distill.epochs,
                      len([u for u in owned if u.id not in resume.finished]))
    results, interrupted = distiller.run(resume.finished)
    if team is not None:  # not on an error: that aborts every rank, and a teardown could wait on them
        team.close()
    end = time.time()
    cache = distiller.cache
    return RankOutcome(
        rank=rt.rank, host=rt.host, device=str(rt.device), threads=rt.threads, blocks=[u.id for u in owned],
        results=results, carried=[BlockResult.from_dict(run_dir.load_block(units[i]))
                                  for i in resume.carried_by(rt.rank)],
        interrupted=interrupted, start=start, end=end, energy=Energy(**meter.stop()),
        peak_mem_mb=peak_memory_mb(rt.device),
        cache=CacheUse(cache.nbytes / 2**20, cache.fill_s) if cache is not None else None, local_rank=rt.local_rank,
        data_wait_s=data.stats.wait_s - waited, bad_images=len(data.stats.bad_images),
        heartbeat_cpu_s=rt.peers.cpu_s if rt.peers is not None else None,
        heartbeat_wall_s=time.monotonic() - rt.peers.started if rt.peers is not None else None,
        phases=progress.spans() if progress is not None else [], work=progress.work if progress is not None else [])


def gather_outcomes(rt: Runtime, outcome: RankOutcome, clock: Clock) -> list[RankOutcome]:
    """Every rank's outcome on rank 0 (an empty list elsewhere)."""
    return clock.collective("gather_s", lambda: rt.gather(outcome)) or []


def keep_on_root(rt: Runtime, outcomes: list[RankOutcome], run_dir: RunDir, teacher: PreparedTeacher,
                 units: list[Unit]) -> None:
    """Rank 0's run directory is the job's record: it keeps every finished block the other ranks
    trained or forwarded (also when the job was stopped). Without a shared filesystem those
    live on other nodes; with one they are already here and nothing is rewritten."""
    if not rt.is_root:
        return
    store = BlockStore(run_dir, teacher.fingerprint)
    for o in outcomes:
        for r in [*o.results, *o.carried]:
            if not run_dir.block(units[r.unit]).is_file():
                store.save_finished(units[r.unit], r.to_dict())


def stop_if_interrupted(rt: Runtime, outcomes: list[RankOutcome], run_dir: RunDir) -> None:
    """Raise ``Interrupted`` on every rank if any rank was stopped (rank 0 decides, broadcast)."""
    if rt.bcast(any(o.interrupted for o in outcomes) if rt.is_root else None):
        if rt.is_root:
            log.warning("job interrupted: finished blocks and unfinished checkpoints are saved under %s; "
                        "re-run the same command to resume", run_dir)
        raise Interrupted(str(run_dir))


def await_root(rt: Runtime, run_dir: RunDir) -> None:
    """Sleep while rank 0 fine-tunes and reports, then leave together (or all be interrupted, or
    all end with rank 0's error)."""
    outcome = rt.bcast(None)
    if outcome == "interrupted":
        raise Interrupted(str(run_dir))
    if isinstance(outcome, tuple):
        _, message, code = outcome
        raise RootFailed(message, code)


def finish_on_root(rt: Runtime, finish: Callable[[], JobRecord]) -> JobRecord:
    """Run rank 0's last stages, then release the waiting ranks, whatever happened."""
    try:
        record = finish()
    except Interrupted:
        rt.bcast("interrupted")
        raise
    except Exception as exc:  # e.g. a budget no choice meets: the others must not wait for "done"
        rt.bcast(("failed", str(exc), exit_code_of(exc) or EXIT_FAILED))
        raise
    rt.bcast("done")
    return record


# ------------------------------------------------------------------------------ rank 0: the student


def collect_results(outcomes: list[RankOutcome], resume: Resume, run_dir: RunDir,
                    units: list[Unit]) -> dict[int, BlockResult]:
    """Every unit's result: trained now, forwarded by the rank that could see it, or read back."""
    results = {r.unit: r for o in outcomes for r in o.results}
    for o in outcomes:
        results.update({r.unit: replace(r, resumed_finished=True) for r in o.carried})
    for i in resume.finished:
        if i not in results:
            results[i] = BlockResult.from_dict(run_dir.load_block(units[i]), resumed_finished=True)
    return results


def make_student(cfg: Config, rt: Runtime, data: Data, run_dir: RunDir, teacher: PreparedTeacher,
                 units: list[Unit], results: dict[int, BlockResult], chosen: Choice, clock: Clock) -> StudentResult:
    """Assemble the chosen blocks into the teacher, recalibrate, fine-tune, evaluate, save."""
    students: dict[int, nn.Module] = {}
    for block, u in chosen.units.items():
        s = build_candidate(teacher.blocks[block], Candidate.parse(units[u].candidate), cfg.run.seed, teacher.model)
        s.load_state_dict(results[u].state_dict)
        students[block] = s.eval()
    accepted = sorted(students)
    student = assemble(teacher.model, students, teacher.blocks)
    before = accuracy(student, data, "test", cfg.data.eval_batch_size, rt.device)
    kl = {"assembled": _val_kl(cfg, rt, data, teacher, student)} if chosen.selection else {}
    recalibrate_bn(student, data, cfg, cfg.finetune.recalibrate_bn_batches, rt.device)
    recalibrated = accuracy(student, data, "test", cfg.data.eval_batch_size, rt.device)
    kl.update({"recalibrated": _val_kl(cfg, rt, data, teacher, student)} if chosen.selection else {})
    log.info("assembled student: %d/%d blocks replaced, test acc %.2f%% (%.2f%% after BN recalibration)",
             len(accepted), len(teacher.blocks), before, recalibrated)
    clock.mark("assemble")
    kinds = {b: units[u].candidate for b, u in chosen.units.items()}
    history = finetune(student, teacher.model, data, cfg, rt.device, run_dir.finetune_partial,
                       f"{teacher.fingerprint}:{sorted(kinds.items())}:{sorted(vars(cfg.finetune).items())}")
    student.cpu()
    clock.mark("finetune")
    after = accuracy(student, data, "test", cfg.data.eval_batch_size, rt.device)
    kl.update({"finetuned": _val_kl(cfg, rt, data, teacher, student)} if chosen.selection else {})
    student.cpu()
    clock.mark("evaluate")
    atomic_io.save({"state_dict": student.state_dict(), "accepted_blocks": accepted,
                    "students": {str(b): k for b, k in kinds.items()}, "config": cfg.to_dict(),
                    # blocks whose chosen option is int8: the ONNX export quantizes them (see export)
                    "precisions": {str(b): p for b, p in chosen.precisions.items()}}, run_dir.student)
    shape = data.input_shape
    return StudentResult(student, accepted,
                         Accuracy(teacher.test_acc, teacher.val_acc, before, recalibrated, after),
                         history,
                         ModelSizes(model_size(teacher.model, shape), model_size(student, shape)), kl,
                         sorted(chosen.units.values()))


def _val_kl(cfg: Config, rt: Runtime, data: Data, teacher: PreparedTeacher, student: nn.Module) -> float:
    kl = kl_to_teacher(student, teacher.model, data, "val", cfg.data.eval_batch_size, rt.device)
    student.cpu()
    teacher.model.cpu()
    return kl


def report_job(cfg: Config, rt: Runtime, data: Data, run_dir: RunDir, teacher: PreparedTeacher, units: list[Unit],
               choice: ScheduleChoice, costs: CostTable | None, plan: Plan, outcomes: list[RankOutcome],
               resume: Resume, clock: Clock) -> JobRecord:
    """Rank 0's last stages: the student's blocks chosen from the gathered units, the student
    assembled and fine-tuned, its measured speed and its standalone export, then the job record."""
    assert costs is not None
    results = collect_results(outcomes, resume, run_dir, units)
    chosen = choose_students(cfg.select, cfg.distill.accept_tolerance,
                             TrainedUnits(teacher.model, teacher.blocks, units, results, teacher.val_acc,
                                          data.input_shape, cfg.run.seed, rt.device, rt.threads, data,
                                          cfg.data.eval_batch_size))
    clock.mark("select")
    student = make_student(cfg, rt, data, run_dir, teacher, units, results, chosen, clock)
    selection = chosen.selection
    if selection is not None:
        selection = check_prediction(selection, student.model, teacher.model, data.input_shape, student.kl, rt.device,
                                     rt.threads, teacher.blocks, chosen.precisions, data, cfg.select)
        clock.mark("select")
    timing = TimingPlan(batch_size=cfg.data.eval_batch_size, threads=rt.threads)
    inference = measure_deployed(rt, data, teacher, student, timing) if cfg.run.measure_inference else None
    clock.mark("inference")
    # the export times its files on the CPU; on a CPU rank the eager figures just taken are those
    eager = inference.models if inference is not None and rt.device.type == "cpu" else None
    exported = export_student(cfg, run_dir, timing, eager) if cfg.run.export else None
    clock.mark("export")
    record = build_record(cfg, rt.size, run_dir, teacher.info, choice.cache, costs, plan, teacher.blocks, units,
                          results, outcomes, student, clock, inference, exported, selection)
    write_report(record, run_dir)
    return record


def measure_deployed(rt: Runtime, data: Data, teacher: PreparedTeacher, student: StudentResult,
                     plan: TimingPlan) -> InferenceReport:
    """The teacher's and the student's inference speed in deploy form on this rank's device, whole
    and block by block: compression is for a faster model, so its speed is measured, not assumed."""
    report = measure_models(teacher.model, student.model, data.input_shape, plan, rt.device, teacher.blocks,
                            student.accepted)
    log.info("inference: %s", report.models.line)
    return report


def usable_export_formats(cfg: Config, warn: bool = False) -> list[str]:
    """The export formats of ``run.export_formats`` whose packages are installed (``warn``: say
    which are not, and how to install them, before the job starts rather than at its end)."""
    usable = []
    for fmt in cfg.run.export_formats:
        why = missing_extra(fmt)
        if why and warn:
            log.warning("%s; this job exports %s", why, "without it" if len(cfg.run.export_formats) > 1 else "nothing")
        usable += [] if why else [fmt]
    return usable


def export_student(cfg: Config, run_dir: RunDir, plan: TimingPlan, eager: Comparison | None) -> ExportResult | None:
    """The standalone export of the student (``run.export``): files, not results, so a failure is
    logged and the job still reports (``hpc-bkd export`` retries it alone). ``eager``: the deploy
    form's CPU figures already measured, reused rather than timed again."""
    formats = usable_export_formats(cfg)
    if not formats:
        return None
    try:
        result = export_run(run_dir.root, formats, plan=plan, eager=eager)
    except Exception as exc:
        log.warning("export failed (the student is saved in %s; retry with `hpc-bkd export --run-dir %s`): %r",
                    run_dir.student, run_dir, exc)
        return None
    log.info("export: %s (%s)", result.export_dir, ", ".join(sorted(Path(p).name for p in result.files)))
    return result


# ------------------------------------------------------------------------------ `hpc-bkd plan`


@dataclass(frozen=True)
class PlanPreview:
    """What ``hpc-bkd plan`` shows: blocks, their costs and the plan for a number of ranks."""

    arch: str
    granularity: str
    costs: CostTable
    teacher_cache: CacheReport
    blocks: list[BlockSpec]
    plan: Plan
    units: list[Unit] = field(default_factory=list)  # the plan's costs are per unit, in this order

    def to_json(self) -> dict:
        return {"arch": self.arch, "granularity": self.granularity, "cost_model": self.costs.cost_model,
                "member_share": self.costs.member_share, "teacher_cache": vars(self.teacher_cache),
                "blocks": [b.to_dict() for b in self.blocks], "plan": self.plan.to_dict(),
                "units": [{"id": u.id, "block": u.block, "candidate": u.candidate} for u in self.units]}


def plan_only(cfg: Config, ranks: int) -> PlanPreview:
    """`hpc-bkd plan`: blocks, the assignment and predicted loads, without training students.

    Needs the teacher's shape only: a fresh model when no checkpoint is given (costs then come from
    MACs unless measured on random weights, which time the same).
    """
    rt = init_runtime("cpu", cfg.run.threads)
    setup_logging(rt.rank, rt.size)
    check_fits(cfg, rt.device)
    data = load_data(cfg.data, cfg.run.seed)
    teacher = build_model(cfg.model.arch, data.num_classes, cfg.model.width, cfg.model.kwargs).eval()
    if cfg.teacher.checkpoint:
        from hpc_bkd.distill.teacher import load_teacher_checkpoint
        load_teacher_checkpoint(cfg.teacher.checkpoint, teacher)
    blocks = find_blocks(teacher, data.input_shape, cfg.blocks.granularity)
    cache = cache_decision(cfg, blocks, data, rt.device, ranks)  # as if the ranks shared a node
    units = candidate_units(cfg, teacher, blocks)
    costs = block_costs(cfg, teacher, blocks, units, data, rt.device, ranks,
                        schedule_for(cfg.distill.schedule, cache.use), cache.use)
    plan = make_plan(costs.costs, ranks, cfg.plan.method, cfg.plan.hybrid, cfg.plan.teams,
                     tm=TeamModel.for_groups(cfg.distill.bn_groups, costs.member_share), feed=costs.inputs.feed)
    return PlanPreview(cfg.model.arch, cfg.blocks.granularity, costs, cache.to_record(), blocks, plan, units)


__all__ = ["run_job", "plan_only", "Interrupted"]
