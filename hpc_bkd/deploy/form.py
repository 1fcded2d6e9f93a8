"""The deploy form of a model and its measured inference speed.

A student with a quarter of the teacher's MACs is not necessarily faster: each depthwise-separable
block is four convolutions and four BatchNorms where the teacher had one of each, and on small
tensors per-op cost dominates. So speed is measured, never inferred from MACs, and measured on the
form a user would ship: eval mode, every Conv2d -> BatchNorm2d pair folded (torch's own
``torch.fx.experimental.optimization.fuse``), in whichever memory layout (NCHW or channels-last)
is faster on the device, chosen by measurement and reported.

Every figure is the median (and p90) of at least 50 timed forwards after warm-up; the samples are
taken in two halves one after the other, and a figure whose halves differ by more than 10 % is
flagged ``noisy`` instead of being reported as if it were solid. On CUDA forwards are timed with
CUDA events after synchronisation, never with the host clock around asynchronous launches.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import logging
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from hpc_bkd.blocks.surgery import BlockSpec, conv_params, total_macs
from hpc_bkd.distributed.runtime import cpu_model
from hpc_bkd.store.records import BlockInference, Comparison, InferenceMeasurement, InferenceReport, ModelSize

log = logging.getLogger("hpc_bkd")

LAYOUTS: dict[str, torch.memory_format] = {"contiguous": torch.contiguous_format,
                                           "channels_last": torch.channels_last}
NOISE_TOLERANCE = 0.10  # two halves of one measurement that differ by more than this: "noisy"


# ------------------------------------------------------------------------------------ deploy form


def _fold_sequentials(model: nn.Module) -> nn.Module:
    """Fallback for models torch.fx cannot trace: fold Conv2d -> BatchNorm2d pairs that are
    adjacent children of an ``nn.Sequential`` (the only place their order is known without a
    trace), with torch's ``fuse_conv_bn_eval``."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    for seq in [m for m in model.modules() if isinstance(m, nn.Sequential)]:
        names = list(seq._modules)
        for a, b in zip(names, names[1:]):
            conv, bn = seq._modules[a], seq._modules[b]
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d) and bn.track_running_stats:
                seq._modules[a] = fuse_conv_bn_eval(conv, bn)
                seq._modules[b] = nn.Identity()
    return model


def deploy_form(model: nn.Module) -> nn.Module:
    """A copy of ``model`` for inference: eval mode, every Conv2d followed by a BatchNorm2d folded.

    Folding happens on a torch.fx trace (``torch.fx.experimental.optimization.fuse``), which sees
    the real data flow: BN after a conv inside a ResNet unit or its downsample path, student
    blocks swapped into a teacher, plain Sequentials. ``model`` itself is left untouched.
    """
    from torch.fx.experimental.optimization import fuse

    work = copy.deepcopy(model).eval()
    try:
        folded = fuse(work, inplace=True)
    except Exception as exc:  # data-dependent control flow and the like
        log.warning("deploy form: torch.fx cannot trace %s (%s); folding adjacent Sequential pairs only",
                    type(model).__name__, exc)
        folded = _fold_sequentials(work)
    return folded.eval()


def count_batchnorms(model: nn.Module) -> int:
    """BatchNorm2d modules left in ``model`` (0 in the deploy form of our teachers and students)."""
    return sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())


# ------------------------------------------------------------------------------------ records


@dataclass(frozen=True)
class TimingPlan:
    """How much to time: batch-1 forwards for latency, large-batch forwards for throughput."""

    batch_size: int = 256      # throughput batch (the job's eval batch size)
    runs: int = 50             # timed batch-1 forwards (two halves of runs // 2)
    warmup: int = 10           # untimed batch-1 forwards first
    throughput_runs: int = 6   # timed large-batch forwards
    throughput_warmup: int = 2
    probe_runs: int = 10       # batch-1 forwards per layout when choosing the layout
    throughput_probe_runs: int = 2  # large-batch forwards per layout when choosing its layout
    threads: int | None = None  # CPU threads (None: torch's current setting)


# ------------------------------------------------------------------------------------ timing


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_model()


