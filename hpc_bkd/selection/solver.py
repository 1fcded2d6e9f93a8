"""The exact choice of one option per block: which trained student, or the teacher's own block,
each block of the compressed network keeps.

Every block b has options o (index 0: the teacher's block, quality loss 0; then the student
candidates), each with measured values v[b, o, k] such as "kl" (nats per image), "latency_ms@1",
"latency_ms@64", "params" and "macs". Picking one option per block to minimise a weighted sum of
values under upper limits on other sums is a multiple-choice knapsack: NP-hard in general, but tiny
here (tens of blocks, a handful of options), so it is solved exactly as a MILP over binaries
x[b, o] by HiGHS (``scipy.optimize.milp``):

    minimise    sum_{b,o} (sum_k w_k v[b,o,k]) x[b,o]
    subject to  sum_o x[b,o] = 1                                  for every block b
                sum_{b,o} v[b,o,k] x[b,o] <= L_k + RTOL |L_k|     for every limit k

Exact, not just on HiGHS's word: HiGHS runs with no optimality gap, and every choice it returns is
checked again here in exact sums (``math.fsum``) against the limits with the relative tolerance
``RTOL``; one that only meets them within HiGHS's looser feasibility tolerance is cut off and the
MILP solved again. ``RTOL`` is what lets the all-teacher choice meet limits set to its own sums.

Ties are broken by definition, not by solver path: of the choices whose objective is within
``RTOL`` x (the largest objective any choice could have) of the minimum, ``solve`` returns the
lexicographically smallest choice vector (lowest option index in block 0, then block 1, ...), so
the teacher's block wins a tie. ``brute_force`` uses the same rule, so both return the same choice.

Budgets: ``tightest_fraction`` is the least t for which some choice keeps every cost within t x a
reference (the teacher's sums: how far the network can shrink at all), ``pareto_front`` the
least quality loss for budgets from there up to the teacher's own (t = 1).

Torch-free (numpy and scipy only), like ``plan``: the CLI and reports import it without torch.
"""
from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, OptimizeResult, milp  # type: ignore[import-untyped]  # no stubs

from hpc_bkd.errors import UserError

__all__ = ["RTOL", "BRUTE_FORCE_MAX", "Option", "Problem", "Solution", "FrontPoint", "Infeasible", "solve",
           "brute_force", "tightest_fraction", "pareto_front"]

RTOL = 1e-9               # relative slack on every limit, and what counts as a tie of the objective
BRUTE_FORCE_MAX = 200_000  # combinations brute_force enumerates at most
_MAX_CUTS = 100           # choices HiGHS may return that fail the exact check before giving up
# Presolve costs more than it saves on models this small (~6 ms against ~2 ms a solve). The gap
# options make "optimal" mean optimal: HiGHS otherwise stops within 1e-6 of the bound. scipy passes
# mip_abs_gap to HiGHS verbatim, with a warning that it is not one of milp's own options.
_HIGHS_OPTIONS = {"presolve": False, "mip_rel_gap": 0.0, "mip_abs_gap": 0.0}


@dataclass(frozen=True)
class Option:
    """One way to realise a block: the teacher's own block or a trained student candidate."""

    name: str                      # "teacher" or a candidate name such as "separable-d1"
    values: dict[str, float]       # e.g. {"kl": 0.02, "latency_ms@1": 0.05, "params": 1234}


@dataclass(frozen=True)
class Problem:
    """Per block its options (index 0: the teacher's block), the weights of the summed values to
    minimise and upper limits on summed values. Checked on construction, so a bad measurement is
    named where it is, not found as a solver failure."""

    blocks: list[list[Option]]
    minimise: dict[str, float]     # e.g. {"kl": 1.0} or {"latency_ms@1": 1 / T1, "latency_ms@64": 1 / T64}
    limits: dict[str, float]       # value key -> upper bound on its sum over blocks (empty: none)

    def __post_init__(self) -> None:
        _check_problem(self)


