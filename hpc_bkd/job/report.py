"""The report: report.json for machines (``records.JobRecord``), summary.txt for people, gantt.png
for the schedule. ``build_record`` is the one place a job record is put together."""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hpc_bkd.planning.planner import Plan
from hpc_bkd.planning.table import CostTable
from hpc_bkd.store import atomic_io
from hpc_bkd.store.records import (
    KL,
    SIZES,
    BlockRecord,
    CacheReport,
    DistillTimes,
    Energy,
    ExportResult,
    InferenceReport,
    JobRecord,
    RankRecord,
    SelectionRecord,
    kl_key,
    latency_batch,
    latency_key,
    record_from,
)
from hpc_bkd.store.rundir import RunDir

if TYPE_CHECKING:
    from hpc_bkd.blocks.candidates import Unit
    from hpc_bkd.blocks.surgery import BlockSpec
    from hpc_bkd.config import Config
    from hpc_bkd.distill.distiller import BlockResult
    from hpc_bkd.job.outcomes import Clock, RankOutcome, StudentResult

log = logging.getLogger("hpc_bkd")

__all__ = ["build_record", "write_report", "summary_text", "gantt"]


def _rank_records(outcomes: list[RankOutcome], plan: Plan) -> tuple[list[RankRecord], float, float]:
    t0, t1 = min(o.start for o in outcomes), max(o.end for o in outcomes)
    rows = [record_from(RankRecord, o, busy_s=o.end - o.start, idle_s=(t1 - t0) - (o.end - o.start),
                        predicted_s_per_batch=plan.predicted[o.rank], teacher_cache=o.cache)
            for o in sorted(outcomes, key=lambda o: o.rank)]
    return rows, t0, t1


def _energy_total(outcomes: list[RankOutcome]) -> Energy:
    """GPU energy summed over ranks; CPU package energy once per host (ranks of a host share it)."""
    gpu = [o.energy.gpu_j for o in outcomes]
    per_host: dict[str, float | None] = {}
    for o in outcomes:
        per_host.setdefault(o.host, o.energy.cpu_package_j)
    cpu = list(per_host.values())
    gpu_j = sum(v for v in gpu if v is not None) if gpu and all(v is not None for v in gpu) else None
    cpu_j = sum(v for v in cpu if v is not None) if cpu and all(v is not None for v in cpu) else None
    return Energy(gpu_j, cpu_j,
                  None if gpu_j is not None else next((o.energy.gpu_unavailable for o in outcomes), None),
                  None if cpu_j is not None else next((o.energy.cpu_unavailable for o in outcomes), None))


def _block_record(spec: BlockSpec, unit: Unit, result: BlockResult | None, accepted: bool,
                  costs: CostTable) -> BlockRecord:
    spec_fields: dict[str, Any] = dict(index=spec.index, name=spec.name, members=list(spec.members), in_shape=list(spec.in_shape),
                                       out_shape=list(spec.out_shape), teacher_params=spec.params, teacher_macs=spec.macs)
    unit_fields: dict[str, Any] = dict(accepted=accepted, cost=costs.costs[unit.id], candidate=unit.candidate, unit=unit.id)
    if result is None:  # kept the teacher's block: nothing was trained
        return BlockRecord(**spec_fields, **unit_fields, rank=None, train_time_s=0.0, epochs=None, final_loss=None,
                           swapped_val_acc=None, early_stopped=False, resumed=False, resumed_finished=False, spans=[],
                           history=[])
    return record_from(BlockRecord, result, **spec_fields, **unit_fields)


