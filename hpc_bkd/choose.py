"""Choosing the student: per block, the teacher's own block or one of its trained candidates.

``select.method: tolerance`` is the paper's rule (one candidate; a block's student is kept when its
swapped validation accuracy stays within ``distill.accept_tolerance`` of the teacher's).

``select.method: budget`` chooses with numbers, as Puzzle and DONNA do for other model families:
every option is measured alone in deploy form on this device (latency at each
``select.latency_batches``, params, MACs), each trained unit brings its quality score from
distillation (the KL divergence of the teacher's logits from those of the teacher with only that
unit swapped in), and the choice is a multiple-choice knapsack solved exactly (``select.solve``).
The whole model is predicted additively: the teacher's cost outside its blocks (stem, pooling,
classifier: the whole teacher measured, minus its blocks) plus the chosen blocks. Every latency of a
batch size is taken in one memory layout, the one the whole teacher runs fastest in, so the blocks
add up to a model that could really run that way; the assembled student is then measured whole and
reported beside the prediction (``check_prediction``).
"""
from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from .candidates import TEACHER, Candidate, Unit
from .config import ConfigError, SelectConfig
from .data import Data, eval_batches
from .deploy import deploy_form, fastest_layout, latency_table, teacher_block
from .distill import BlockResult
from .finetune import accept_blocks
from .records import FrontPointRecord, OptionRecord, SelectionRecord
from .select import Infeasible, Option, Problem, Solution, pareto_front, solve, tightest_fraction
from .students import build_candidate
from .surgery import BlockSpec, total_macs

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
        measured = measure_options(t, list(self.cfg.latency_batches))
        selection = select(self.cfg, measured, time.perf_counter() - t0)
        for line in describe_selection(selection):
            log.info("%s", line)
        return Choice({o.block: o.unit for o in selection.options if o.chosen and o.unit is not None}, selection)


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


def _values(latency: dict[str, float], params: int, macs: int, kl: float = 0.0) -> dict[str, float]:
    return {"kl": kl, **{f"latency_ms@{b}": v for b, v in latency.items()}, "params": float(params),
            "macs": float(macs)}


def option_values(o: OptionRecord) -> dict[str, float]:
    return _values(o.latency_ms, o.params, o.macs, o.kl)


def measure_options(t: TrainedUnits, batches: Sequence[int]) -> MeasuredOptions:
    """Each block's options (the teacher's block first, then its trained candidates in the
    config's order), measured alone on the job's device in the layout the whole teacher prefers,
    in the same interleaved rounds as the whole teacher (``deploy.latency_table``)."""
    whole = deploy_form(t.teacher)
    layouts = {b: fastest_layout(whole, t.input_shape, b, t.device, t.threads) for b in batches}
    items: list[tuple[nn.Module, Sequence[int]]] = [(whole, t.input_shape)]
    rows: list[list[tuple[BlockSpec, Unit | None]]] = []
    for spec in t.blocks:
        row: list[tuple[BlockSpec, Unit | None]] = [(spec, None)]
        items.append((deploy_form(teacher_block(t.teacher, spec)), spec.in_shape))
        for u in (u for u in t.units if u.block == spec.index and u.id in t.results):
            student = build_candidate(spec, Candidate.parse(u.candidate), t.seed, t.teacher)
            student.load_state_dict(t.results[u.id].state_dict)
            items.append((deploy_form(student), spec.in_shape))
            row.append((spec, u))
        rows.append(row)
    latency = iter(latency_table(items, layouts, t.device, t.threads))
    sizes = iter([(sum(p.numel() for p in m.parameters()), total_macs(m, shape)) for m, shape in items])
    t_lat, (t_params, t_macs) = next(latency), next(sizes)
    options = [[_option(spec, u, t.results, next(latency), *next(sizes)) for spec, u in row] for row in rows]
    return _with_rest(options, _values(t_lat, t_params, t_macs), {str(b): v for b, v in layouts.items()})


def _option(spec: BlockSpec, unit: Unit | None, results: dict[int, BlockResult], latency: dict[str, float],
            params: int, macs: int) -> OptionRecord:
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


# ------------------------------------------------------------------------------ the choice


def cost_keys(s: SelectConfig) -> list[str]:
    """The summed values ``select.metric`` budgets or minimises."""
    if s.metric == "latency":
        return [f"latency_ms@{b}" for b in s.latency_batches]
    return [s.metric]


