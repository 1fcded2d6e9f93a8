"""Whole-unit students (#22): ``skip`` (the unit removed) and ``shrink-w<f>`` (the unit narrowed).

``shrink`` cuts a unit's internal widths (bottleneck and expansion channels, MLP hidden sizes) with
Torch-Pruning's dependency graph (``torch_pruning``, extra ``prune``): it traces the unit, couples
every layer whose channels must be cut together (a conv, its BatchNorm, the next layer's inputs,
residual adds, layer-scale parameters) and removes the least important channels by their weights'
magnitude, for any architecture without per-class code, which is why it was chosen over hand-written
rules. Which widths are internal is found by probing, not by class: a layer whose channels cannot
be cut without changing the unit's output shape (or breaking its forward: attention that reshapes
by head count) is kept whole. The result is the teacher's own module class, narrower, initialised
from the teacher's weights; it is a pure function of the teacher's weights, so it is rebuilt the
same way when a checkpoint is loaded.
"""
from __future__ import annotations

import contextlib
import copy
import signal
import threading
import warnings
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from hpc_bkd.blocks.surgery import BlockSpec

ROOTS = (nn.Conv2d, nn.Linear)
# Torch-Pruning's index mapping through some reshapes (Swin's window partition of a qkv projection)
# runs for minutes; a cut it cannot resolve within this many seconds is treated as not internal.
PROBE_SECONDS = 5


class _TooSlow(Exception):
    pass


