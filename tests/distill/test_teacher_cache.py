"""The teacher-activation cache: what it stores is what a teacher pass gives, and when it is used."""
from dataclasses import dataclass

import pytest
import torch

from hpc_bkd.blocks.models import build_model
from hpc_bkd.blocks.students import TRAIN_FORMAT
from hpc_bkd.blocks.surgery import BlockTap, find_blocks
from hpc_bkd.costs.measure import with_validation
from hpc_bkd.distill.teacher_cache import TeacherCache, cache_bytes, decide
from hpc_bkd.planning.planner import BlockCost, rank_cost
from hpc_bkd.planning.schedule import schedule_for

SMALL = (3, 32, 32)


@pytest.mark.parametrize("arch", ["vgg11", "torchvision:resnet18"])
def test_fetched_rows_equal_a_teacher_pass_on_that_batch(arch):
    """Filled in chunks over the whole set, fetched for a shuffled batch: the same inputs and targets
    (values and channels-last layout) as a truncated teacher pass over that batch."""
    torch.manual_seed(0)
    teacher = build_model(arch, 10, 0.25).eval()
    blocks = find_blocks(teacher, SMALL)
    owned = [blocks[1], blocks[4], blocks[-1]]
    images = torch.randn(50, *SMALL)
    cache = TeacherCache(owned, len(images), torch.device("cpu"))
    cache.fill(teacher, images, lambda x: x * 0.5, chunk=16)
    assert cache.nbytes == cache_bytes(owned, len(images))
    index = torch.randperm(len(images))[:12]
    expected = BlockTap(teacher, owned, TRAIN_FORMAT)(images[index] * 0.5)
    got = cache.fetch(index, [b.index for b in owned])
    assert got.keys() == expected.keys()
    for b in owned:
        for g, e in zip(got[b.index], expected[b.index]):
            assert g.shape == e.shape and g.is_contiguous(memory_format=TRAIN_FORMAT)
            assert torch.allclose(g, e, atol=1e-5), b.name


def test_decide_says_why():
    blocks = find_blocks(build_model("vgg11", 10, 0.125), SMALL)
    need = cache_bytes(blocks, 100)
    # inputs and targets of every block, float32
    assert need == 4 * 100 * sum(torch.Size(b.in_shape).numel() + torch.Size(b.out_shape).numel() for b in blocks)
    assert decide("auto", "none", schedule_for("parallel"), blocks, 100, need).use
    cases = {("off", "none", "parallel", need): "teacher_cache: off",
             ("auto", "crop", "parallel", need): "augment=crop",
             ("auto", "none", "sequential", need): "sequential schedule",
             ("auto", "none", "parallel", need - 1): "over the budget"}
    for (setting, augment, schedule, budget), why in cases.items():
        d = decide(setting, augment, schedule_for(schedule), blocks, 100, budget)
        assert not d.use and why in d.reason


def test_cached_costs_charge_the_teacher_once_per_run_but_validation_every_epoch():
    costs = [BlockCost(0.1, 0.2, 0.05), BlockCost(0.3, 0.1, 0.02)]
    epochs, passes = 4, 0.25
    plain = with_validation(costs, passes)
    cached = with_validation(costs, passes, teacher_passes=1 / epochs)
    # the same validation, and a training teacher pass that costs 1/epochs per step
    assert rank_cost([0, 1], plain) - rank_cost([0, 1], cached) == pytest.approx(0.3 * (1 - 1 / epochs))
    assert rank_cost([0], cached) == pytest.approx(0.1 / epochs + 0.2 + passes * (0.3 + 0.05))


@dataclass
class _Trainer:  # what next_group / epoch_ends read of a distill.BlockTrainer
    index: int
    steps: int = 2
    epoch: int = 0
    step: int = 0

    @property
    def spec(self):
        return self

    @property
    def cursor(self):
        return (self.epoch, self.step)


def _schedule(active: list, schedule: str, cached: bool, epochs: int = 2) -> list:
    """Drive the distiller's ordering the way LocalDistiller.run does; returns what happened."""
    trace = []
    while active:
        group = schedule_for(schedule, cached).next_group(active)
        if group:
            trace.append(("step", [(t.index, t.epoch, t.step) for t in group]))
            for t in group:
                t.step += 1
        ending = schedule_for(schedule, cached).epoch_ends(active, group)
        if ending:
            trace.append(("validate", sorted(t.index for t in ending)))
        for t in ending:
            t.epoch, t.step = t.epoch + 1, 0
            if t.epoch >= epochs:
                active.remove(t)
    return trace


def test_cached_blocks_step_one_at_a_time_for_an_epoch_and_validate_together():
    trace = _schedule([_Trainer(i) for i in range(3)], "parallel", cached=True)
    epoch0 = [("step", [(b, 0, s)]) for b in range(3) for s in range(2)] + [("validate", [0, 1, 2])]
    epoch1 = [("step", [(b, 1, s)]) for b in range(3) for s in range(2)] + [("validate", [0, 1, 2])]
    assert trace == epoch0 + epoch1
    # a block saved at the end of its epoch, before validation, waits for the others' epoch ends
    trace = _schedule([_Trainer(0), _Trainer(1, step=2), _Trainer(2)], "parallel", cached=True, epochs=1)
    assert trace == [("step", [(0, 0, 0)]), ("step", [(0, 0, 1)]), ("step", [(2, 0, 0)]), ("step", [(2, 0, 1)]),
                     ("validate", [0, 1, 2])]


def test_uncached_blocks_share_every_batch_and_a_resumed_epoch_end_is_not_stepped_past():
    # block 1 was saved at the end of its first epoch, before its validation (a stop right then)
    trace = _schedule([_Trainer(0), _Trainer(1, step=2), _Trainer(2)], "parallel", cached=False)
    assert trace == [("step", [(0, 0, 0), (2, 0, 0)]), ("validate", [1]),  # validated at once, never stepped
                     ("step", [(0, 0, 1), (2, 0, 1)]), ("validate", [0, 2]),
                     ("step", [(0, 1, 0), (1, 1, 0), (2, 1, 0)]), ("step", [(0, 1, 1), (1, 1, 1), (2, 1, 1)]),
                     ("validate", [0, 1, 2])]
    assert _schedule([_Trainer(0), _Trainer(1)], "sequential", cached=False) == [
        ("step", [(0, 0, 0)]), ("step", [(0, 0, 1)]), ("validate", [0]), ("step", [(0, 1, 0)]), ("step", [(0, 1, 1)]),
        ("validate", [0]), ("step", [(1, 0, 0)]), ("step", [(1, 0, 1)]), ("validate", [1]), ("step", [(1, 1, 0)]),
        ("step", [(1, 1, 1)]), ("validate", [1])]
