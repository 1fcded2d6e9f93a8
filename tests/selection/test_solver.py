"""The exact per-block selection: the MILP against enumeration on random small problems (limits,
weighted sums, infeasible ones), the tightest budget, the quality/cost front, ties, bad input."""
import itertools
import math
import pickle
import random
import subprocess
import sys
from dataclasses import replace

import pytest

from hpc_bkd.selection import solver as select
from hpc_bkd.selection.solver import Infeasible, Option, Problem, brute_force, pareto_front, solve, tightest_fraction

COSTS = ("latency_ms@1", "latency_ms@64", "params", "macs")


def random_problem(rng: random.Random) -> Problem:
    """2-6 blocks of 1-4 options; coarse values on some blocks so that sums tie; 1-3 limits at
    0.45-1.15 of the teacher's sums (some cannot be met); kl, or a weighted sum of two keys."""
    coarse = rng.random() < 0.3
    blocks = []
    for _ in range(rng.randint(2, 6)):
        teacher = {"kl": 0.0, "latency_ms@1": rng.uniform(0.05, 0.5), "latency_ms@64": rng.uniform(0.5, 5.0),
                   "params": float(rng.randint(1_000, 100_000)), "macs": rng.uniform(1e6, 1e8)}
        options = [Option("teacher", teacher)]
        for i in range(rng.randint(0, 3)):
            values = {k: v * rng.uniform(0.1, 1.2) for k, v in teacher.items() if k != "kl"}
            values["kl"] = rng.uniform(0.0, 0.2)
            if coarse:
                values = {k: round(v, 1) if k == "kl" else round(v / teacher[k], 1) * teacher[k] for k, v in values.items()}
            options.append(Option(f"candidate-{i}", values))
        blocks.append(options)
    teacher_sums = {k: math.fsum(b[0].values[k] for b in blocks) for k in COSTS}
    limits = {k: teacher_sums[k] * rng.uniform(0.45, 1.15) for k in rng.sample(COSTS, rng.randint(1, 3))}
    minimise = rng.choice([{"kl": 1.0}, {"latency_ms@1": 1 / teacher_sums["latency_ms@1"],
                                         "latency_ms@64": 1 / teacher_sums["latency_ms@64"]},
                           {"kl": 1.0, "params": 1e-6}])
    return Problem(blocks, minimise, limits)


def meets(solution: select.Solution, limits: dict[str, float]) -> bool:
    return all(solution.totals[k] <= v * (1 + 1e-9) for k, v in limits.items())


def teacher_sums(problem: Problem, keys) -> dict[str, float]:
    return {k: math.fsum(b[0].values[k] for b in problem.blocks) for k in keys}


def test_solve_equals_brute_force_on_random_problems():
    outcomes = {"solved": 0, "infeasible": 0, "multi-limit": 0, "weighted": 0}
    for seed in range(200):
        problem = random_problem(random.Random(seed))
        try:
            expected = brute_force(problem)
        except Infeasible as exc:
            with pytest.raises(Infeasible) as raised:
                solve(problem)
            assert str(raised.value) == str(exc) and str(exc).startswith("no choice of options meets"), seed
            assert raised.value.tightest == pytest.approx(exc.tightest, rel=1e-7), seed
            assert meets(solve(replace(problem, limits=exc.tightest)), exc.tightest), seed  # they can be met
            outcomes["infeasible"] += 1
            continue
        got = solve(problem)
        assert got.optimal and meets(got, problem.limits), seed
        assert got.objective == pytest.approx(expected.objective, rel=1e-9, abs=1e-12), seed
        assert got.choice == expected.choice, seed  # the same tie rule
        outcomes["solved"] += 1
        outcomes["multi-limit"] += len(problem.limits) > 1
        outcomes["weighted"] += len(problem.minimise) > 1
    assert min(outcomes.values()) >= 20, outcomes


def brute_tightest(problem: Problem, reference: dict[str, float]) -> float:
    best = math.inf
    for choice in itertools.product(*(range(len(b)) for b in problem.blocks)):
        sums = {k: math.fsum(problem.blocks[b][o].values[k] for b, o in enumerate(choice)) for k in COSTS}
        if all(sums[k] <= v * (1 + 1e-9) for k, v in problem.limits.items()):
            best = min(best, max(sums[k] / r for k, r in reference.items()))
    return best


