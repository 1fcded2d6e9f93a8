"""Deploy form (folded BatchNorm) and inference measurement: exactness and the records' shape.

No assertion here depends on how fast anything ran: timings vary from machine to machine and run
to run; only what is measured, and how it is reported, is checked.
"""
import json

import pytest
import torch
from torch import nn

from hpc_bkd.blocks.models import build_model
from hpc_bkd.blocks.students import build_student
from hpc_bkd.blocks.surgery import assemble, find_blocks
from hpc_bkd.deploy import form as deploy
from hpc_bkd.deploy.form import (
    LAYOUTS,
    InferenceMeasurement,
    InferenceReport,
    TimingPlan,
    compare,
    count_batchnorms,
    deploy_form,
    measure_callable,
    measure_inference,
    measure_models,
    speed_line,
)
from hpc_bkd.distributed import runtime

SHAPE = (3, 32, 32)
QUICK = TimingPlan(batch_size=8, runs=50, warmup=2, throughput_runs=4, throughput_warmup=1, probe_runs=3, threads=1)


def _randomise_batchnorms(model: nn.Module) -> nn.Module:
    """Non-trivial running statistics and affine weights: folding fresh BNs (mean 0, var 1) would
    hide most mistakes."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.rand(n, generator=gen) - 0.5)
                m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
                m.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                m.bias.copy_(torch.rand(n, generator=gen) - 0.5)
    return model.eval()


def _student(arch: str) -> tuple[nn.Module, nn.Module]:
    """A teacher and the same teacher with every 3x3 conv block replaced by a student block."""
    torch.manual_seed(0)
    teacher = _randomise_batchnorms(build_model(arch, 10, 0.25))
    blocks = find_blocks(teacher, SHAPE)
    student = assemble(teacher, {b.index: build_student(b, 2) for b in blocks}, blocks)
    return teacher, _randomise_batchnorms(student)


@pytest.mark.parametrize("arch", ["vgg16", "resnet18", "torchvision:resnet18"])
def test_deploy_form_folds_every_conv_bn_and_keeps_outputs(arch):
    """VGG and ResNet (BN inside BasicBlocks and their downsample paths), teacher and student,
    NCHW and channels-last: no BatchNorm left, same logits."""
    teacher, student = _student(arch)
    x = torch.randn(4, *SHAPE, generator=torch.Generator().manual_seed(1))
    for model in (teacher, student):
        before = count_batchnorms(model)
        folded = deploy_form(model)
        assert before > 0 and count_batchnorms(folded) == 0, "every BN in these nets follows a conv"
        assert count_batchnorms(model) == before, "the original model is left untouched"
        assert not folded.training
        with torch.no_grad():
            want = model(x)
            for layout, fmt in LAYOUTS.items():
                got = folded.to(memory_format=fmt)(x.contiguous(memory_format=fmt))
                assert torch.allclose(got, want, rtol=1e-4, atol=1e-4), (layout, (got - want).abs().max())


class _Untraceable(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it, the Sequential fallback folds."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x)
        return y if y.sum() > 0 else -y


def test_untraceable_model_folds_its_sequentials():
    model = _randomise_batchnorms(_Untraceable())
    folded = deploy_form(model)
    x = torch.randn(2, *SHAPE)
    assert count_batchnorms(folded) == 0
    with torch.no_grad():
        assert torch.allclose(folded(x), model(x), atol=1e-5)


def test_measure_inference_reports_every_field():
    torch.set_num_threads(2)
    model = build_model("vgg11", 10, 0.125)
    m = measure_inference(model, SHAPE, QUICK, name="teacher")
    assert torch.get_num_threads() == 2, "the thread count is restored"
    assert m.threads == 1 and m.device == "cpu" and m.timer == "perf_counter" and m.runtime == "eager"
    assert m.device_name and m.device_name == runtime.cpu_model()
    assert m.layout in LAYOUTS and set(m.layout_probe_ms) == set(LAYOUTS)
    assert m.layout == min(m.layout_probe_ms, key=m.layout_probe_ms.get), "the faster layout is chosen"
    assert set(m.throughput_layout_probe_ms) == set(LAYOUTS)
    assert m.throughput_layout == min(m.throughput_layout_probe_ms, key=m.throughput_layout_probe_ms.get)
    assert m.latency_runs >= 50 and m.throughput_batch == 8 and m.throughput_runs == 4
    assert 0 < m.latency_ms_median <= m.latency_ms_p90 and m.throughput_ips > 0
    assert len(m.latency_halves_ms) == 2 and len(m.throughput_halves_ips) == 2 and isinstance(m.noisy, bool)
    assert m.input_shape == SHAPE and "1 thread)" in m.where()
    again = InferenceMeasurement.from_json(json.loads(json.dumps(m.to_json())))
    assert again == m
    fixed = measure_inference(model, SHAPE, QUICK, layout="channels_last")
    assert fixed.layout == fixed.throughput_layout == "channels_last" and fixed.layout_probe_ms == {}
    with pytest.raises(ValueError, match="valid: auto"):
        measure_inference(model, SHAPE, QUICK, layout="nhwc")


def test_noisy_when_halves_disagree():
    """Two halves taken one after the other: a slowdown in the second marks the figure noisy."""
    calls = iter(range(10_000))
    second_half = QUICK.warmup + QUICK.runs // 2  # the index of the first call of the second half

    def slow_second_half() -> int:
        return sum(range(200_000 if next(calls) >= second_half else 1))

    m = measure_callable(slow_second_half, lambda: None, SHAPE, QUICK, name="fake", runtime="eager")
    assert m.noisy and m.latency_halves_ms[1] > 1.1 * m.latency_halves_ms[0]
    assert deploy._disagree((1.0, 1.11)) and not deploy._disagree((1.0, 1.09))


def _fake(latency_ms: float, ips: float, noisy: bool = False) -> InferenceMeasurement:
    return InferenceMeasurement("m", "eager", "cpu", "Some CPU", 1, "perf_counter", "contiguous", {}, "contiguous", {},
                                SHAPE, 50, latency_ms, latency_ms * 1.2, (latency_ms, latency_ms), 256, 6, ips,
                                (ips, ips), noisy)


def test_speed_line_says_slower_and_faster_honestly():
    teacher = _fake(1.17, 1000.0)
    slower = compare(teacher, _fake(2.85, 800.0))
    assert slower.line.startswith("student is 0.41x as fast as the teacher at batch 1 on cpu (Some CPU, 1 thread)")
    assert abs(slower.speedup_batch1 - 1.17 / 2.85) < 1e-9 and abs(slower.speedup_throughput - 0.8) < 1e-9
    faster = speed_line(teacher, _fake(0.585, 2000.0))
    assert faster.startswith("student is 2.00x faster than the teacher at batch 1") and "2.00x the teacher's" in faster
    assert "noisy" in speed_line(teacher, _fake(0.5, 1.0, noisy=True)) and "noisy" not in faster


def test_measure_models_with_blocks_on_their_real_input_shapes():
    teacher, student = _student("vgg11")
    blocks = find_blocks(teacher, SHAPE)
    report = measure_models(teacher, student, SHAPE, QUICK, blocks=blocks, accepted=[0, 3])
    assert report.models.teacher.name == "teacher" and report.models.student.name == "student"
    assert [b.index for b in report.blocks] == [0, 3]
    for b in report.blocks:
        assert b.in_shape == blocks[b.index].in_shape == b.comparison.student.input_shape
        assert b.comparison.teacher.input_shape == b.in_shape and b.name == blocks[b.index].name
    assert InferenceReport.from_json(json.loads(json.dumps(report.to_json()))) == report


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_is_timed_with_events():
    m = measure_inference(build_model("vgg11", 10, 0.125), SHAPE, QUICK, device="cuda")
    assert m.timer == "cuda events" and m.device.startswith("cuda") and m.latency_ms_median > 0
