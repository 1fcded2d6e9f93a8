"""The planner: optimal on cases small enough to enumerate; cost files; the plan CLI."""
import itertools
import json
import random

import pytest
import torch
from conftest import hpc

from hpc_bkd.planning.inputs import Feed
from hpc_bkd.planning.planner import BlockCost, lower_bound, make_plan, rank_cost
from hpc_bkd.planning.table import costs_from_json


def brute_force(costs, ranks):
    best = float("inf")
    for labels in itertools.product(range(ranks), repeat=len(costs)):
        bins = [[b for b, r in enumerate(labels) if r == k] for k in range(ranks)]
        best = min(best, max(rank_cost(b, costs) for b in bins))
    return best


@pytest.mark.parametrize("seed", range(12))
def test_plan_is_optimal_on_small_cases(seed):
    rng = random.Random(seed)
    n, ranks = rng.randint(3, 8), rng.randint(2, 3)
    depth = sorted(rng.uniform(0.01, 0.3) for _ in range(n))  # deeper blocks: longer teacher prefix
    costs = [BlockCost(depth[i], rng.uniform(0.01, 0.15)) for i in range(n)]
    plan = make_plan(costs, ranks, method="exact")
    assert plan.optimal
    assert plan.makespan == pytest.approx(brute_force(costs, ranks))
    assert sorted(b for r in plan.assignment for b in r) == list(range(n))
    assert lower_bound(costs, ranks) <= plan.makespan + 1e-12


@pytest.mark.parametrize("seed", range(6))
def test_lpt_is_close_to_optimal(seed):
    rng = random.Random(100 + seed)
    costs = [BlockCost(0.02 * i, rng.uniform(0.01, 0.1)) for i in range(8)]
    lpt = make_plan(costs, 3, method="lpt")
    assert lpt.makespan <= 1.25 * brute_force(costs, 3)


def test_more_ranks_than_blocks_leaves_idle_ranks():
    costs = [BlockCost(0.1, 0.1), BlockCost(0.2, 0.1)]
    plan = make_plan(costs, 5)
    assert len(plan.assignment) == 5 and len(plan.idle_ranks) == 3
    assert plan.makespan == pytest.approx(0.3)


def test_costs_file_formats(tmp_path):
    (tmp_path / "plain.json").write_text("[0.5, 0.25, 0.25]")
    assert [c.student for c in costs_from_json(tmp_path / "plain.json")] == [0.5, 0.25, 0.25]
    (tmp_path / "obj.json").write_text(json.dumps([{"teacher": 0.1, "student": 0.2}]))
    assert costs_from_json(tmp_path / "obj.json") == [BlockCost(0.1, 0.2)]
    (tmp_path / "bad.json").write_text('[{"student": 1}]')
    with pytest.raises(ValueError, match="item 0"):
        costs_from_json(tmp_path / "bad.json")


def test_plan_cli_from_costs_needs_no_model(tmp_path):
    (tmp_path / "costs.json").write_text("[4, 3, 3, 2, 2, 2]")
    out = json.loads(hpc("plan", "--costs", str(tmp_path / "costs.json"), "--ranks", "2").stdout)
    assert out["makespan"] == pytest.approx(8.0) and out["optimal"]
    assert sorted(sum(out["assignment"], [])) == list(range(6))


def test_plan_cli_on_torchvision_models():
    for arch, count in [("torchvision:vgg16_bn", 13), ("torchvision:resnet50", 16)]:
        out = hpc("plan", "--set", f"model.arch={arch}", "--set", "plan.cost_model=macs", "--ranks", "4",
                  "--json").stdout  # the default job's two candidates per block: two units per block
        plan = json.loads(out)
        assert len(plan["blocks"]) == count
        p = plan["plan"]  # every unit once, counted per team (a team's members share its units)
        assert sorted(sum((p["assignment"][team[0]] for team in p["teams"]), [])) == list(range(2 * count))


def test_hybrid_uses_spare_ranks_and_never_loses():
    costs = [BlockCost(0.1 * (i + 1), 0.05) for i in range(3)]
    pure = make_plan(costs, 6)
    hybrid = make_plan(costs, 6, hybrid=True)
    assert len(pure.idle_ranks) == 3 and not hybrid.idle_ranks
    assert hybrid.makespan < pure.makespan
    assert sorted(r for team in hybrid.teams for r in team) == list(range(6))
    for team in hybrid.teams:  # members of a team train the same blocks
        assert len({tuple(hybrid.assignment[r]) for r in team}) == 1


def test_hybrid_takes_a_team_only_when_it_pays():
    """The issue's CPU figures: teacher 0.22 s, students 0.58 s in all; a pure 2-rank split is capped."""
    depth = [0.02 + 0.2 * i / 12 for i in range(13)]
    costs = [BlockCost(depth[i], 0.58 / 13) for i in range(13)]
    pure, hybrid = make_plan(costs, 2), make_plan(costs, 2, hybrid=True)
    assert pure.predicted_speedup < 1.8 and hybrid.makespan <= pure.makespan
    team = make_plan(costs, 2, hybrid=True, teams=1)
    assert team.teams == [[0, 1]] and team.makespan == pytest.approx(rank_cost(range(13), costs) / 2 * 1.6)
    assert (hybrid.teams == [[0, 1]]) == (team.makespan < pure.makespan)
    one_block = [BlockCost(0.3, 0.5)]  # one dominant block, four ranks: only a team can help
    assert make_plan(one_block, 4, hybrid=True).makespan < make_plan(one_block, 4).makespan


