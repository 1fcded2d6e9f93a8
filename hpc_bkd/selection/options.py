"""Choosing the student: per block, the teacher's own block or one of its trained candidates.

``select.method: tolerance`` is the paper's rule (one candidate; a block's student is kept when its
swapped validation accuracy stays within ``distill.accept_tolerance`` of the teacher's).

``select.method: budget`` chooses with numbers, as Puzzle and DONNA do for other model families:
every option is measured alone in deploy form on this device (latency at each
``select.latency_batches``, params, MACs), each trained unit brings its quality score from
distillation (the KL divergence of the teacher's logits from those of the teacher with only that
unit swapped in), and the choice is a multiple-choice knapsack solved exactly (``solver.solve``).
The whole model is predicted additively: the teacher's cost outside its blocks (stem, pooling,
classifier: the whole teacher measured, minus its blocks) plus the chosen blocks. Every latency of a
batch size is taken in one memory layout, the one the whole teacher runs fastest in, so the blocks
add up to a model that could really run that way; the assembled student is then measured whole and
reported beside the prediction (``check_prediction``).
"""
from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from hpc_bkd.blocks.candidates import TEACHER, Candidate, Unit
from hpc_bkd.blocks.students import build_candidate
from hpc_bkd.blocks.surgery import BlockSpec, BlockTap, SwappedForward, total_macs
from hpc_bkd.config import ConfigError, SelectConfig
from hpc_bkd.data.batches import Data, eval_batches
from hpc_bkd.deploy.form import deploy_form, latency_table, teacher_block
from hpc_bkd.deploy.runtimes import FP32, INT8, Prepared, SelectionRuntime, TorchRuntime, make_runtime
from hpc_bkd.distill.distiller import BlockResult
from hpc_bkd.selection.rules import accept_blocks
from hpc_bkd.selection.solver import Infeasible, Option, Problem, Solution, pareto_front, solve, tightest_fraction
from hpc_bkd.store.records import (
    KL,
    CostVector,
    FrontPointRecord,
    OptionRecord,
    SelectionRecord,
    kl_key,
    latency_batch,
    latency_key,
)

log = logging.getLogger("hpc_bkd")

REST = "rest"  # the pseudo-block of the teacher's layers outside every block: one option, always taken


class BudgetError(ConfigError):
    """No choice of students meets ``select.budget``; the message gives the tightest one that can
    be met (every trained unit is kept: a re-run with that budget only chooses)."""


@dataclass(frozen=True)
class Choice:
    """The chosen unit per replaced block (a block absent keeps the teacher's), and how."""

    units: dict[int, int]
    selection: SelectionRecord | None = None
    precisions: dict[int, str] = field(default_factory=dict)  # block -> int8 where the choice quantizes it


@dataclass(frozen=True)
class TrainedUnits:
    """What a choice is made from: the teacher, its blocks, the job's units and their results,
    and where the student will run (the device and threads its options are timed on)."""

    teacher: nn.Module
    blocks: Sequence[BlockSpec]
    units: Sequence[Unit]
    results: dict[int, BlockResult]
    teacher_val_acc: float
    input_shape: Sequence[int]
    seed: int
    device: torch.device
    threads: int
    data: Data | None = None       # for int8 options: calibration (training) and scores (validation)
    eval_batch_size: int = 256


class ToleranceRule:
    """The paper's rule: one candidate; a block's student is kept when its swapped validation
    accuracy is within ``distill.accept_tolerance`` points of the teacher's."""

    def __init__(self, tolerance: float) -> None:
        self.tolerance = tolerance

    def choose(self, t: TrainedUnits) -> Choice:
        by_block = {t.units[u].block: u for u in t.results}
        accepted = accept_blocks({b: t.results[u].swapped_val_acc for b, u in by_block.items()}, t.teacher_val_acc,
                                 self.tolerance)
        return Choice({b: by_block[b] for b in accepted})