@dataclass(frozen=True)
class Solution:
    """The chosen option per block and what it adds up to."""

    choice: list[int]              # chosen option index per block
    objective: float               # the weighted sum minimised
    totals: dict[str, float]       # per key that every chosen option has, its sum over the blocks
    optimal: bool                  # proven optimal (HiGHS said so, or every choice was enumerated)


@dataclass(frozen=True)
class FrontPoint:
    """A choice on the quality/cost trade-off: ``fraction`` is the largest of its summed costs as a
    fraction of the reference (the tightest proportional budget it meets)."""

    fraction: float
    choice: list[int]
    names: list[str]
    totals: dict[str, float]


class Infeasible(UserError, ValueError):
    """No choice of options meets the limits. ``tightest`` holds the least raised limits that some
    choice meets, all raised in the same proportion of themselves (of the teacher's sum where a
    limit is <= 0); with one limit, that is the smallest sum possible. The message says both."""

    def __init__(self, message: str, tightest: dict[str, float]):
        super().__init__(message)
        self.tightest = tightest

    def __reduce__(self) -> tuple[Any, ...]:  # pickles (e.g. over MPI) with its limits
        return (type(self), (str(self), self.tightest))


# -- validation ---------------------------------------------------------------------------------


def _check_problem(problem: Problem) -> None:
    if not problem.blocks:
        raise ValueError("the problem has no blocks")
    for b, options in enumerate(problem.blocks):
        if not options:
            raise ValueError(f"block {b} has no options (it needs at least the teacher's block)")
        for o, option in enumerate(options):
            for key, value in option.values.items():
                if not _is_number(value) or not math.isfinite(value) or value < 0:
                    raise ValueError(f"block {b}, option {o} ({option.name!r}): {key} = {value!r} is not a finite "
                                     "number >= 0")
    for key, weight in problem.minimise.items():
        if not _is_number(weight) or not math.isfinite(weight):
            raise ValueError(f"the weight of {key} to minimise is {weight!r}, not a finite number")
    for key, limit in problem.limits.items():
        if not _is_number(limit) or math.isnan(limit) or limit == -math.inf:
            raise ValueError(f"the limit on {key} is {limit!r}, not a number (inf: no limit)")
    _require_keys(problem, [*problem.minimise, *problem.limits])


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def _require_keys(problem: Problem, keys: Iterable[str]) -> None:
    """Every option must have every key that is minimised or limited: a missing latency counted as
    zero would make the unmeasured option look free."""
    for b, options in enumerate(problem.blocks):
        for o, option in enumerate(options):
            missing = sorted(set(keys) - set(option.values))
            if missing:
                raise ValueError(f"block {b}, option {o} ({option.name!r}) has no value for {', '.join(missing)}")


def _check_reference(problem: Problem, reference: Mapping[str, float]) -> None:
    if not reference:
        raise ValueError("the reference is empty: name at least one cost to compare with")
    for key, value in reference.items():
        if not _is_number(value) or not math.isfinite(value) or value <= 0:
            raise ValueError(f"the reference {key} is {value!r}, not a finite number > 0")
    _require_keys(problem, reference)


# -- exact sums (what the solver's answers are checked with, and brute_force computes) ---------


@dataclass(frozen=True)
class _Row:
    """sum_b coeffs[b][choice[b]] + t_coeff * t <= bound: one linear constraint over the choice
    (and the continuous t of ``_least_relaxation``, if t_coeff is not 0)."""

    coeffs: list[list[float]]
    bound: float
    t_coeff: float = 0.0

    def holds(self, choice: Sequence[int]) -> bool:
        return self.t_coeff != 0.0 or _total(self.coeffs, choice) <= self.bound


def _total(coeffs: list[list[float]], choice: Sequence[int]) -> float:
    return math.fsum(coeffs[b][o] for b, o in enumerate(choice))


def _values(problem: Problem, key: str) -> list[list[float]]:
    return [[float(option.values[key]) for option in options] for options in problem.blocks]