def test_tightest_fraction_equals_brute_force():
    for seed in range(40):
        rng = random.Random(1000 + seed)
        problem = random_problem(rng)
        if rng.random() < 0.6:
            problem = replace(problem, limits={})
        reference = teacher_sums(problem, rng.sample(COSTS, rng.randint(1, 3)))
        expected = brute_tightest(problem, reference)
        if expected == math.inf:
            with pytest.raises(Infeasible):
                tightest_fraction(problem, reference)
            continue
        t, best = tightest_fraction(problem, reference)
        assert t == pytest.approx(expected, rel=1e-7), seed
        budget = {k: min(t * r, problem.limits.get(k, math.inf)) for k, r in reference.items()}
        assert meets(best, {**problem.limits, **budget}), seed
        assert best.objective == pytest.approx(brute_force(replace(problem, limits={**problem.limits, **budget})).objective,
                                               rel=1e-9, abs=1e-12), seed


def test_pareto_front_is_sorted_non_dominated_and_spans_tightest_to_teacher():
    for seed in range(8):
        rng = random.Random(2000 + seed)
        problem = replace(random_problem(rng), limits={})
        reference = teacher_sums(problem, rng.sample(COSTS, rng.randint(1, 2)))
        front = pareto_front(problem, "kl", reference, points=6)
        start, _ = tightest_fraction(problem, reference)
        assert front[0].fraction == pytest.approx(start, rel=1e-7), seed
        assert front[-1].totals["kl"] == 0.0 and front[-1].fraction <= 1.0 + 1e-9, seed  # the teacher or as good
        assert all(a.fraction < b.fraction and a.totals["kl"] > b.totals["kl"] for a, b in zip(front, front[1:])), seed
        everything = [(max(math.fsum(problem.blocks[b][o].values[k] for b, o in enumerate(c)) / r
                           for k, r in reference.items()),
                       math.fsum(problem.blocks[b][o].values["kl"] for b, o in enumerate(c)))
                      for c in itertools.product(*(range(len(b)) for b in problem.blocks))]
        for point in front:
            q = point.totals["kl"]
            assert point.names == [problem.blocks[b][o].name for b, o in enumerate(point.choice)]
            assert point.fraction == pytest.approx(max(point.totals[k] / r for k, r in reference.items()))
            assert not any(f <= point.fraction * (1 + 1e-9) and kl < q - 1e-9 for f, kl in everything), seed
            assert not any(kl <= q + 1e-9 and f < point.fraction * (1 - 1e-7) for f, kl in everything), seed


def two_blocks(latency: float = 0.4) -> list[list[Option]]:
    teacher = Option("teacher", {"kl": 0.0, "latency_ms@1": latency, "params": 100.0})
    student = Option("separable-d1", {"kl": 0.05, "latency_ms@1": 0.31, "params": 40.0})
    return [[teacher, student], [teacher, student, student]]


def test_ties_go_to_the_lowest_index_in_the_earliest_block():
    one_swap = Problem(two_blocks(), {"kl": 1.0}, {"latency_ms@1": 0.75})  # either block may swap
    assert solve(one_swap).choice == brute_force(one_swap).choice == [0, 1]
    both = Problem(two_blocks(), {"kl": 1.0}, {"latency_ms@1": 0.65})  # both swap: options 1 and 2 tie
    assert solve(both).choice == brute_force(both).choice == [1, 1]
    assert solve(Problem(two_blocks(), {}, {})).choice == [0, 0]  # nothing to minimise: all ties
    assert solve(both) == solve(both)


def test_the_all_teacher_choice_meets_its_own_sums():
    blocks = [[Option("teacher", {"kl": 0.0, "latency_ms@1": 0.1})] for _ in range(7)]  # 0.1 * 7 != 0.7 in floats
    sums = teacher_sums(Problem(blocks, {}, {}), ["latency_ms@1"])
    assert solve(Problem(blocks, {"kl": 1.0}, sums)).choice == [0] * 7


def test_totals_hold_the_keys_every_chosen_option_has():
    blocks = [[Option("teacher", {"kl": 0.0, "macs": 5.0}), Option("unmeasured", {"kl": 0.1})]] * 2
    assert solve(Problem(blocks, {"kl": 1.0}, {})).totals == {"kl": 0.0, "macs": 10.0}
    assert solve(Problem(blocks, {"kl": -1.0}, {})).totals == {"kl": pytest.approx(0.2)}  # no macs: not a 0