def build_record(cfg: Config, world_size: int, run_dir: RunDir, teacher_info: dict, cache: CacheReport,
                 costs: CostTable, plan: Plan, blocks: list[BlockSpec], units: list[Unit],
                 results: dict[int, BlockResult], outcomes: list[RankOutcome], student: StudentResult, clock: Clock,
                 inference: InferenceReport | None = None, exported: ExportResult | None = None,
                 selection: SelectionRecord | None = None) -> JobRecord:
    """The job record of a finished job, from the records its stages returned (a block record
    per unit: each candidate student of each block)."""
    ranks, t0, t1 = _rank_records(outcomes, plan)
    block_rows = [_block_record(blocks[u.block], u, results.get(u.id), u.id in student.chosen_units, costs)
                  for u in units]
    return JobRecord(
        status="completed", finished_at=time.strftime("%Y-%m-%dT%H:%M:%S"), run_dir=str(run_dir),
        world_size=world_size, config=cfg, teacher=teacher_info, cost_model=costs.cost_model,
        member_share={str(m): v for m, v in costs.member_share.items()}, teacher_cache=cache, plan=plan,
        blocks=block_rows, ranks=ranks,
        distill=DistillTimes(t0, t1, t1 - t0, [b.unit or 0 for b in block_rows if b.resumed_finished or b.resumed],
                             clock.comm["broadcast_s"], clock.comm["gather_s"]),
        accepted_blocks=student.accepted, accuracy=student.accuracy, models=student.sizes,
        finetune=student.finetune, energy=_energy_total(outcomes), phases_s=dict(clock.phases),
        wall_s=time.time() - clock.started, inference=inference, export=exported, selection=selection,
        inputs=dict(vars(costs.inputs)))


def gantt(record: JobRecord, path: Path) -> None:
    """The schedule picture: per rank its phases and what it worked on (``schedule_plot``)."""
    from hpc_bkd.job.plots import draw

    draw(record, path)


def _block_lines(r: JobRecord) -> list[str]:
    """One line per unit (a block's candidate student): who trained it, how well, whether kept."""
    lines = [f"{'block':>5} {'name':<18} {'student':<18} {'rank':>4} {'train s':>8} {'mse':>9} {'swap acc':>8} "
             f"{'KL':>7} {'kept':>5} {'note':<10}"]
    for b in r.blocks:
        note = "resumed" if b.resumed_finished else ("early" if b.early_stopped else "")
        if b.resumed and not b.resumed_finished:
            note = "continued"
        kl = f"{b.swapped_val_kl:>7.4f}" if b.swapped_val_kl is not None else f"{'-':>7}"
        lines.append(f"{b.index:>5} {b.name[:18]:<18} {b.candidate[:18]:<18} "
                     f"{b.rank if b.rank is not None else '-':>4} {b.train_time_s:>8.2f} "
                     f"{(b.final_loss or 0):>9.5f} {(b.swapped_val_acc or 0):>8.2f} {kl} "
                     f"{'yes' if b.accepted else 'NO':>5} {note:<10}")
    return lines


def _selection_lines(r: JobRecord) -> list[str]:
    """The budgeted choice: the budget, the predicted against the measured whole student, and the
    quality/cost front it was chosen from."""
    s = r.selection
    if s is None:
        return []
    keys = [k for k in s.teacher if latency_batch(k) is not None or k in SIZES]
    lines = [f"selection: minimise {'summed KL' if s.objective == 'quality' else s.metric} with "
             f"{s.metric if s.objective == 'quality' else 'summed KL'} within {s.budget:g}"
             f"{' of the teacher' if s.budget_unit == 'fraction' else ''} ({'optimal' if s.optimal else 'not proven'}"
             f"; timed in {s.runtime}, precisions {'/'.join(s.precisions)}"
             f"; layouts {', '.join(f'batch {b}: {v}' for b, v in s.layouts.items())})",
             f"  {'':<18} {'teacher':>12} {'predicted':>12} {'measured':>12} {'error':>7}"]
    for k in keys + [KL]:  # the whole student's KL after BN recalibration: what its blocks' scores predict
        meas = s.measured.get(k if k != KL else kl_key("recalibrated"))
        err = f"{100 * (meas / s.predicted[k] - 1):+6.1f}%" if meas is not None and s.predicted[k] else ""
        lines.append(f"  {k:<18} {s.teacher[k]:>12.4g} {s.predicted[k]:>12.4g} "
                     f"{meas if meas is not None else float('nan'):>12.4g} {err:>7}")
        batch = latency_batch(k)
        ref = s.measured.get(latency_key(batch, "teacher")) if batch is not None else None
        if meas is not None and ref:  # as fractions of the teacher timed in the same pass: machine drift cancels
            lines.append(f"  {'  x teacher':<18} {1.0:>12.3f} {s.predicted[k] / s.teacher[k]:>12.3f} "
                         f"{meas / ref:>12.3f} {100 * ((meas / ref) / (s.predicted[k] / s.teacher[k]) - 1):+6.1f}%")
        q = s.measured.get(f"teacher_int8_{k}")
        if meas is not None and q:  # the baseline "just quantize the teacher", timed in the same rounds
            lines.append(f"  {'  int8 teacher':<18} {q:>12.4g} {'':>12} {meas:>12.4g}   student {q / meas:.2f}x "
                         "faster")
    lines.append(f"  {'block':>5} {'chosen':<18} {'KL':>7} " + " ".join(f"{'ms@' + b:>9}" for b in s.layouts)
                 + f" {'params':>9}  (teacher block: " + " ".join(f"ms@{b}" for b in s.layouts) + ")")
    teacher_rows = {o.block: o for o in s.options if o.unit is None and o.precision == "fp32"}
    for o in (o for o in s.options if o.chosen):
        t = teacher_rows[o.block]
        lines.append(f"  {o.block:>5} {o.label:<18} {o.kl:>7.4f} " + " ".join(f"{v:>9.3f}" for v in o.latency_ms.values())
                     + f" {o.params:>9,}  (" + " ".join(f"{v:.3f}" for v in t.latency_ms.values()) + ")")
    lines.append(f"  front ({len(s.front)} points, predicted): "
                 + "; ".join(f"{p.fraction:.2f}: KL {p.totals['kl']:.3f}" for p in s.front))
    if s.front_fp32:
        lines.append(f"  front without int8 ({len(s.front_fp32)} points): "
                     + "; ".join(f"{p.fraction:.2f}: KL {p.totals['kl']:.3f}" for p in s.front_fp32))
    return lines + [""]