def _objective(problem: Problem) -> list[list[float]]:
    """The weighted value of every option, summed over the keys in sorted order (reproducible)."""
    weights = sorted(problem.minimise.items())
    return [[math.fsum(w * float(option.values[k]) for k, w in weights) for option in options]
            for options in problem.blocks]


def _allowance(limit: float) -> float:
    return limit + RTOL * abs(limit)


def _limit_rows(limits: Mapping[str, float], problem: Problem) -> list[_Row]:
    return [_Row(_values(problem, key), _allowance(limit)) for key, limit in sorted(limits.items())
            if limit != math.inf]


def _tie_tolerance(coeffs: list[list[float]]) -> float:
    return RTOL * math.fsum(max(abs(c) for c in block) for block in coeffs)


def _totals(problem: Problem, choice: Sequence[int]) -> dict[str, float]:
    chosen = [problem.blocks[b][o] for b, o in enumerate(choice)]
    keys = sorted(set.intersection(*(set(option.values) for option in chosen)))
    return {k: math.fsum(float(option.values[k]) for option in chosen) for k in keys}


def _solution(problem: Problem, choice: Sequence[int], optimal: bool) -> Solution:
    return Solution(list(choice), _total(_objective(problem), choice), _totals(problem, choice), optimal)


def _with_limits(limits: Mapping[str, float], extra: Mapping[str, float]) -> dict[str, float]:
    """``limits`` with ``extra`` added; where both limit a key, the lower bound holds."""
    return {**limits, **{k: min(v, limits.get(k, math.inf)) for k, v in extra.items()}}


# -- the MILP ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Found:
    choice: list[int] | None       # None: no choice meets the constraints
    optimal: bool


def _flat(coeffs: list[list[float]]) -> np.ndarray:
    return np.array([c for block in coeffs for c in block], dtype=float)


def _scaled(coeffs: np.ndarray, bound: float) -> tuple[np.ndarray, float]:
    """A row and its bound divided by their largest magnitude: HiGHS's absolute tolerances then
    mean the same for params (1e6) as for latencies (1e-2)."""
    scale = max(float(np.max(np.abs(coeffs), initial=0.0)), abs(bound))
    return (coeffs / scale, bound / scale) if scale > 0 else (coeffs, bound)


def _milp(sizes: list[int], objective: list[list[float]], rows: list[_Row], fixed: Mapping[int, int],
          cuts: list[list[int]], t_cost: float | None) -> OptimizeResult:
    """One HiGHS solve: binaries x[b, o] (block by block), one per block, and a last continuous
    t >= 0 with cost ``t_cost`` if that is given. ``fixed`` pins blocks; ``cuts`` exclude choices."""
    starts = np.cumsum([0, *sizes])
    n, width = int(starts[-1]), int(starts[-1]) + (t_cost is not None)
    c = np.zeros(width)
    c[:n], _ = _scaled(_flat(objective), 0.0)
    if t_cost is not None:
        c[n] = t_cost
    a, upper = np.zeros((len(sizes) + len(rows) + len(cuts), width)), np.empty(len(sizes) + len(rows) + len(cuts))
    lower = np.full_like(upper, -np.inf)
    for b, (start, stop) in enumerate(zip(starts[:-1], starts[1:])):
        a[b, start:stop], lower[b], upper[b] = 1.0, 1.0, 1.0
    for i, row in enumerate(rows, len(sizes)):
        full = np.append(_flat(row.coeffs), [row.t_coeff] if t_cost is not None else [])
        a[i], upper[i] = _scaled(full, row.bound)
    for i, cut in enumerate(cuts, len(sizes) + len(rows)):
        a[i, starts[:-1] + np.asarray(cut)], upper[i] = 1.0, len(sizes) - 1
    lb, ub = np.zeros(width), np.append(np.ones(n), [np.inf] if t_cost is not None else [])
    for b, o in fixed.items():
        ub[starts[b]:starts[b + 1]] = 0.0
        lb[starts[b] + o] = ub[starts[b] + o] = 1.0
    integrality = np.append(np.ones(n), [0] if t_cost is not None else [])
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Unrecognized options", category=RuntimeWarning)
        return milp(c, integrality=integrality, bounds=Bounds(lb, ub), constraints=LinearConstraint(a, lower, upper),
                    options=dict(_HIGHS_OPTIONS))


