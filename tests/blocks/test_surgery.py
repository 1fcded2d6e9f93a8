"""Surgery on our CIFAR-style nets and unmodified torchvision models, found with hooks alone."""
import copy

import pytest
import torch
from torch import nn

from hpc_bkd.blocks.candidates import Unit
from hpc_bkd.blocks.models import build_model
from hpc_bkd.blocks.students import build_student
from hpc_bkd.blocks.surgery import (
    BlockTap,
    SwappedForward,
    assemble,
    conv_params,
    find_blocks,
    replace_blocks,
    swapped,
    total_macs,
)

SMALL = (3, 32, 32)


@pytest.mark.parametrize("arch, conv_blocks, unit_blocks", [
    ("torchvision:vgg16_bn", 13, 5),     # the paper's VGG16: 13 3x3 convs, 5 stages
    ("torchvision:resnet50", 16, 16),    # the paper's ResNet50: 16 bottleneck 3x3 convs (stem is 7x7)
    ("torchvision:resnet18", 16, 8),
    ("torchvision:vgg11_bn", 8, 5),
    ("vgg16", 13, 5),
    ("vgg19", 16, 5),
    ("resnet18", 17, 8),                 # CIFAR stem is a 3x3 conv: one more block
    ("resnet50", 17, 16),
])
def test_block_counts(arch, conv_blocks, unit_blocks):
    model = build_model(arch, 10)
    assert len(find_blocks(model, SMALL, "conv")) == conv_blocks
    assert len(find_blocks(model, SMALL, "unit")) == unit_blocks


def _identity_student(model: nn.Module, spec) -> nn.Module:
    """A 'student' that is an exact copy of the teacher block: swapping it in must change nothing."""
    return nn.Sequential(*[copy.deepcopy(model.get_submodule(m)) for m in spec.members])


@pytest.mark.parametrize("arch, granularity", [
    ("torchvision:resnet18", "conv"), ("torchvision:resnet18", "unit"), ("vgg11", "conv"),
    ("vgg11", "unit"), ("torchvision:resnet50", "conv"), ("torchvision:densenet121", "conv"),
])
def test_members_form_a_chain(arch, granularity):
    """Replacing every block by a copy of its own members reproduces the teacher exactly."""
    torch.manual_seed(0)
    model = build_model(arch, 10).eval()
    blocks = find_blocks(model, SMALL, granularity)
    copies = {b.index: _identity_student(model, b) for b in blocks}
    rebuilt = assemble(model, copies, blocks).eval()
    x = torch.randn(2, *SMALL)
    with torch.no_grad():
        assert torch.allclose(model(x), rebuilt(x), atol=1e-5)
    # and the rebuilt model really runs the copies, not the old modules
    assert all(isinstance(rebuilt.get_submodule(b.members[0]), nn.Sequential) for b in blocks)


def test_tap_matches_block_input_and_output():
    torch.manual_seed(0)
    model = build_model("torchvision:resnet18", 10).eval()
    blocks = find_blocks(model, SMALL)
    spec = blocks[5]
    x = torch.randn(4, *SMALL)
    inp, target = BlockTap(model, [spec])(x)[spec.index]
    block = _identity_student(model, spec).eval()
    with torch.no_grad():
        assert torch.allclose(block(inp), target, atol=1e-5)
    assert target.min() < 0, "a BN output before its ReLU must be captured before the in-place ReLU"


def test_tap_stops_at_deepest_block():
    model = build_model("vgg16", 10, 0.25).eval()
    blocks = find_blocks(model, SMALL)
    ran = []
    model.classifier.register_forward_hook(lambda *a: ran.append("classifier"))
    model.features[-1].register_forward_hook(lambda *a: ran.append("last"))
    out = BlockTap(model, blocks[:3])(torch.randn(2, *SMALL))
    assert set(out) == {0, 1, 2} and ran == [], "the teacher ran deeper than the deepest tapped block"


def test_tap_hands_out_the_training_layout():
    """Students train channels-last: the tap's clone puts activations in that layout, same values."""
    model = build_model("resnet18", 10, 0.25).eval()
    blocks = find_blocks(model, SMALL)[:4]
    x = torch.randn(3, *SMALL)
    plain = BlockTap(model, blocks)(x)
    last = BlockTap(model, blocks, torch.channels_last)(x)
    for i, (inp, target) in last.items():
        assert inp.is_contiguous(memory_format=torch.channels_last) and not plain[i][0].is_contiguous(
            memory_format=torch.channels_last)
        assert torch.equal(inp, plain[i][0]) and torch.equal(target, plain[i][1])


