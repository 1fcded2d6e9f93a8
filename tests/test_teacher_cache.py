"""The teacher-activation cache: what it stores is what a teacher pass gives, and when it is used."""
import pytest
import torch

from hpc_bkd.models import build_model
from hpc_bkd.plan import BlockCost, rank_cost, with_validation
from hpc_bkd.students import TRAIN_FORMAT
from hpc_bkd.surgery import BlockTap, find_blocks
from hpc_bkd.teacher_cache import TeacherCache, cache_bytes, decide

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
    assert decide("auto", "none", "parallel", blocks, 100, need).use
    cases = {("off", "none", "parallel", need): "teacher_cache: off",
             ("auto", "crop", "parallel", need): "augment=crop",
             ("auto", "none", "sequential", need): "sequential schedule",
             ("auto", "none", "parallel", need - 1): "over the budget"}
    for (setting, augment, schedule, budget), why in cases.items():
        d = decide(setting, augment, schedule, blocks, 100, budget)
        assert not d.use and why in d.reason


def test_cached_costs_charge_the_teacher_once_per_run_but_validation_every_epoch():
    costs = [BlockCost(0.1, 0.2, 0.05), BlockCost(0.3, 0.1, 0.02)]
    epochs, passes = 4, 0.25
    plain = with_validation(costs, passes)
    cached = with_validation(costs, passes, teacher_passes=1 / epochs)
    # the same validation, and a training teacher pass that costs 1/epochs per step
    assert rank_cost([0, 1], plain) - rank_cost([0, 1], cached) == pytest.approx(0.3 * (1 - 1 / epochs))
    assert rank_cost([0], cached) == pytest.approx(0.1 / epochs + 0.2 + passes * (0.3 + 0.05))