def pareto_plot(record: JobRecord, path: Path) -> None:
    """Predicted summed KL against predicted latency (first latency batch) or the budgeted metric:
    the front, the chosen student (predicted and measured) and the teacher."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = record.selection
    assert s is not None
    key = next(k for k in s.teacher if latency_batch(k) is not None) if s.metric == "latency" else s.metric
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    ax.plot([p.totals[key] for p in s.front], [p.totals[KL] for p in s.front], "o-", color="tab:blue",
            label="exact front (predicted)" + (", with int8" if s.front_fp32 else ""))
    if s.front_fp32:
        ax.plot([p.totals[key] for p in s.front_fp32], [p.totals[KL] for p in s.front_fp32], "o--",
                color="tab:green", label="exact front, fp32 only")
    ax.plot([s.predicted[key]], [s.predicted[KL]], "*", ms=16, color="tab:red", label="chosen (predicted)")
    if key in s.measured:
        ax.plot([s.measured[key]], [s.measured.get(kl_key("recalibrated"), s.predicted[KL])], "x", ms=12,
                color="tab:red", label="chosen (measured whole)")
    ax.plot([s.teacher[key]], [0.0], "s", ms=9, color="black", label="teacher")
    if s.budget_unit == "fraction" and s.objective == "quality":
        ax.axvline(s.budget * s.teacher[key], ls="--", color="gray", lw=0.8, label="budget")
    ax.set_xlabel(f"latency (ms) at batch {latency_batch(key)}" if latency_batch(key) is not None else key)
    ax.set_ylabel("summed KL to the teacher (nats/image)")
    ax.set_title(f"{record.config.model.arch}: quality vs cost per choice of blocks")
    ax.legend(fontsize=8)
    atomic_io.savefig(fig, path)
    plt.close(fig)


def _rank_lines(r: JobRecord) -> list[str]:
    lines = [f"{'rank':>4} {'host':<14} {'busy s':>8} {'idle s':>8} {'pred s/batch':>12} {'peak MB':>8} "
             f"{'beat cpu %':>10}  blocks"]
    for row in r.ranks:
        beat = "-" if row.heartbeat_share is None else f"{100 * row.heartbeat_share:.3f}"
        lines.append(f"{row.rank:>4} {row.host[:14]:<14} {row.busy_s:>8.2f} {row.idle_s:>8.2f} "
                     f"{row.predicted_s_per_batch:>12.4f} {row.peak_mem_mb:>8.0f} {beat:>10}  "
                     f"{','.join(map(str, row.blocks)) or 'idle'}")
    return lines


def _outcome_lines(r: JobRecord) -> list[str]:
    p, acc, m = r.plan, r.accuracy, r.models
    lines = [f"plan: {p.method}{' (optimal)' if p.optimal else ''}, predicted speedup "
             f"{p.predicted_speedup:.2f}x over one rank, makespan {p.makespan:.4f}s/batch "
             f"(lower bound {p.lower_bound:.4f})"]
    if r.teacher_cache:
        fills = [row.teacher_cache.fill_s for row in r.ranks if row.teacher_cache]
        lines.append(f"teacher cache {r.teacher_cache.reason}"
                     + (f"; filled in {max(fills):.1f}s (slowest rank)" if fills else ""))
    lines.append(f"accuracy (test): teacher {acc.teacher_test:.2f}%, student {acc.student_before_finetune:.2f}% "
                 f"before / {acc.student_after_finetune:.2f}% after fine-tuning "
                 f"({acc.student_after_finetune - acc.teacher_test:+.2f} points)")
    lines.append(f"size: params {m.teacher.params:,} -> {m.student.params:,}, conv params "
                 f"{m.teacher.conv_params:,} -> {m.student.conv_params:,} "
                 f"({100 * m.student.conv_params / max(m.teacher.conv_params, 1):.1f}%), MACs "
                 f"{m.teacher.macs / 1e6:.1f}M -> {m.student.macs / 1e6:.1f}M")
    if r.inference is not None:
        lines.append(f"inference (deploy form): {r.inference.models.line}")
    if r.export is not None:
        lines.append(f"export: {r.export.export_dir}/ ({', '.join(sorted(Path(p).name for p in r.export.files))}, "
                     f"model.json; max |logit diff| {max(r.export.max_abs_diff.values(), default=0.0):.1e})")
    lines += _data_lines(r)
    gpu, cpu = r.energy.describe()
    lines.append(f"energy (distillation): GPU {gpu}; CPU package {cpu}")
    lines.append("wall time: " + ", ".join(f"{k} {v:.1f}s" for k, v in r.phases_s.items())
                 + f"; total {r.wall_s:.1f}s")
    return lines


def _data_lines(r: JobRecord) -> list[str]:
    """The input pipeline: how long ranks waited for batches, and unreadable files skipped."""
    waits = [(row.data_wait_s / row.busy_s if row.busy_s > 0 else 0.0, row) for row in r.ranks
             if row.data_wait_s is not None]
    if not waits:
        return []
    share, row = max(waits, key=lambda w: w[0])
    bad = max(row.bad_images for row in r.ranks)
    return [f"data: waited {row.data_wait_s:.1f}s for batches ({100 * share:.1f}% of its distillation, rank "
            f"{row.rank}, the most)" + (f"; {bad} unreadable image(s) skipped" if bad else "")]


def _speed_lines(r: JobRecord) -> list[str]:
    """Per replaced block, deploy form: where the student's time goes (batch 1 and throughput)."""
    if r.inference is None or not r.inference.blocks:
        return []
    lines = [f"{'block':>5} {'name':<22} {'in':>12} {'teacher ms':>10} {'student ms':>10} {'b1 x':>6} {'thru x':>6}"]
    for b in r.inference.blocks:
        c = b.comparison
        lines.append(f"{b.index:>5} {b.name[:22]:<22} {'x'.join(map(str, b.in_shape)):>12} "
                     f"{c.teacher.latency_ms_median:>10.3f} {c.student.latency_ms_median:>10.3f} "
                     f"{c.speedup_batch1:>6.2f} {c.speedup_throughput:>6.2f}{' noisy' if c.noisy else ''}")
    return lines + [""]


def summary_text(r: JobRecord) -> str:
    """The report for people: blocks, ranks, block speeds, then plan, accuracy, size, speed,
    energy and time."""
    head = [f"hpc_bkd report: {r.config.model.arch} on {r.config.data.dataset}, "
            f"{r.world_size} rank(s), run dir {r.run_dir}", ""]
    return "\n".join(head + _block_lines(r) + [""] + _rank_lines(r) + [""] + _selection_lines(r) + _speed_lines(r)
                     + _outcome_lines(r))


def write_report(record: JobRecord, run_dir: RunDir) -> None:
    """report.json, summary.txt and gantt.png (a plot must never cost the results)."""
    atomic_io.write_json(run_dir.report, record.to_json())
    text = summary_text(record)
    atomic_io.write_text(run_dir.summary, text + "\n")
    try:
        gantt(record, run_dir.gantt)
        if record.selection is not None:
            pareto_plot(record, run_dir.pareto)
    except Exception as exc:
        log.warning("could not draw %s: %s", "the plots", exc)
    print(text, flush=True)
    log.info("report: %s, %s, %s", run_dir.report, run_dir.summary, run_dir.gantt)