class BudgetChoice:
    """Per block the teacher's block or a candidate, chosen exactly under ``select``'s budget from
    every option measured alone (see the module's docstring)."""

    def __init__(self, cfg: SelectConfig) -> None:
        self.cfg = cfg

    def choose(self, t: TrainedUnits) -> Choice:
        t0 = time.perf_counter()
        c = self.cfg
        with tempfile.TemporaryDirectory(prefix="hpc_bkd_options_") as tmp:  # the options' ONNX files
            runtime = make_runtime(c.runtime, t.device, t.threads, Path(tmp), c.calibration)
            measured = measure_options(t, list(c.latency_batches), runtime, c.precisions, c.calibration_images)
        selection = choose_within_budget(self.cfg, measured, time.perf_counter() - t0)
        for line in describe_selection(selection):
            log.info("%s", line)
        chosen = [o for o in selection.options if o.chosen]
        return Choice({o.block: o.unit for o in chosen if o.unit is not None}, selection,
                      {o.block: o.precision for o in chosen if o.precision != FP32})


def choose_students(cfg: SelectConfig, tolerance: float, trained: TrainedUnits) -> Choice:
    """The student's blocks, by ``select.method``."""
    rule = ToleranceRule(tolerance) if cfg.method == "tolerance" else BudgetChoice(cfg)
    return rule.choose(trained)


# ------------------------------------------------------------------------------ measuring options


@dataclass(frozen=True)
class MeasuredOptions:
    """Every block's options measured alone, the whole teacher and its cost outside the blocks."""

    options: list[list[OptionRecord]]
    teacher: dict[str, float]
    rest: dict[str, float]
    layouts: dict[str, str]
    runtime: str = "torch"
    precisions: tuple[str, ...] = (FP32,)
    # with int8: per block k >= 1, the milliseconds per batch key of switching from fp32 (block
    # k - 1) to int8 (block k) inside the model (``_minus_conversions``); see ``_int8_suffix``
    switches: list[dict[str, float] | None] = field(default_factory=list)  # None: no switch there


def _values(latency: dict[str, float], params: int, macs: int, kl: float = 0.0) -> dict[str, float]:
    return CostVector(kl, {int(b): v for b, v in latency.items()}, params, macs).values()


def option_values(o: OptionRecord) -> dict[str, float]:
    return _values(o.latency_ms, o.params, o.macs, o.kl)


def _fp32_row(t: TrainedUnits, spec: BlockSpec) -> tuple[list[Unit | None], list[nn.Module], list[tuple[int, int]]]:
    """A block's fp32 options (the teacher's block, then its trained candidates in the config's
    order) in deploy form, with their params and MACs."""
    units: list[Unit | None] = [None]
    modules: list[nn.Module] = [teacher_block(t.teacher, spec)]
    for u in (u for u in t.units if u.block == spec.index and u.id in t.results):
        student = build_candidate(spec, Candidate.parse(u.candidate), t.seed, t.teacher)
        student.load_state_dict(t.results[u.id].state_dict)
        units.append(u)
        modules.append(student.eval())
    deployed = [deploy_form(m) for m in modules]
    return units, deployed, [_size(m, spec.in_shape, deployed=True) for m in deployed]


def _size(model: nn.Module, shape: Sequence[int], deployed: bool = False) -> tuple[int, int]:
    """Params and MACs of ``model``'s deploy form (BatchNorm folded): what ships (``deployed``:
    ``model`` is in deploy form already)."""
    deployed_model = model if deployed else deploy_form(model)
    return sum(p.numel() for p in deployed_model.parameters()), total_macs(deployed_model, shape)