def _decode(sizes: list[int], x: np.ndarray) -> list[int]:
    starts = np.cumsum([0, *sizes])
    return [int(np.argmax(x[start:stop])) for start, stop in zip(starts[:-1], starts[1:])]


def _search(sizes: list[int], objective: list[list[float]], rows: list[_Row], fixed: Mapping[int, int] | None = None,
            exclude: list[int] | None = None, t_cost: float | None = None) -> _Found:
    """The best choice under ``rows`` by HiGHS, then checked in exact sums: a choice that meets a
    row only within HiGHS's tolerance (1e-6) and not within ``RTOL`` is cut off and HiGHS asked again."""
    cuts = [exclude] if exclude is not None else []
    for _ in range(_MAX_CUTS):
        result = _milp(sizes, objective, rows, fixed or {}, cuts, t_cost)
        if result.status == 2:
            return _Found(None, True)
        if result.x is None:
            raise RuntimeError(f"HiGHS found no choice of options: {result.message}")
        choice = _decode(sizes, result.x)
        if all(row.holds(choice) for row in rows):
            return _Found(choice, result.status == 0)
        cuts.append(choice)
    raise RuntimeError(f"HiGHS returned {_MAX_CUTS} choices that break the limits by more than {RTOL:g}")


def _first_of_ties(sizes: list[int], objective: list[list[float]], rows: list[_Row],
                   best: list[int]) -> tuple[list[int], bool]:
    """Of the choices within the tie tolerance of ``best``'s objective, the lexicographically
    smallest: one MILP proves most optima unique; else each block in turn gets its lowest index."""
    tie = _Row(objective, _total(objective, best) + _tie_tolerance(objective))
    rows = [*rows, tie]
    zero = [[0.0] * n for n in sizes]
    other = _search(sizes, zero, rows, exclude=best)
    if other.choice is None:
        return best, True
    incumbent, optimal = min(best, other.choice), other.optimal
    fixed: dict[int, int] = {}
    for b in range(len(sizes)):
        if incumbent[b] > 0:  # can a lower index in block b still tie, given the blocks before it?
            index = [[float(o) if i == b else 0.0 for o in range(m)] for i, m in enumerate(sizes)]
            found = _search(sizes, index, rows, fixed=fixed)
            if found.choice is None:
                raise RuntimeError("HiGHS lost a tied choice it had found")
            incumbent, optimal = found.choice, optimal and found.optimal
        fixed[b] = incumbent[b]
    return incumbent, optimal


# -- the public solvers ----------------------------------------------------------------------


def _optimum(problem: Problem) -> _Found:
    """The first stage of ``solve``: an optimal choice, before ties are broken."""
    sizes = [len(options) for options in problem.blocks]
    return _search(sizes, _objective(problem), _limit_rows(problem.limits, problem))


def solve(problem: Problem) -> Solution:
    """The choice that minimises the weighted sum under the limits, exactly (HiGHS MILP), ties
    broken towards lower option indices (see the module docstring). Raises ``Infeasible``."""
    found = _optimum(problem)
    if found.choice is None:
        raise _why_not(problem)
    if not found.optimal:
        return _solution(problem, found.choice, False)
    sizes, objective = [len(options) for options in problem.blocks], _objective(problem)
    choice, optimal = _first_of_ties(sizes, objective, _limit_rows(problem.limits, problem), found.choice)
    return _solution(problem, choice, optimal)