@pytest.mark.parametrize("arch", ["torchvision:resnet50", "resnet18", "vgg16", "torchvision:vgg16_bn"])
@pytest.mark.parametrize("granularity", ["conv", "unit"])
def test_students_fit_their_blocks(arch, granularity):
    model = build_model(arch, 10)
    for spec in find_blocks(model, SMALL, granularity):
        student = build_student(spec)  # raises if the output shape differs
        ends_in_relu = isinstance(list(student.children())[-1], nn.ReLU)
        assert ends_in_relu == spec.nonnegative_output
        dw = [m for m in student.modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
        assert dw and all(m.kernel_size == (3, 3) for m in dw)


def test_student_can_output_negative_values():
    """The paper's ResNet students ended in a ReLU and could not fit pre-activation targets."""
    spec = find_blocks(build_model("resnet18", 10), SMALL)[3]
    assert not spec.nonnegative_output
    student = build_student(spec).train()
    out = student(torch.randn(8, *spec.in_shape))
    assert out.min() < 0


def test_vgg16_students_are_under_30_percent_of_conv_weights():
    model = build_model("vgg16", 10, 0.25)
    blocks = find_blocks(model, SMALL)
    student = assemble(model, {b.index: build_student(b) for b in blocks}, blocks)
    assert conv_params(student) <= 0.30 * conv_params(model)


def test_replace_is_in_place_and_assemble_copies():
    model = build_model("vgg11", 10, 0.25)
    blocks = find_blocks(model, SMALL)
    before = copy.deepcopy(model.state_dict())
    assemble(model, {0: build_student(blocks[0])}, blocks)
    assert model.state_dict().keys() == before.keys()
    replace_blocks(model, {0: build_student(blocks[0])}, blocks)
    assert isinstance(model.get_submodule(blocks[0].members[1]), nn.Identity)


def test_student_init_depends_on_block_index_only():
    blocks = find_blocks(build_model("vgg11", 10, 0.25), SMALL)
    a, b = build_student(blocks[2], seed=0), build_student(blocks[2], seed=0)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    c = build_student(blocks[2], seed=1)
    assert not all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), c.state_dict().values()))


def test_model_without_blocks_is_a_clear_error():
    with pytest.raises(ValueError, match="no replaceable blocks"):
        find_blocks(nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10)), SMALL)


def test_unknown_arch_lists_valid():
    with pytest.raises(ValueError, match="valid: .*vgg16.*resnet50"):
        build_model("alexnet-ish", 10)


def test_relu_after_marks_blocks_the_teacher_follows_with_a_relu():
    """VGG: every conv+BN feeds a ReLU. ResNet BasicBlock: bn1 feeds a ReLU, bn2 feeds the residual
    sum (an in-place add on the same tensor, so identity alone would be fooled)."""
    vgg = find_blocks(build_model("vgg11", 10, 0.125), (3, 32, 32))
    assert all(b.relu_after for b in vgg)
    res = find_blocks(build_model("resnet18", 10, 0.125), (3, 32, 32))
    assert [b.relu_after for b in res[1:5]] == [True, False, True, False]


def test_activation_matching_ignores_what_the_relu_discards():
    from hpc_bkd.distill.distiller import BlockTrainer

    spec = find_blocks(build_model("vgg11", 10, 0.125), (3, 32, 32))[1]
    student = build_student(spec)
    opt = torch.optim.SGD(student.parameters(), lr=0.0)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, 1.0)
    inp = torch.randn(4, *spec.in_shape)
    with torch.no_grad():
        student.eval()
        out = student(inp)
    target = torch.where(out < 0, out - 5.0, out)  # differs from the output only where both are negative
    unit = Unit(spec.index, spec.index, "separable-d2")
    plain = BlockTrainer(spec, unit, student, opt, sched, 1, 1)
    matched = BlockTrainer(spec, unit, student, opt, sched, 1, 1, match_activation=True)
    student.eval()  # same output as above: BN in eval mode
    student.train = lambda mode=True: student  # keep eval mode inside backward()
    assert float(plain.backward(inp, target)) > 1.0
    assert float(matched.backward(inp, target)) == pytest.approx(0.0, abs=1e-10)


@pytest.mark.parametrize("arch, granularity", [
    ("vgg16", "conv"), ("resnet18", "conv"), ("torchvision:resnet50", "conv"), ("resnet18", "unit"),
    ("vgg16", "unit")])