@contextlib.contextmanager
def cpu_threads(threads: int | None) -> Iterator[int]:
    """Run with ``threads`` intra-op threads (None: unchanged); yields the count in effect."""
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def forward_times(run: Callable[[], object], runs: int, warmup: int, device: torch.device) -> list[float]:
    """Milliseconds of ``runs`` calls of ``run`` after ``warmup`` untimed ones.

    On CUDA each call is bracketed by CUDA events and waited for, so the figure is the GPU's time
    for the forward and not the host's time to enqueue it.
    """
    cuda = device.type == "cuda"
    for _ in range(warmup):
        run()
    if cuda:
        torch.cuda.synchronize(device)
    times = []
    for _ in range(runs):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            end.synchronize()
            times.append(float(start.elapsed_time(end)))
        else:
            t0 = time.perf_counter()
            run()
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def _p90(samples: Sequence[float]) -> float:
    return statistics.quantiles(samples, n=10, method="inclusive")[-1] if len(samples) > 1 else samples[0]


def _halves(samples: Sequence[float]) -> tuple[float, float]:
    """Medians of the first and the second half: two measurements of the same thing, in a row."""
    mid = max(1, len(samples) // 2)
    return statistics.median(samples[:mid]), statistics.median(samples[mid:] or samples[:mid])


def _disagree(pair: tuple[float, float]) -> bool:
    lo, hi = min(pair), max(pair)
    return lo <= 0 or (hi - lo) / lo > NOISE_TOLERANCE


# ------------------------------------------------------------------------------------ measurement


def _as_layout(model: nn.Module, x: torch.Tensor, layout: str) -> tuple[nn.Module, torch.Tensor]:
    fmt = LAYOUTS[layout] if x.dim() == 4 else torch.contiguous_format  # tokens have no channels-last form
    return model.to(memory_format=fmt), x.contiguous(memory_format=fmt)


def _probe_layouts(model: nn.Module, x: torch.Tensor, runs: int, warmup: int,
                   device: torch.device) -> tuple[str, dict[str, float]]:
    """The layout in which ``model`` runs batch ``x`` fastest (median of a short run per layout)."""
    def timed(layout: str) -> float:
        m, xl = _as_layout(model, x, layout)
        return statistics.median(forward_times(lambda: m(xl), runs, warmup, device))

    probe = {layout: timed(layout) for layout in LAYOUTS}
    return min(probe, key=probe.__getitem__), probe


@dataclass(frozen=True)
class Layouts:
    """The memory layout used at batch 1 and at the throughput batch, and the probes behind them."""

    latency: str = "contiguous"
    throughput: str = "contiguous"
    latency_probe_ms: dict[str, float] = field(default_factory=dict)
    throughput_probe_ms: dict[str, float] = field(default_factory=dict)


def measure_callable(latency_run: Callable[[], object], throughput_run: Callable[[], object],
                     input_shape: Sequence[int], plan: TimingPlan, *, name: str, runtime: str,
                     device: torch.device | str = "cpu", layouts: Layouts = Layouts()) -> InferenceMeasurement:
    """Time ``latency_run`` (one batch-1 forward) and ``throughput_run`` (one forward of
    ``plan.batch_size`` images); every runtime (eager PyTorch, an exported program, an ONNX Runtime
    session) goes through this one path, so their figures mean the same thing."""
    device = torch.device(device)
    with cpu_threads(plan.threads) as threads:
        lat = forward_times(latency_run, plan.runs, plan.warmup, device)
        thr_ms = forward_times(throughput_run, plan.throughput_runs, plan.throughput_warmup, device)
    ips = [plan.batch_size * 1e3 / t for t in thr_ms]
    lat_halves, ips_halves = _halves(lat), _halves(ips)
    return InferenceMeasurement(
        name=name, runtime=runtime, device=str(device), device_name=device_name(device), threads=threads,
        timer="cuda events" if device.type == "cuda" else "perf_counter", layout=layouts.latency,
        layout_probe_ms=dict(layouts.latency_probe_ms), throughput_layout=layouts.throughput,
        throughput_layout_probe_ms=dict(layouts.throughput_probe_ms), input_shape=tuple(input_shape),
        latency_runs=len(lat), latency_ms_median=statistics.median(lat), latency_ms_p90=_p90(lat),
        latency_halves_ms=lat_halves, throughput_batch=plan.batch_size, throughput_runs=len(ips),
        throughput_ips=statistics.median(ips), throughput_halves_ips=ips_halves,
        noisy=_disagree(lat_halves) or _disagree(ips_halves))


def random_input(input_shape: Sequence[int], batch: int, device: torch.device | str = "cpu",
                 layout: str = "contiguous") -> torch.Tensor:
    """A fixed random batch: speed does not depend on the values, repeatability does."""
    x = torch.randn(batch, *input_shape, generator=torch.Generator().manual_seed(batch))
    return x.to(device).contiguous(memory_format=LAYOUTS[layout] if x.dim() == 4 else torch.contiguous_format)


def choose_layouts(model: nn.Module, input_shape: Sequence[int], plan: TimingPlan,
                   device: torch.device) -> Layouts:
    """The faster layout at batch 1 and at the throughput batch, each by a short measurement
    (depthwise and 1x1 convolutions, for one, favour channels-last on CPU at some sizes only)."""
    with cpu_threads(plan.threads), torch.inference_mode():
        lat, lat_probe = _probe_layouts(model, random_input(input_shape, 1, device), plan.probe_runs, 3, device)
        thr, thr_probe = _probe_layouts(model, random_input(input_shape, plan.batch_size, device),
                                        plan.throughput_probe_runs, 1, device)
    return Layouts(lat, thr, lat_probe, thr_probe)


def measure_inference(model: nn.Module, input_shape: Sequence[int], plan: TimingPlan = TimingPlan(), *,
                      name: str = "model", device: torch.device | str = "cpu", layout: str = "auto",
                      deploy: bool = True, runtime: str = "eager") -> InferenceMeasurement:
    """Batch-1 latency and large-batch throughput of ``model`` (its deploy form unless
    ``deploy=False``; ``model`` itself is never changed) on ``device``, in ``layout`` or, with
    ``"auto"``, in the faster of the two layouts for each batch size on this device."""
    device = torch.device(device)
    if layout not in (*LAYOUTS, "auto"):
        raise ValueError(f"unknown layout {layout!r}; valid: auto, {', '.join(LAYOUTS)}")
    model = (deploy_form(model) if deploy else copy.deepcopy(model)).to(device)  # layouts change the copy only
    chosen = choose_layouts(model, input_shape, plan, device) if layout == "auto" else Layouts(layout, layout)
    m1, x1 = _as_layout(model, random_input(input_shape, 1, device), chosen.latency)
    mb = m1 if chosen.throughput == chosen.latency else copy.deepcopy(m1)
    mb, xb = _as_layout(mb, random_input(input_shape, plan.batch_size, device), chosen.throughput)
    with torch.inference_mode():  # entered once: no per-forward context cost in the figures
        return measure_callable(lambda: m1(x1), lambda: mb(xb), input_shape, plan, name=name, runtime=runtime,
                                device=device, layouts=chosen)


def fastest_layout(model: nn.Module, input_shape: Sequence[int], batch: int, device: torch.device,
                   threads: int | None = None) -> str:
    """The memory layout ``model`` (already in deploy form) runs a ``batch`` fastest in."""
    with cpu_threads(threads), torch.inference_mode():
        x = random_input(input_shape, batch, device)
        return _probe_layouts(copy.deepcopy(model).to(device), x, 10 if batch == 1 else 3, 3 if batch == 1 else 1,
                              device)[0]


def latency_table(items: Sequence[tuple[nn.Module, Sequence[int]]], layouts: dict[int, str], device: torch.device,
                  threads: int | None = None, rounds: int = 3) -> list[dict[str, float]]:
    """Milliseconds of one forward of each ``(model in deploy form, input shape)`` at each batch
    size of ``layouts`` (in that layout): the figures a budgeted choice adds up, block by block.

    Every item is timed in ``rounds`` interleaved rounds and keeps its fastest round's median, so a
    burst of other load on the machine slows one round of every item alike instead of inflating
    some items and not others (parts that outweigh their whole)."""
    prepared = []
    for model, shape in items:
        per_batch = {}
        for batch, layout in layouts.items():
            per_batch[batch] = _as_layout(copy.deepcopy(model).to(device), random_input(shape, batch, device), layout)
        prepared.append(per_batch)
    best: list[dict[str, float]] = [{str(b): float("inf") for b in layouts} for _ in items]
    with cpu_threads(threads), torch.inference_mode():
        for _ in range(rounds):
            for row, per_batch in zip(best, prepared):
                for batch, (m, x) in per_batch.items():
                    runs, warmup = (15, 3) if batch == 1 else (4, 1)
                    row[str(batch)] = min(row[str(batch)], statistics.median(
                        forward_times(functools.partial(m, x), runs, warmup, device)))
    return best


# ------------------------------------------------------------------------------------ comparison


def speed_line(teacher: InferenceMeasurement, student: InferenceMeasurement) -> str:
    """One honest sentence: how fast the student is against the teacher, slower included."""
    ratio = teacher.latency_ms_median / student.latency_ms_median
    thr = student.throughput_ips / teacher.throughput_ips
    head = (f"student is {ratio:.2f}x faster than the teacher" if ratio >= 1
            else f"student is {ratio:.2f}x as fast as the teacher")
    line = (f"{head} at batch 1 on {student.where()} ({student.latency_ms_median:.3f} ms vs "
            f"{teacher.latency_ms_median:.3f} ms, {student.runtime}); {thr:.2f}x the teacher's throughput at "
            f"batch {student.throughput_batch}")
    if teacher.noisy or student.noisy:
        line += " [noisy: two halves of a measurement differ by more than 10 %]"
    return line


def compare(teacher: InferenceMeasurement, student: InferenceMeasurement) -> Comparison:
    return Comparison(teacher, student, teacher.latency_ms_median / student.latency_ms_median,
                      student.throughput_ips / teacher.throughput_ips, teacher.noisy or student.noisy,
                      speed_line(teacher, student))


def teacher_block(teacher: nn.Module, spec: BlockSpec) -> nn.Module:
    """The teacher's members of ``spec`` as one module (they form a chain, see surgery)."""
    members = [teacher.get_submodule(m) for m in spec.members]
    return members[0] if len(members) == 1 else nn.Sequential(*members)


def measure_blocks(teacher: nn.Module, student: nn.Module, blocks: Sequence[BlockSpec], indices: Sequence[int],
                   plan: TimingPlan = TimingPlan(), device: torch.device | str = "cpu") -> list[BlockInference]:
    """Each replaced block (``indices``: the accepted ones) against the teacher's, on its real
    input shape: where the student's time goes, block by block."""
    by_index = {b.index: b for b in blocks}
    out = []
    for i in indices:
        spec = by_index[i]
        t = measure_inference(teacher_block(teacher, spec), spec.in_shape, plan, name=f"teacher block {i}",
                              device=device)
        s = measure_inference(student.get_submodule(spec.members[0]), spec.in_shape, plan,
                              name=f"student block {i}", device=device)
        out.append(BlockInference(i, spec.name, tuple(spec.in_shape), compare(t, s)))
    return out


def measure_models(teacher: nn.Module, student: nn.Module, input_shape: Sequence[int],
                   plan: TimingPlan = TimingPlan(), device: torch.device | str = "cpu",
                   blocks: Sequence[BlockSpec] = (), accepted: Sequence[int] = ()) -> InferenceReport:
    """Teacher against student, whole models and (when ``blocks`` are given) each accepted block:
    what ``report.json`` and ``summary.txt`` carry."""
    t = measure_inference(teacher, input_shape, plan, name="teacher", device=device)
    s = measure_inference(student, input_shape, plan, name="student", device=device)
    per_block = measure_blocks(teacher, student, blocks, accepted, plan, device) if blocks else []
    return InferenceReport(compare(t, s), tuple(per_block))


def model_size(model: nn.Module, input_shape: Sequence[int]) -> ModelSize:
    """Parameters, convolution parameters and MACs per image: what the report compares."""
    return ModelSize(sum(p.numel() for p in model.parameters()), conv_params(model), total_macs(model, input_shape))