def brute_force(problem: Problem) -> Solution:
    """``solve`` by enumerating every combination, with the same limits, sums and tie rule (and
    ``Infeasible`` found the same way): the reference the MILP is tested against. ValueError
    beyond ``BRUTE_FORCE_MAX`` combinations."""
    sizes = [len(options) for options in problem.blocks]
    if math.prod(sizes) > BRUTE_FORCE_MAX:
        raise ValueError(f"{math.prod(sizes)} combinations of options are too many to enumerate "
                         f"(at most {BRUTE_FORCE_MAX}); use solve()")
    every = list(itertools.product(*map(range, sizes)))
    objective, rows = _objective(problem), _limit_rows(problem.limits, problem)
    feasible = [c for c in every if all(row.holds(c) for row in rows)]
    if not feasible:
        base, unit = _relaxation_units(problem)
        raise _infeasible(problem, min(_relaxation(problem, base, unit, c) for c in every))
    sums = [_total(objective, c) for c in feasible]
    least = min(sums)
    first = next(c for c, s in zip(feasible, sums) if s <= least + _tie_tolerance(objective))
    return _solution(problem, first, True)


def _relaxation(problem: Problem, base: Mapping[str, float], unit: Mapping[str, float],
                choice: Sequence[int]) -> float:
    """The least t >= 0 with sum v_k <= base_k + t unit_k for every k in ``base``, for this choice."""
    return max(0.0, *((_total(_values(problem, k), choice) - b) / unit[k] for k, b in base.items()))


def _least_relaxation(problem: Problem, base: Mapping[str, float],
                      unit: Mapping[str, float]) -> tuple[float, list[int], bool] | None:
    """The least t >= 0 for which some choice meets sum v_k <= base_k + t unit_k for every k in
    ``base`` (and the problem's limits), by HiGHS: t exactly, from that choice's sums; None if no
    choice meets the problem's limits."""
    sizes = [len(options) for options in problem.blocks]
    rows = [_Row(_values(problem, k), base[k], -unit[k]) for k in sorted(base)] + _limit_rows(problem.limits, problem)
    found = _search(sizes, [[0.0] * n for n in sizes], rows, t_cost=1.0)
    if found.choice is None:
        return None
    return _relaxation(problem, base, unit, found.choice), found.choice, found.optimal


def tightest_fraction(problem: Problem, reference: dict[str, float]) -> tuple[float, Solution]:
    """The smallest t for which some choice keeps sum v_k <= t reference[k] for every k in
    ``reference`` (and meets the problem's limits): the tightest budget as a fraction of, say,
    the teacher's sums. Returned with the best choice (by ``problem.minimise``) within it."""
    _check_reference(problem, reference)
    least = _least_relaxation(problem, {k: 0.0 for k in reference}, reference)
    if least is None:
        raise _why_not(problem)
    t, _, optimal = least
    best = solve(replace(problem, limits=_with_limits(problem.limits, {k: t * r for k, r in reference.items()})))
    return t, replace(best, optimal=best.optimal and optimal)


def _fraction(totals: Mapping[str, float], reference: Mapping[str, float]) -> float:
    return max(totals[k] / r for k, r in reference.items())


def _least_quality(problem: Problem, quality: str, reference: Mapping[str, float], t: float) -> float:
    """The least ``quality`` sum of a choice within budget t x reference (and the problem's limits)."""
    budget = _with_limits(problem.limits, {k: t * r for k, r in reference.items()})
    found = _optimum(Problem(problem.blocks, {quality: 1.0}, budget))
    if found.choice is None:
        raise _why_not(problem)
    return _total(_values(problem, quality), found.choice)


def _front_point(problem: Problem, quality: str, reference: Mapping[str, float], least: float) -> FrontPoint:
    """The tightest budget that still reaches the ``least`` quality sum, and the best choice
    within it: a point no other choice beats on both."""
    same = Problem(problem.blocks, {quality: 1.0}, _with_limits(problem.limits, {quality: least}))
    _, best = tightest_fraction(same, dict(reference))
    names = [problem.blocks[b][o].name for b, o in enumerate(best.choice)]
    return FrontPoint(_fraction(best.totals, reference), best.choice, names, best.totals)