def problem_for(s: SelectConfig, m: MeasuredOptions, with_limits: bool = True) -> Problem:
    """The knapsack: one option per block plus the rest of the teacher, for ``select``'s
    objective (``with_limits=False``: no budget, for the tightest budget and the front)."""
    keys = cost_keys(s)
    blocks = [[Option(o.name, option_values(o)) for o in row] for row in m.options]
    blocks.append([Option(REST, dict(m.rest))])
    if s.objective == "quality":
        limits = {k: s.budget * m.teacher[k] if s.budget_unit == "fraction" else s.budget for k in keys}
        return Problem(blocks, {"kl": 1.0}, limits if with_limits else {})
    # the least KL among the choices whose largest cost fraction is least (see ``solve_for``)
    return Problem(blocks, {"kl": 1.0}, {"kl": s.budget} if with_limits else {})


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


def select(s: SelectConfig, m: MeasuredOptions, measure_s: float = 0.0) -> SelectionRecord:
    """The exact choice under the budget, and the quality/cost front around it."""
    problem = problem_for(s, m)
    try:
        solution = solve_for(s, problem, m)
    except Infeasible as exc:
        raise _budget_error(s, m, exc) from None
    keys = cost_keys(s)
    front = pareto_front(problem_for(s, m, with_limits=False), "kl", {k: m.teacher[k] for k in keys})
    options = [[replace(o, chosen=j == solution.choice[b]) for j, o in enumerate(row)]
               for b, row in enumerate(m.options)]
    return SelectionRecord(
        objective=s.objective, metric=s.metric, budget=s.budget, budget_unit=s.budget_unit,
        limits=dict(problem.limits), layouts=m.layouts, teacher=m.teacher, rest=m.rest,
        options=[o for row in options for o in row],
        chosen=[row[solution.choice[b]].name for b, row in enumerate(m.options)],
        predicted=dict(solution.totals), optimal=solution.optimal,
        front=[FrontPointRecord(p.fraction, p.names[:-1], dict(p.totals)) for p in front], measure_s=measure_s)


def describe_selection(s: SelectionRecord) -> list[str]:
    """For people: the budget, the choice per block and the predicted whole-model figures."""
    keys = [k for k in s.teacher if k.startswith("latency") or k in ("params", "macs")]
    ratio = ", ".join(f"{k} {s.predicted[k] / s.teacher[k]:.2f}x the teacher's" for k in keys if s.teacher[k])
    lines = [f"selection ({s.objective} under {s.metric} budget {s.budget:g} {s.budget_unit}"
             f"{', optimal' if s.optimal else ''}): predicted summed KL {s.predicted['kl']:.4f}; {ratio}"]
    for o in (o for o in s.options if o.chosen):
        lat = ", ".join(f"{v:.3f} ms@{b}" for b, v in o.latency_ms.items())
        lines.append(f"  block {o.block:2d}: {o.name:<18} KL {o.kl:.4f}  {lat}  {o.params:,} params")
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
                     kl: dict[str, float], device: torch.device, threads: int) -> SelectionRecord:
    """The assembled student measured whole beside the prediction (same layouts as its blocks),
    with the whole teacher timed again in the same rounds, so the speed-up is a like-for-like one."""
    layouts = {int(b): layout for b, layout in selection.layouts.items()}
    got, ref = latency_table([(deploy_form(student), input_shape), (deploy_form(teacher), input_shape)], layouts,
                             device, threads)
    measured = {f"latency_ms@{b}": v for b, v in got.items()}
    measured.update({f"teacher_latency_ms@{b}": v for b, v in ref.items()})
    measured.update({f"kl_{k}": v for k, v in kl.items()})
    for b in selection.layouts:
        key = f"latency_ms@{b}"
        log.info("student latency at batch %s: predicted %.3f ms, measured %.3f ms (%+.1f %%); teacher %.3f ms "
                 "(%.2fx)", b, selection.predicted[key], measured[key],
                 100 * (measured[key] / selection.predicted[key] - 1), ref[b], ref[b] / measured[key])
    return replace(selection, measured=measured)


__all__ = ["BudgetError", "Choice", "TrainedUnits", "choose_students", "check_prediction", "kl_to_teacher",
           "REST"]