def measure_options(t: TrainedUnits, batches: Sequence[int], runtime: SelectionRuntime | None = None,
                    precisions: Sequence[str] = (FP32,), calibration_images: int = 256) -> MeasuredOptions:
    """Each block's options (the teacher's block first, then its trained candidates in the
    config's order; with int8, then each of those quantized), measured alone in ``runtime``
    (default: PyTorch eager on the job's device, in the layout the whole teacher prefers), in the
    same interleaved rounds as the whole teacher."""
    runtime = runtime or TorchRuntime(t.device, t.threads)
    t0 = time.perf_counter()
    whole = runtime.prepare(t.teacher, t.input_shape, "teacher")
    layouts = runtime.layouts(whole, batches)
    items, rows, sizes = [whole], [], [_size(t.teacher, t.input_shape)]
    int8 = INT8 in precisions
    calibration = block_inputs(t, calibration_images) if int8 else {}
    built = [(spec, *_fp32_row(t, spec)) for spec in t.blocks]
    fp32 = runtime.prepare_rows([(spec.in_shape, [(m, f"block{spec.index}-{u.candidate if u else TEACHER}")
                                                  for m, u in zip(modules, units)])
                                 for spec, units, modules, _ in built])
    # every option again, quantized on the block's real inputs (one calibration for all)
    quantized = runtime.quantize_rows(fp32, [calibration[spec.index] for spec in t.blocks]) if int8 else []
    for k, (spec, units, _, size) in enumerate(built):
        prepared, precision = list(fp32[k]), [FP32] * len(units)
        if int8:  # fp32 first wins a tie
            prepared += quantized[k]
            units, size, precision = units * 2, size * 2, precision + [INT8] * len(precision)
        items += prepared
        sizes += size
        rows.append((spec, units, precision, prepared))
    calibration.clear()
    t1 = time.perf_counter()
    calls = runtime.call_items([spec.in_shape for spec in t.blocks])
    table = runtime.latency_table(items + calls, layouts)
    alone = _minus_calls(table[:len(items)], items, table[len(items):], calls)
    in_model, switches = _minus_conversions(alone, [prep for _, _, _, prep in rows], runtime, batches)
    # a switch where something between two blocks changes the activation's shape (pooling) is not
    # offered: ONNX Runtime moves the quantization above the pooling and runs that pooling in int8
    # NCHW (the default job: 2.5 ms at batch 64 for a 0.06 ms fp32 max-pool, 45 % of that
    # student); between int8 blocks pooling runs in int8 NHWC and is cheap
    offered: list[dict[str, float] | None] = [sw if t.blocks[k].out_shape == t.blocks[k + 1].in_shape else None
                                              for k, sw in enumerate(switches)]
    latency = iter(in_model)
    t2 = time.perf_counter()
    scores = int8_scores(t, runtime, [(spec.index, p) for spec, _, _, prep in rows for p in prep
                                      if p.precision == INT8]) if int8 else {}
    log.info("selection: %d options in %s (%s): prepared in %.1fs%s, timed in %.1fs%s", len(items) - 1,
             runtime.name, "/".join(precisions), t1 - t0, " (exported, int8 calibrated)" if int8 else "", t2 - t1,
             f", int8 scored in {time.perf_counter() - t2:.1f}s" if int8 else "")
    t_lat, size_it = next(latency), iter(sizes)
    t_params, t_macs = next(size_it)
    options = [[_option(spec, u, t.results, next(latency), *next(size_it), prec, scores.get(p.name))
                for u, prec, p in zip(units, precision, prep)] for spec, units, precision, prep in rows]
    measured = _with_rest(options, _values(t_lat, t_params, t_macs), {str(b): v for b, v in layouts.items()})
    return replace(measured, runtime=runtime.name, precisions=tuple(precisions), switches=offered if int8 else [])


def _minus_calls(table: list[dict[str, float]], items: Sequence[Prepared], call_table: list[dict[str, float]],
                 calls: Sequence[Prepared]) -> list[dict[str, float]]:
    """Each block's time without the cost of calling it alone (``SelectionRuntime.call_items``);
    the whole teacher (first item) keeps its own. Never below 1 % of the raw figure."""
    by_shape = {c.shape: row for c, row in zip(calls, call_table)}
    out = [table[0]]
    for p, row in zip(items[1:], table[1:]):
        call = by_shape.get(p.shape, {})
        out.append({b: max(v - call.get(b, 0.0), 0.01 * v) for b, v in row.items()})
    return out


def _minus_conversions(table: list[dict[str, float]], rows: Sequence[Sequence[Prepared]], runtime: SelectionRuntime,
                       batches: Sequence[int]) -> tuple[list[dict[str, float]], list[dict[str, float]]]:
    """Each option's time as inside a whole model between blocks of its own precision: without
    the layout and precision conversions it pays at its edges when run alone
    (``SelectionRuntime.conversions``). Those depend on the block's edge shapes and the option's
    precision, not on the option: per block and precision its first option (the teacher's
    block) is profiled, the conversions' share of its time turned into milliseconds of its timed
    figure, and those milliseconds taken off every option of that precision. Never below 1 % of
    the figure alone; the whole teacher (first row of ``table``) keeps its own.

    Also returned, per block k >= 1: what a switch from fp32 (block k - 1) to int8 (block k)
    costs inside the model: the output-edge conversions of block k - 1 in fp32 and the input-edge
    ones of block k in int8 (see ``_int8_suffix``)."""
    flat = [p for row in rows for p in row]
    timed = dict(zip((p.name for p in flat), table[1:]))
    refs: dict[tuple[int, str], Prepared] = {}
    for k, row in enumerate(rows):
        for p in row:
            refs.setdefault((k, p.precision), p)
    keys = list(refs)
    shares = dict(zip(keys, runtime.conversions([refs[k] for k in keys], batches)))
    conv = {key: {b: share.get(b, 0.0) * timed[refs[key].name][b] for b in timed[refs[key].name]}
            for key, share in shares.items()}
    edge_in = {key: {b: share.get(f"in@{b}", 0.0) * timed[refs[key].name][b] for b in timed[refs[key].name]}
               for key, share in shares.items()}
    out = [table[0]]
    for k, row in enumerate(rows):
        for p in row:
            c = conv[(k, p.precision)]
            out.append({b: max(v - c.get(b, 0.0), 0.01 * v) for b, v in timed[p.name].items()})
    switches = []
    for k in range(1, len(rows)):
        if (k - 1, FP32) in conv and (k, INT8) in conv:
            before, after = (k - 1, FP32), (k, INT8)
            switches.append({b: conv[before][b] - edge_in[before][b] + edge_in[after][b] for b in conv[after]})
    return out, switches