@contextlib.contextmanager
def _time_limit(seconds: int) -> Iterator[None]:
    """Raise ``_TooSlow`` in the block after ``seconds`` (main thread only: elsewhere, no limit)."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "SIGALRM"):
        yield
        return

    def expire(signum, frame):
        raise _TooSlow

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


class NotApplicable(ValueError):
    """A candidate kind that does not fit a block (left out for it, said once in the log)."""


class Bypass(nn.Module):
    """The unit removed: its input passed on. It holds one parameter, fixed at 0 (its gradient is
    0), so the trainer, the cost measurement and the checkpoints treat it as any student (something
    with a parameter to step); in eval mode it returns its input itself, so the deploy form, the
    latency the choice adds up and the exported files have no operation at all where it stands (a
    learned offset here cost an elementwise add over the whole map: ~0.1 s per batch of 64 on
    ResNet50's 256x32x32 maps on a 2-core CPU)."""

    def __init__(self) -> None:
        super().__init__()
        self.offset = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        return x + 0.0 * self.offset  # in the graph for autograd, never learned: exactly x


def skip_layers(spec: BlockSpec) -> list[nn.Module]:
    """Nothing where the block keeps its shape; else the cheapest layer that gives its shape."""
    if tuple(spec.in_shape) == tuple(spec.out_shape):
        return [Bypass()]
    c_in, c_out = spec.channels
    if spec.layout == "chw":
        layers: list[nn.Module] = [nn.Conv2d(c_in, c_out, 1, stride=spec.stride, bias=False), nn.BatchNorm2d(c_out)]
    elif spec.in_shape[:-1] == spec.out_shape[:-1]:  # tokens or a channels-last map with only new features
        layers = [nn.Linear(c_in, c_out), nn.LayerNorm(c_out)]
    else:
        raise NotApplicable(f"skip: no linear map gives {spec.out_shape} from {spec.in_shape} ({spec.layout})")
    return layers + ([nn.ReLU(inplace=True)] if spec.nonnegative_output else [])


def _prune_out(layer: nn.Module):
    import torch_pruning as tp
    return tp.prune_conv_out_channels if isinstance(layer, nn.Conv2d) else tp.prune_linear_out_channels


def _width(layer: nn.Module) -> int:
    return int(layer.out_channels if isinstance(layer, nn.Conv2d) else layer.out_features)  # type: ignore[arg-type]


def _example(spec: BlockSpec) -> torch.Tensor:
    return torch.randn(2, *spec.in_shape, generator=torch.Generator().manual_seed(0))


_PROBED: dict[tuple[str, tuple[int, ...]], list[str]] = {}  # by structure: units alike couple alike


def _kept_whole(unit: nn.Module, spec: BlockSpec, want: torch.Size) -> list[nn.Module]:
    """Layers of ``unit`` whose output channels are not internal: cutting one channel of them
    (with everything coupled to it) changes the unit's output shape or breaks its forward. Units
    of the same structure and input shape (the repeated units of a stage) are probed once."""
    key = (repr(unit), tuple(spec.in_shape))
    if key not in _PROBED:
        _PROBED[key] = _probe(unit, spec, want)
    return [unit.get_submodule(name) for name in _PROBED[key]]


def _probe(unit: nn.Module, spec: BlockSpec, want: torch.Size) -> list[str]:
    import torch_pruning as tp
    x = _example(spec)
    # a grouped (not depthwise) conv loses channels evenly from every group (ResNeXt)
    step = max([m.groups for m in unit.modules() if isinstance(m, nn.Conv2d) and 1 < m.groups < m.in_channels],
               default=1)
    kept = []
    for name, layer in unit.named_modules():
        if not isinstance(layer, ROOTS):
            continue
        probe = copy.deepcopy(unit)
        target = probe.get_submodule(name)
        try:
            with _time_limit(PROBE_SECONDS):
                graph = tp.DependencyGraph().build_dependency(probe, example_inputs=x, verbose=False)
                per_group = max(1, _width(target) // step)  # one channel of every group
                graph.get_pruning_group(target, _prune_out(target),
                                        idxs=list(range(0, step * per_group, per_group))).prune()
                with torch.no_grad():
                    internal = _width(target) > step and probe(x).shape == want
        except Exception:  # a forward the cut breaks, or a cut too slow to resolve: not a width to cut
            internal = False
        if not internal:
            kept.append(name)
    return kept


_SHRUNK: dict[tuple, nn.Module | NotApplicable] = {}  # probing is slow; the same unit is built many times


def built_units() -> dict[tuple, nn.Module | NotApplicable]:
    """Every narrowed unit (or why none) built in this process so far, by key: what rank 0 sends
    with the teacher so the other ranks need not probe and prune the same units again."""
    return dict(_SHRUNK)


def add_built_units(built: dict[tuple, nn.Module | NotApplicable]) -> None:
    """Take units another process built (``built_units``); a key this process computes differently
    is simply built again here."""
    _SHRUNK.update(built)


def shrink_unit(teacher: nn.Module, spec: BlockSpec, fraction: float) -> nn.Module:
    """The teacher's unit with every internal width cut to ``fraction``, by weight magnitude (a
    fresh copy each call; remembered by the unit's structure and a checksum of its values)."""
    source = teacher.get_submodule(spec.members[0]) if len(spec.members) == 1 else None
    values = () if source is None else tuple(float(t.detach().double().sum()) for t in source.state_dict().values())
    key = (repr(source), values, tuple(spec.in_shape), fraction)
    if key not in _SHRUNK:
        try:
            _SHRUNK[key] = _shrink_unit(teacher, spec, fraction)
        except NotApplicable as exc:
            _SHRUNK[key] = exc
    found = _SHRUNK[key]
    if isinstance(found, NotApplicable):
        raise found
    return copy.deepcopy(found).train()


def _shrink_unit(teacher: nn.Module, spec: BlockSpec, fraction: float) -> nn.Module:
    try:
        import torch_pruning as tp
    except ImportError:
        raise NotApplicable("shrink needs Torch-Pruning: pip install 'hpc_bkd[prune]'") from None
    if len(spec.members) != 1:
        raise NotApplicable("shrink takes a whole unit (blocks.granularity unit), not a run of layers")
    unit = copy.deepcopy(teacher.get_submodule(spec.members[0])).cpu().float().eval()
    for p in unit.parameters():
        p.requires_grad_(True)  # the dependency graph is traced through autograd
    x = _example(spec)
    with torch.no_grad():
        want = unit(x).shape
    kept = _kept_whole(unit, spec, want)
    if all(not isinstance(m, ROOTS) or m in kept for m in unit.modules()):
        raise NotApplicable("shrink: the unit has no internal width to cut")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "unwrapped parameters" (layer scales): pruned along their channels
        try:
            with _time_limit(6 * PROBE_SECONDS):
                pruner = tp.pruner.BasePruner(unit, x, importance=tp.importance.GroupMagnitudeImportance(p=2),
                                              pruning_ratio=1.0 - fraction, ignored_layers=kept)
                pruner.step()
        except _TooSlow:
            raise NotApplicable("shrink: Torch-Pruning could not cut this unit in time") from None
    with torch.no_grad():
        if unit(x).shape != want:
            raise NotApplicable(f"shrink: the pruned unit gives {tuple(unit(x).shape)}, not {tuple(want)}")
    return unit


def params_of(modules: Sequence[nn.Module]) -> int:
    return sum(p.numel() for m in modules for p in m.parameters())