def test_the_input_bounds_every_busy_rank_and_favours_teams():
    """Streamed data delivers a whole batch in ``Feed.seconds`` at best: no busy rank beats it, an
    idle one is not held to it, and a team member reads (so waits for) only its rows. Where
    decoding slows the compute it overlaps (drag = 1: nothing overlaps) input and compute add up."""
    costs = [BlockCost(0.01, 0.02), BlockCost(0.02, 0.02), BlockCost(0.03, 0.02)]
    free = make_plan(costs, 4)
    fed = make_plan(costs, 4, feed=Feed(0.05))
    assert fed.assignment == free.assignment and len(fed.idle_ranks) == 1
    assert fed.predicted == [0.05 if owned else 0.0 for owned in fed.assignment]
    assert fed.makespan == fed.lower_bound == 0.05 and fed.sequential == pytest.approx(0.09)
    assert make_plan(costs, 1, feed=Feed(0.2)).makespan == 0.2
    team = make_plan(costs, 4, hybrid=True, feed=Feed(0.2))  # the split waits 0.2 s, a 4-rank team 0.05 s
    assert team.teams == [[0, 1, 2, 3]] and team.makespan == pytest.approx(max(0.09 / 4 * 1.6, 0.05))
    # the teacher terms carry seconds x drag (input_costs); the bound adds compute x drag when data-bound
    drag = 0.25
    assert Feed(0.2, drag).bound(0.09 + 0.2 * drag) == pytest.approx(0.2 + 0.09 * drag)  # data-bound
    assert Feed(0.02, drag).bound(0.09 + 0.02 * drag) == pytest.approx(0.09 + 0.02 * drag)  # compute-bound
    assert Feed(0.05, 1.0).bound(0.09 + 0.05) == pytest.approx(0.14)  # no overlap: C + I either way


def test_ghost_batch_teams_are_cheap_and_bounded_by_the_groups():
    from hpc_bkd.planning.planner import TEAM_OVERHEAD_GHOST_BN, TeamModel

    tm = TeamModel.for_groups(4)
    assert tm.scale(1) == 1.0
    assert tm.scale(2) == pytest.approx(0.5 * (1 + TEAM_OVERHEAD_GHOST_BN))
    assert tm.scale(3) == pytest.approx(0.5 * (1 + TEAM_OVERHEAD_GHOST_BN))  # whole groups: 1+1+2 of 4
    assert tm.allows(4) and not tm.allows(5)
    costs = [BlockCost(0.05 * (i + 1), 0.1) for i in range(6)]
    plan = make_plan(costs, 2, hybrid=True, tm=TeamModel.for_groups(2))
    assert plan.teams == [[0, 1]]  # at its share of the batch plus overhead the team beats any block split here
    with pytest.raises(ValueError, match="bn_groups"):
        make_plan(costs, 4, hybrid=True, teams=1, tm=TeamModel.for_groups(2))


def test_validation_folds_into_the_rank_cost_exactly():
    """with_validation's folded costs give, for any set of blocks, the training cost plus one shared
    validation prefix to the deepest block and one suffix per block (a full pass for one block)."""
    from hpc_bkd.costs.measure import with_validation

    rng = random.Random(0)
    teacher = sorted(rng.uniform(0.01, 1.0) for _ in range(7))
    costs = [BlockCost(t, rng.uniform(0.05, 0.5), rng.uniform(0.01, 0.1)) for t in teacher]
    passes, full = 0.3, max(teacher)
    folded = with_validation(costs, passes)
    for _ in range(20):
        owned = rng.sample(range(7), rng.randint(1, 7))
        expected = rank_cost(owned, costs) + passes * (max(teacher[b] for b in owned)
                                                       + sum(full - teacher[b] + costs[b].forward for b in owned))
        assert rank_cost(owned, folded) == pytest.approx(expected)
    for b in range(7):  # alone (the sequential schedule): training plus one full validation pass
        assert rank_cost([b], folded) == pytest.approx(rank_cost([b], costs) + passes * (full + costs[b].forward))
    unshared = with_validation(costs, passes, shared_prefix=False)
    assert rank_cost(range(7), unshared) == pytest.approx(
        rank_cost(range(7), costs) + passes * sum(full + c.forward for c in costs))


def test_member_rows_are_whole_ghost_batches_or_an_even_split():
    from hpc_bkd.planning.planner import member_rows

    assert member_rows(64, 1, 2) == 64
    assert member_rows(64, 2, 2) == 32
    assert member_rows(64, 3, 4) == 32  # 4 ghost batches over 3 members: the busiest holds 2
    assert member_rows(64, 3, 1) == 22  # synced statistics: rows split evenly, rounded up