def block_inputs(t: TrainedUnits, images: int) -> dict[int, list[np.ndarray]]:
    """Per block, its real inputs for int8 calibration: the teacher's prefix run on the first
    ``images`` training images (normalised as for evaluation), as batches of numpy arrays."""
    if t.data is None:
        raise ValueError("int8 options need the job's data to calibrate on")
    tap = BlockTap(t.teacher.eval(), t.blocks)
    out: dict[int, list[np.ndarray]] = {b.index: [] for b in t.blocks}
    n = min(images, len(t.data.train))
    for x, _ in eval_batches(t.data, t.data.train, min(32, n), range(0, n)):
        for i, (inp, _) in tap(x.to(t.device)).items():
            out[i].append(inp.float().cpu().numpy())
    return out


@torch.no_grad()
def int8_scores(t: TrainedUnits, runtime: SelectionRuntime, options: Sequence[tuple[int, Prepared]]
                ) -> dict[str, tuple[float, float]]:
    """Per int8 option (by name), the teacher's validation accuracy and KL(teacher || teacher
    with only that block swapped for it): the same score distillation gives an fp32 candidate,
    with the quantized block run in the runtime it is timed in (an ONNX Runtime session inside
    the teacher's forward, see ``deploy_runtime.OrtModule``), so the score is that of the int8
    file and not of a simulation of it. One pass: the teacher prefix is shared (``SwappedForward``)."""
    if t.data is None:
        raise ValueError("int8 options need the job's data to score on")
    swaps = [(block, runtime.module(p)) for block, p in options]
    forward = SwappedForward(t.teacher.eval(), t.blocks)
    sums = np.zeros((len(swaps), 2))
    count = 0
    for x, y in eval_batches(t.data, t.data.val, t.eval_batch_size):
        x = x.to(t.device)
        reference = F.log_softmax(t.teacher(x).float(), 1)
        for j, logits in enumerate(forward.run(x, swaps)):
            sums[j, 0] += float((logits.argmax(1).cpu() == y).sum())
            sums[j, 1] += float(F.kl_div(F.log_softmax(logits.float(), 1), reference, log_target=True,
                                         reduction="sum"))
        count += len(y)
    count = max(count, 1)
    return {p.name: (100.0 * sums[j, 0] / count, max(sums[j, 1] / count, 0.0))
            for j, (_, p) in enumerate(options)}


def _option(spec: BlockSpec, unit: Unit | None, results: dict[int, BlockResult], latency: dict[str, float],
            params: int, macs: int, precision: str = FP32, score: tuple[float, float] | None = None) -> OptionRecord:
    """One option's record; ``score``: (swapped accuracy, KL) measured here (int8 options), else
    the distillation's (a candidate) or none (the teacher's own fp32 block: KL 0)."""
    name = unit.candidate if unit is not None else TEACHER
    if score is not None:
        return OptionRecord(spec.index, name, unit.id if unit else None, score[1], score[0], latency, params, macs,
                            False, precision)
    if unit is None:
        return OptionRecord(spec.index, TEACHER, None, 0.0, None, latency, params, macs, False)
    r = results[unit.id]
    if r.swapped_val_kl is None:
        raise ValueError(f"unit {unit.key} has no quality score (trained by an older version): delete its file "
                         "under blocks/ to train it again")
    return OptionRecord(spec.index, unit.candidate, unit.id, r.swapped_val_kl, r.swapped_val_acc, latency, params,
                        macs, False)