def pareto_front(problem: Problem, quality: str, reference: dict[str, float], points: int = 12) -> list[FrontPoint]:
    """The trade-off between the summed ``quality`` (e.g. "kl") and cost: budgets t x reference
    for ``points`` fractions t from the tightest feasible one up to 1.0 (with reference = the
    teacher's sums, 1.0 admits the all-teacher choice), for each the least quality sum and then
    the tightest budget that reaches it. Distinct, non-dominated choices (none other is as good
    on both fraction and quality and better on one), by rising fraction and falling quality.
    ``problem.minimise`` is not used; ``problem.limits`` hold throughout."""
    if points < 2:
        raise ValueError(f"a front needs at least 2 points, not {points}")
    _require_keys(problem, [quality])
    start, _ = tightest_fraction(problem, reference)
    found: dict[float, FrontPoint] = {}  # by least quality: budgets that reach the same give the same point
    for t in np.linspace(start, max(start, 1.0), points).tolist():
        least = _least_quality(problem, quality, reference, t)
        if least not in found:
            found[least] = _front_point(problem, quality, reference, least)
    return _non_dominated(list({tuple(p.choice): p for p in found.values()}.values()), quality)


def _non_dominated(front: list[FrontPoint], quality: str) -> list[FrontPoint]:
    kept: list[FrontPoint] = []
    for point in sorted(front, key=lambda p: (p.fraction, p.totals[quality], p.choice)):
        if not kept or point.totals[quality] < kept[-1].totals[quality] * (1 - RTOL):
            kept.append(point)
    return kept


# -- why not ---------------------------------------------------------------------------------


def _unlimited(problem: Problem) -> Problem:
    return replace(problem, limits={})


def _relaxation_units(problem: Problem) -> tuple[dict[str, float], dict[str, float]]:
    """The finite limits, and the unit each is raised in to make them feasible: the limit itself
    (raising all in the same proportion), or the teacher's sum where the limit is <= 0."""
    limits = {k: v for k, v in sorted(problem.limits.items()) if v != math.inf}
    teacher = _totals(problem, [0] * len(problem.blocks))
    return limits, {k: v if v > 0 else (teacher[k] if teacher[k] > 0 else 1.0) for k, v in limits.items()}


def _why_not(problem: Problem) -> Infeasible:
    """``Infeasible`` for a problem whose limits no choice meets, the raise they need by HiGHS."""
    least = _least_relaxation(_unlimited(problem), *_relaxation_units(problem))
    assert least is not None  # without limits of its own, a large enough raise always fits
    return _infeasible(problem, least[0])


def _infeasible(problem: Problem, raised: float) -> Infeasible:
    """Says which limits cannot be met, the least each sum can be on its own and, for several, the
    tightest limits some choice meets: all raised by ``raised`` units (``_relaxation_units``),
    the least that lets one choice meet them all."""
    limits, unit = _relaxation_units(problem)
    teacher = _totals(problem, [0] * len(problem.blocks))
    tightest = {k: v + raised * unit[k] for k, v in limits.items()}
    parts = [_limit_text(problem, k, v, teacher[k]) for k, v in limits.items()]
    message = f"no choice of options meets {' and '.join(parts)}"
    if len(limits) > 1:
        message += "; the tightest limits some choice meets: " + ", ".join(f"{k} <= {v:.4g}" for k, v in tightest.items())
    return Infeasible(message, tightest)


def _limit_text(problem: Problem, key: str, limit: float, teacher: float) -> str:
    smallest = math.fsum(min(float(o.values[key]) for o in options) for options in problem.blocks)
    share = f", {smallest / teacher:.2f} of the teacher's" if teacher > 0 else ""
    return f"{key} <= {limit:.4g} (the smallest possible is {smallest:.4g}{share})"