def test_a_measured_member_share_prices_teams_and_keeps_the_bound():
    """A member measured at 0.7 of one rank's time (per-op overheads do not halve with the batch)
    makes the team dearer than its share of the batch says; a share below 0.5 lowers the bound."""
    from hpc_bkd.planning.planner import TEAM_OVERHEAD_GHOST_BN, TeamModel

    costs = [BlockCost(0.05 * (i + 1), 0.1) for i in range(6)]
    linear = make_plan(costs, 2, hybrid=True, tm=TeamModel.for_groups(2))
    measured = make_plan(costs, 2, hybrid=True, tm=TeamModel.for_groups(2, {2: 0.7}))
    assert linear.teams == [[0, 1]] and measured.teams == [[0], [1]]
    forced = make_plan(costs, 2, hybrid=True, teams=1, tm=TeamModel.for_groups(2, {2: 0.7}))
    assert forced.makespan == pytest.approx(rank_cost(range(6), costs) * 0.7 * (1 + TEAM_OVERHEAD_GHOST_BN))
    rng = random.Random(1)
    for _ in range(30):
        costs = [BlockCost(rng.uniform(0, 1), rng.uniform(0, 1)) for _ in range(rng.randint(1, 7))]
        tm = TeamModel.for_groups(4, {m: rng.uniform(0.2, 1.0) for m in (2, 3, 4)})
        ranks = rng.randint(2, 4)
        plan = make_plan(costs, ranks, hybrid=True, tm=tm)
        assert plan.lower_bound <= plan.makespan + 1e-12


def test_measuring_for_a_team_member_times_its_rows_of_the_batch():
    """measure_costs(members=2) runs the teacher (and so the students) on the busiest member's
    ghost batches only: what that member runs in a team."""
    from torch import nn

    from hpc_bkd.blocks.students import build_student
    from hpc_bkd.blocks.surgery import find_blocks
    from hpc_bkd.costs.measure import measure_costs

    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                            nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10)).eval()
    blocks = find_blocks(teacher, (3, 16, 16), "conv")
    students = [build_student(b) for b in blocks]
    seen: list[int] = []
    teacher[0].register_forward_pre_hook(lambda m, args: seen.append(len(args[0])))
    batches = [torch.randn(64, 3, 16, 16) for _ in range(4)]
    for members, rows in ((1, 64), (2, 32)):
        seen.clear()
        costs = measure_costs(teacher, blocks, students, batches, torch.device("cpu"), bn_groups=2, members=members)
        assert len(costs) == len(blocks) and all(c.teacher > 0 and c.student > 0 for c in costs)
        assert seen and set(seen) == {rows}


@pytest.mark.parametrize("block_major", [False, True])
def test_students_are_timed_in_the_order_the_distiller_steps_them(block_major: bool):
    """Uncached, every student steps on a batch before the next batch; with the teacher cache
    (``block_major``) one student goes through every batch before the next one (distill.next_group)."""
    from torch import nn

    from hpc_bkd.blocks.students import build_student
    from hpc_bkd.blocks.surgery import find_blocks
    from hpc_bkd.costs.measure import measure_costs

    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                            nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()).eval()
    blocks = find_blocks(teacher, (3, 8, 8), "conv")
    students = [build_student(b) for b in blocks]
    order: list[int] = []
    for j, student in enumerate(students):  # hooks travel with the copies measure_costs trains
        student.register_forward_pre_hook(lambda m, args, j=j: order.append(j) if m.training else None)
    batches = [torch.randn(8, 3, 8, 8) for _ in range(3)]
    costs = measure_costs(teacher, blocks, students, batches, torch.device("cpu"), block_major=block_major)
    assert all(c.student > 0 for c in costs)
    assert order == ([0, 0, 0, 1, 1, 1] if block_major else [0, 1, 0, 1, 0, 1])


def test_the_sequential_schedule_is_timed_one_prefix_per_block():
    """tap_each_block: a truncated teacher pass per block (what the paper's schedule runs), each
    as deep as its block; otherwise one pass serves every block."""
    from torch import nn

    from hpc_bkd.blocks.students import build_student
    from hpc_bkd.blocks.surgery import find_blocks
    from hpc_bkd.costs.measure import measure_costs

    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                            nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                            nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()).eval()
    blocks = find_blocks(teacher, (3, 8, 8), "conv")
    students = [build_student(b) for b in blocks]
    first, last = [], []
    teacher[0].register_forward_hook(lambda *_: first.append(1))
    teacher[6].register_forward_hook(lambda *_: last.append(1))
    batches = [torch.randn(8, 3, 8, 8) for _ in range(2)]
    for each, passes, deepest in ((False, 2, 2), (True, 6, 2)):
        first.clear(), last.clear()
        costs = measure_costs(teacher, blocks, students, batches, torch.device("cpu"), tap_each_block=each)
        assert len(first) == passes and len(last) == deepest and all(c.teacher > 0 for c in costs)