def _with_rest(options: list[list[OptionRecord]], teacher: dict[str, float], layouts: dict[str, str]
               ) -> MeasuredOptions:
    """The teacher's cost outside its blocks: the whole minus its blocks. Where timing noise makes
    the parts outweigh the whole, the whole is taken as their sum (so keeping every teacher block
    still meets a budget of 1.0) and the log says so."""
    summed = {k: sum(option_values(row[0])[k] for row in options) for k in teacher}
    teacher = dict(teacher)
    for k in (k for k in teacher if summed[k] > teacher[k]):
        log.warning("selection: the teacher's blocks measured alone take longer (%s %.4g) than the whole teacher "
                    "(%.4g): noisy timings (another load on this machine?); taking their sum as the teacher's",
                    k, summed[k], teacher[k])
        teacher[k] = summed[k]
    return MeasuredOptions(options, teacher, {k: teacher[k] - summed[k] for k in teacher}, layouts)


def fp32_only(m: MeasuredOptions) -> MeasuredOptions:
    """The same measurements with the int8 options left out: the front without int8."""
    return replace(m, options=[[o for o in row if o.precision == FP32] for row in m.options], precisions=(FP32,))


# ------------------------------------------------------------------------------ the choice


def cost_keys(s: SelectConfig) -> list[str]:
    """The summed values ``select.metric`` budgets or minimises."""
    if s.metric == "latency":
        return [latency_key(b) for b in s.latency_batches]
    return [s.metric]


def problem_for(s: SelectConfig, m: MeasuredOptions, with_limits: bool = True) -> Problem:
    """The knapsack: one option per block plus the rest of the teacher, for ``select``'s
    objective (``with_limits=False``: no budget, for the tightest budget and the front)."""
    keys = cost_keys(s)
    blocks = [[Option(o.label, option_values(o)) for o in row] for row in m.options]
    blocks.append([Option(REST, dict(m.rest))])
    if s.objective == "quality":
        limits = {k: s.budget * m.teacher[k] if s.budget_unit == "fraction" else s.budget for k in keys}
        return Problem(blocks, {KL: 1.0}, limits if with_limits else {})
    # the least KL among the choices whose largest cost fraction is least (see ``solve_for``)
    return Problem(blocks, {KL: 1.0}, {KL: s.budget} if with_limits else {})


def solve_for(s: SelectConfig, problem: Problem, m: MeasuredOptions) -> Solution:
    """quality: the least summed KL within the cost budget. cost: the fastest (or smallest) student
    within the KL budget, as the smallest largest fraction of the teacher's cost over the batch
    sizes (a sum could trade one batch size for another; this never makes any slower than the
    teacher, which always fits), ties to the least KL."""
    if s.objective == "quality":
        return solve(problem)
    return tightest_fraction(problem, {k: m.teacher[k] for k in cost_keys(s)})[1]


def _budget_error(s: SelectConfig, m: MeasuredOptions, exc: Infeasible) -> BudgetError:
    keys = cost_keys(s)
    if s.objective == "cost":
        return BudgetError(f"select.budget {s.budget:g}: {exc}; every trained unit is saved: re-run with a "
                           "larger select.budget to choose without training")
    tight, _ = tightest_fraction(problem_for(s, m, with_limits=False), {k: m.teacher[k] for k in keys})
    needed = (f"{tight:.3f}" if s.budget_unit == "fraction"
              else ", ".join(f"{k} {tight * m.teacher[k]:.4g}" for k in keys))
    return BudgetError(f"select.budget {s.budget:g} ({s.budget_unit} of the teacher's {s.metric}) cannot be met: "
                       f"the tightest feasible budget is {needed}; every trained unit is saved: re-run with "
                       f"select.budget of at least that to choose without training")