def test_a_choice_that_only_meets_a_limit_within_highs_tolerance_is_cut_off():
    blocks = [[Option("teacher", {"kl": 0.0, "latency_ms@1": 1.0 + 1e-8}), Option("small", {"kl": 0.5, "latency_ms@1": 0.5})]]
    problem = Problem(blocks, {"kl": 1.0}, {"latency_ms@1": 1.0})
    assert solve(problem).choice == brute_force(problem).choice == [1]


def test_infeasible_says_by_how_much_and_the_tightest_limits():
    problem = Problem(two_blocks(latency=0.5), {"kl": 1.0}, {"latency_ms@1": 0.5})
    with pytest.raises(Infeasible) as raised:
        solve(problem)
    assert str(raised.value) == ("no choice of options meets latency_ms@1 <= 0.5 "
                                 "(the smallest possible is 0.62, 0.62 of the teacher's)")
    assert raised.value.tightest == {"latency_ms@1": pytest.approx(0.62)}
    assert pickle.loads(pickle.dumps(raised.value)).tightest == raised.value.tightest
    both = Problem(two_blocks(), {"kl": 1.0}, {"latency_ms@1": 0.7, "params": 70.0})  # one swap: too slow; two: too big
    with pytest.raises(Infeasible, match="the tightest limits some choice meets: latency_ms@1 <= 0.8, params <= 80$") as raised:
        solve(both)
    assert raised.value.tightest == pytest.approx({"latency_ms@1": 0.8, "params": 80.0})  # both raised 1/7
    assert meets(solve(replace(both, limits=raised.value.tightest)), raised.value.tightest)


def test_optimal_only_when_highs_says_so(monkeypatch):
    real = select.milp

    def stopped_early(*args, **kwargs):
        result = real(*args, **kwargs)
        result.status = 1  # a time or node limit, with a solution
        return result

    monkeypatch.setattr(select, "milp", stopped_early)
    assert not solve(Problem(two_blocks(), {"kl": 1.0}, {"latency_ms@1": 0.75})).optimal


def option(**values: float) -> Option:
    return Option("candidate", values)


@pytest.mark.parametrize("blocks, minimise, limits, message", [
    ([], {"kl": 1.0}, {}, "no blocks"),
    ([[option(kl=0.0)], []], {"kl": 1.0}, {}, "block 1 has no options"),
    ([[option(kl=math.nan)]], {"kl": 1.0}, {}, r"block 0, option 0 \('candidate'\): kl = nan"),
    ([[option(kl=0.0), option(kl=-0.1)]], {"kl": 1.0}, {}, r"block 0, option 1 .*kl = -0.1 is not a finite number >= 0"),
    ([[option(kl=0.0, params=math.inf)]], {"kl": 1.0}, {}, "params = inf"),
    ([[option(kl=0.0)], [option(kl=0.0), option(params=1.0)]], {"kl": 1.0}, {}, r"block 1, option 1 .* no value for kl"),
    ([[option(kl=0.0)]], {"kl": 1.0}, {"params": 5.0}, r"block 0, option 0 .* no value for params"),
    ([[option(kl=0.0)]], {"kl": math.nan}, {}, "weight of kl"),
    ([[option(kl=0.0)]], {"kl": 1.0}, {"kl": math.nan}, "limit on kl"),
])
def test_bad_input_is_named(blocks, minimise, limits, message):
    with pytest.raises(ValueError, match=message):
        Problem(blocks, minimise, limits)


def test_bad_reference_front_and_enumeration_are_named():
    problem = Problem(two_blocks(), {"kl": 1.0}, {})
    with pytest.raises(ValueError, match="reference latency_ms@1 is 0"):
        tightest_fraction(problem, {"latency_ms@1": 0.0})
    with pytest.raises(ValueError, match="no value for macs"):
        tightest_fraction(problem, {"macs": 1.0})
    with pytest.raises(ValueError, match="no value for accuracy"):
        pareto_front(problem, "accuracy", {"params": 200.0})
    with pytest.raises(ValueError, match="at least 2 points"):
        pareto_front(problem, "kl", {"params": 200.0}, points=1)
    wide = Problem([[option(kl=0.0)] * 10] * 6, {"kl": 1.0}, {})
    with pytest.raises(ValueError, match="1000000 combinations"):
        brute_force(wide)


def test_imports_without_torch():
    code = "import sys; sys.modules['torch'] = None; import hpc_bkd.selection.solver"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