def test_swapped_forward_equals_one_swapped_model_per_block(arch, granularity):
    """Sharing the teacher prefix between blocks gives exactly the swapped model's output, for
    every block and for any subset (residual identities and in-place ReLUs included)."""
    torch.manual_seed(0)
    model = build_model(arch, 10, 0.25).eval()
    blocks = find_blocks(model, (3, 32, 32), granularity)
    students = {b.index: build_student(b, 2, 1.0, seed=1).eval() for b in blocks}
    modules_before = [id(m) for m in model.modules()]
    forward = SwappedForward(model, blocks)
    assert forward.shares_prefix, forward.reason
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        for subset in (students, {i: students[i] for i in list(students)[1::3]}):
            got = forward(x, subset)
            assert sorted(got) == sorted(subset)
            for i, student in subset.items():
                with swapped(model, blocks[i], student):
                    assert torch.equal(got[i], model(x)), (arch, granularity, i)
    assert [id(m) for m in model.modules()] == modules_before  # the teacher is left as it was


class _DataDependent(nn.Module):
    """A teacher torch.fx cannot trace (Python control flow on tensor values)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        if x.mean() > 0:
            x = x * 1.0
        return self.head(torch.relu(self.conv2(x)).mean((2, 3)))


def test_swapped_forward_falls_back_to_whole_forwards():
    torch.manual_seed(0)
    model = _DataDependent().eval()
    blocks = find_blocks(model, (3, 8, 8), "conv")
    students = {b.index: build_student(b, 1, 1.0).eval() for b in blocks}
    forward = SwappedForward(model, blocks)
    assert not forward.shares_prefix and "trace" in forward.reason
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        got = forward(x, students)
        for i, student in students.items():
            with swapped(model, blocks[i], student):
                assert torch.equal(got[i], model(x))


# ------------------------------------------------------------------------------------ counts


def _hook_macs(model: nn.Module, shape: tuple[int, int, int], batch: int = 3) -> int:
    """Reference count, independent of surgery's trace: forward hooks on every Conv2d and Linear,
    each output element costing (in_channels / groups) x kernel area (conv) or in_features
    (linear) multiply-accumulates, divided by the batch actually run."""
    total = [0]

    def hook(module: nn.Module, args, out: torch.Tensor) -> None:
        if isinstance(module, nn.Conv2d):
            per = module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
        else:
            per = module.in_features
        total[0] += out.numel() * per

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(batch, *shape))
    finally:
        for h in handles:
            h.remove()
    assert total[0] % batch == 0
    return total[0] // batch


# Published figures (torchvision's model cards list MACs as "GFLOPS"): MACs at 224x224, parameters.
PUBLISHED = {"resnet18": (1.814e9, 11.69e6), "vgg16": (15.47e9, 138.36e6), "resnet50": (4.09e9, 25.56e6),
             "mobilenet_v2": (0.30e9, 3.50e6)}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_macs_and_params_match_published_torchvision_figures(name):
    model = build_model(f"torchvision:{name}", 1000)
    shape = (3, 224, 224)
    macs, params = total_macs(model, shape), sum(p.numel() for p in model.parameters())
    assert macs == _hook_macs(model, shape), "per image, whatever batch is traced"
    want_macs, want_params = PUBLISHED[name]
    assert abs(macs / want_macs - 1) < 0.01, f"{name}: {macs / 1e9:.3f} GMACs, published {want_macs / 1e9}"
    assert abs(params / want_params - 1) < 0.002, f"{name}: {params / 1e6:.2f} M params, published {want_params / 1e6}"


def test_vgg16_at_32x32_by_hand():
    """Full-width VGG16-BN for 32x32 inputs: 313.2 M MACs (each 3x3 conv: H x W x C_in x C_out x 9,
    plus the 512 x 10 classifier); the blocks hold all the conv MACs."""
    model = build_model("vgg16", 10, 1.0)
    convs, size, c_in = 0, 32, 3
    for item in [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]:
        if item == "M":
            size //= 2
        else:
            convs += size * size * c_in * item * 9
            c_in = item
    assert convs + 512 * 10 == total_macs(model, SMALL) == _hook_macs(model, SMALL) == 313_201_664
    blocks = find_blocks(model, SMALL)
    assert sum(b.macs for b in blocks) == convs and blocks[-1].prefix_macs == convs
    assert blocks[0].macs == 32 * 32 * 3 * 64 * 9