def _int8_suffix(s: SelectConfig, m: MeasuredOptions) -> Solution:
    """With int8 options: the exact choice among those whose int8 blocks form one run to the end
    of the network (blocks 0..k-1 fp32, k..n-1 int8, for every k), each run's cost including the
    one precision switch it makes (``MeasuredOptions.switches``). A switch costs a conversion of
    the whole activation (the default job: ~0.3 ms at batch 64 after its first block), which no
    per-block sum can see: a choice free to alternate fp32 and int8 picked an fp32 block between
    int8 ones because it looked cheap alone and was slower in the model. The first blocks (few
    channels, large images) are where fp32 is kept, so the run to the end loses little."""
    n = len(m.options)
    best: tuple[tuple[float, float], Solution, int] | None = None
    last: Infeasible | None = None
    for k in range(n + 1):
        rows = [[o for o in row if o.precision == (FP32 if b < k else INT8)] for b, row in enumerate(m.options)]
        switch = m.switches[k - 1] if 0 < k < n else {}
        if switch is None:
            continue
        rest = {key: v + switch.get(str(batch), 0.0) if (batch := latency_batch(key)) is not None else v
                for key, v in m.rest.items()}
        restricted = replace(m, options=rows, rest=rest)
        try:
            solution = solve_for(s, problem_for(s, restricted), restricted)
        except Infeasible as exc:
            last = exc
            continue
        rank = ((solution.totals[KL], 0.0) if s.objective == "quality" else
                (max(solution.totals[key] / m.teacher[key] for key in cost_keys(s)), solution.totals[KL]))
        if best is None or rank < best[0]:
            index = [[j for j, o in enumerate(row) if o.precision == (FP32 if b < k else INT8)]
                     for b, row in enumerate(m.options)]
            choice = [index[b][c] for b, c in enumerate(solution.choice[:n])] + solution.choice[n:]
            best = (rank, replace(solution, choice=choice), k)
    if best is None:
        assert last is not None
        raise last
    if 0 < best[2] < n:
        log.info("selection: fp32 up to block %d, int8 from there on (one precision switch)", best[2] - 1)
    return best[1]


def choose_within_budget(s: SelectConfig, m: MeasuredOptions, measure_s: float = 0.0) -> SelectionRecord:
    """The exact choice under the budget, and the quality/cost front around it (with int8, among
    the choices whose int8 blocks run to the end of the network, see ``_int8_suffix``)."""
    problem = problem_for(s, m)
    try:
        solution = _int8_suffix(s, m) if INT8 in m.precisions and m.switches else solve_for(s, problem, m)
    except Infeasible as exc:
        raise _budget_error(s, m, exc) from None
    keys = cost_keys(s)
    reference = {k: m.teacher[k] for k in keys}
    front = pareto_front(problem_for(s, m, with_limits=False), KL, reference)
    front_fp32 = (pareto_front(problem_for(s, fp32_only(m), with_limits=False), KL, reference)
                  if INT8 in m.precisions else [])
    options = [[replace(o, chosen=j == solution.choice[b]) for j, o in enumerate(row)]
               for b, row in enumerate(m.options)]
    return SelectionRecord(
        objective=s.objective, metric=s.metric, budget=s.budget, budget_unit=s.budget_unit,
        limits=dict(problem.limits), layouts=m.layouts, teacher=m.teacher, rest=m.rest,
        options=[o for row in options for o in row],
        chosen=[row[solution.choice[b]].label for b, row in enumerate(m.options)],
        predicted=dict(solution.totals), optimal=solution.optimal,
        front=[FrontPointRecord(p.fraction, p.names[:-1], dict(p.totals)) for p in front], measure_s=measure_s,
        runtime=m.runtime, precisions=list(m.precisions),
        front_fp32=[FrontPointRecord(p.fraction, p.names[:-1], dict(p.totals)) for p in front_fp32])


def describe_selection(s: SelectionRecord) -> list[str]:
    """For people: the budget, the choice per block and the predicted whole-model figures."""
    keys = [k for k in s.teacher if k.startswith("latency") or k in ("params", "macs")]
    ratio = ", ".join(f"{k} {s.predicted[k] / s.teacher[k]:.2f}x the teacher's" for k in keys if s.teacher[k])
    lines = [f"selection ({s.objective} under {s.metric} budget {s.budget:g} {s.budget_unit}, timed in {s.runtime}"
             f"{', optimal' if s.optimal else ''}): predicted summed KL {s.predicted['kl']:.4f}; {ratio}"]
    for o in (o for o in s.options if o.chosen):
        lat = ", ".join(f"{v:.3f} ms@{b}" for b, v in o.latency_ms.items())
        lines.append(f"  block {o.block:2d}: {o.label:<18} KL {o.kl:.4f}  {lat}  {o.params:,} params")
    return lines


# ------------------------------------------------------------------------------ checking the model


@torch.no_grad()
def kl_to_teacher(student: nn.Module, teacher: nn.Module, data: Data, split: str, batch_size: int,
                  device: torch.device) -> float:
    """KL(teacher || student) on ``split``, nats per image: the whole student's quality loss, to
    set beside the sum of its blocks' scores."""
    student.eval()
    teacher.eval()
    total, n = 0.0, 0
    for x, _ in eval_batches(data, getattr(data, split), batch_size):
        x = x.to(device)
        ref = F.log_softmax(teacher(x).float(), 1)
        total += float(F.kl_div(F.log_softmax(student(x).float(), 1), ref, log_target=True, reduction="sum"))
        n += len(x)
    return total / max(n, 1)


def check_prediction(selection: SelectionRecord, student: nn.Module, teacher: nn.Module, input_shape: Sequence[int],
                     kl: dict[str, float], device: torch.device, threads: int, blocks: Sequence[BlockSpec] = (),
                     precisions: dict[int, str] | None = None, data: Data | None = None,
                     select_cfg: SelectConfig | None = None) -> SelectionRecord:
    """The assembled student measured whole beside the prediction, in the runtime its options
    were timed in (same layouts), with the whole teacher timed again in the same rounds, so the
    speed-up is a like-for-like one. In ONNX Runtime the student is the exported file, its int8
    blocks quantized (``precisions``), and with int8 offered the whole teacher quantized too: the
    baseline "just quantize the teacher" timed beside it."""
    layouts = {int(b): layout for b, layout in selection.layouts.items()}
    if selection.runtime == "onnxruntime":
        got, ref, extra = _check_in_onnxruntime(selection, student, teacher, input_shape, threads, blocks,
                                                precisions or {}, data, select_cfg or SelectConfig())
    else:
        got, ref = latency_table([(deploy_form(student), input_shape), (deploy_form(teacher), input_shape)], layouts,
                                 device, threads)
        extra = {}
    measured = {latency_key(b): v for b, v in got.items()}
    measured.update({latency_key(b, "teacher"): v for b, v in ref.items()})
    measured.update({latency_key(b, "teacher_int8"): v for b, v in extra.items()})
    measured.update({kl_key(k): v for k, v in kl.items()})
    for b in selection.layouts:
        key = latency_key(b)
        log.info("student latency at batch %s (%s): predicted %.3f ms, measured %.3f ms (%+.1f %%); teacher %.3f ms "
                 "(%.2fx)%s", b, selection.runtime, selection.predicted[key], measured[key],
                 100 * (measured[key] / selection.predicted[key] - 1), ref[b], ref[b] / measured[key],
                 f"; int8 teacher {extra[b]:.3f} ms ({extra[b] / measured[key]:.2f}x)" if b in extra else "")
    return replace(selection, measured=measured)


def _check_in_onnxruntime(selection: SelectionRecord, student: nn.Module, teacher: nn.Module,
                          input_shape: Sequence[int], threads: int, blocks: Sequence[BlockSpec],
                          precisions: dict[int, str], data: Data | None, c: SelectConfig
                          ) -> tuple[dict[str, float], dict[str, float], dict[str, float]]:
    """Student (mixed precision), teacher fp32 and (int8 offered) teacher int8 as ONNX files,
    timed in ONNX Runtime in the same interleaved rounds."""
    from hpc_bkd.deploy.runtimes import OnnxRuntime, image_batches

    int8 = [m for b in blocks if precisions.get(b.index) == INT8 for m in b.members]
    fp32 = [m for b in blocks if precisions.get(b.index) != INT8 for m in b.members]
    calibration = image_batches(data, c.calibration_images) if data is not None and (
        int8 or INT8 in selection.precisions) else []
    with tempfile.TemporaryDirectory(prefix="hpc_bkd_check_") as tmp:
        rt = OnnxRuntime(threads, Path(tmp), c.calibration)
        s = rt.prepare(student, input_shape, "student")
        items = [rt.quantize_blocks(s, int8, calibration, fp32) if int8 else s, rt.prepare(teacher, input_shape, "teacher")]
        if INT8 in selection.precisions and calibration:
            items.append(rt.quantize(items[1], calibration))
        table = rt.latency_table(items, {int(b): v for b, v in selection.layouts.items()})
    return table[0], table[1], table[2] if len(table) > 2 else {}


__all__ = ["BudgetError", "Choice", "TrainedUnits", "choose_students", "check_prediction", "kl_to_teacher",
           "REST"]
