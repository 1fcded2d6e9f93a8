"""Model surgery: find a teacher's replaceable blocks, tap their inputs/targets, swap students in.

Everything here works on any ``nn.Module`` by tracing one forward pass with hooks: which modules
run, in which order, and which tensor flows from one to the next. No per-architecture code.

A block is a run of modules executed one after another (``members``) whose first member's input is
the block input and whose last member's output is the block target. At ``unit`` granularity a block
is one repeated unit of the network (a ResNet bottleneck, an inverted residual, a ConvNeXt or Swin
block, a ViT encoder block), recognised by what it does in a traced forward (see ``_unit_modules``).
Block tensors are image maps (C, H, W), channels-last maps (H, W, C) or token sequences (N, D). Swapping a student in puts it
at the first member's place and ``nn.Identity`` at the others, which is exact because the members
form a chain.
"""
from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass

import torch
import torch.fx
from torch import nn

POOLING = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)


@dataclass(frozen=True)
class BlockSpec:
    """One replaceable block of a teacher, described by what the toolkit needs to plan and build."""

    index: int
    name: str                      # the first member's module path
    members: tuple[str, ...]       # module paths in execution order
    in_shape: tuple[int, ...]      # the block input of one image, laid out as ``layout`` says
    out_shape: tuple[int, ...]
    stride: int
    params: int                    # teacher parameters in the block
    macs: int                      # teacher multiply-accumulates per image in the block
    prefix_macs: int               # teacher MACs per image up to and including this block
    nonnegative_output: bool       # target is post-ReLU (students may end in a ReLU)
    relu_after: bool = False       # the teacher's next op is a ReLU on this output and nothing else
    layout: str = "chw"            # chw: (C, H, W) maps; hwc: channels-last (H, W, C); tokens: (N, D)

    @property
    def channels(self) -> tuple[int, int]:
        """Input and output channels (features, for tokens): where ``layout`` keeps them."""
        at = 0 if self.layout == "chw" else -1
        return self.in_shape[at], self.out_shape[at]

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class _Call:
    name: str
    module: nn.Module
    inp: torch.Tensor | None
    out: torch.Tensor | None
    macs: int
    nonnegative: bool  # taken when produced: later in-place ops (ReLU(inplace)) change the values
    out_value: torch.Tensor | None = None  # copies at call time (in-place ops change the originals)
    inp_value: torch.Tensor | None = None


def _is_leaf(module: nn.Module) -> bool:
    return next(module.children(), None) is None


def _module_macs(module: nn.Module, out: torch.Tensor) -> int:
    """Multiply-accumulates of one call, per image (``out[0]``: one image of the traced batch)."""
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        return out[0].numel() * (module.in_channels // module.groups) * kh * kw
    if isinstance(module, nn.Linear):
        return out[0].numel() * module.in_features
    return 0


def _attention_macs(module: nn.MultiheadAttention, inp: torch.Tensor) -> int:
    """Per image: the q/k/v and output projections and the two L x L products (its functional
    forward never calls its ``out_proj`` module, so the Linear rule above does not see them)."""
    length = inp.shape[0] if not module.batch_first and inp.dim() == 3 else inp.shape[-2]
    e = module.embed_dim
    return int(length * 4 * e * e + 2 * length * length * e)


def _trace(model: nn.Module, input_shape: Sequence[int]) -> list[_Call]:
    """Leaf modules in execution order with the tensors they consumed and produced (batch of 2)."""
    calls: list[_Call] = []
    handles = []
    inputs: list[torch.Tensor | None] = []  # the input's values before the call (pre-hook)
    attention = [n for n, m in model.named_modules() if n and isinstance(m, nn.MultiheadAttention)]
    for name, module in model.named_modules():
        # an attention layer is timed whole: its forward uses its projection weights directly
        if name and (_is_leaf(module) or name in attention) and not any(name.startswith(a + ".") for a in attention):
            def pre_hook(mod, args):
                first = args[0] if args and isinstance(args[0], torch.Tensor) else None
                inputs.append(first.clone() if first is not None else None)

            def hook(mod, args, out, name=name):
                inp = args[0] if args and isinstance(args[0], torch.Tensor) else None
                tensor_out = out if isinstance(out, torch.Tensor) else None
                macs = _module_macs(mod, tensor_out) if tensor_out is not None else 0
                if isinstance(mod, nn.MultiheadAttention) and inp is not None:
                    macs = _attention_macs(mod, inp)
                calls.append(_Call(name, mod, inp, tensor_out, macs,
                                   tensor_out is not None and bool((tensor_out >= 0).all()),
                                   tensor_out.clone() if tensor_out is not None else None, inputs.pop()))
            handles.append(module.register_forward_pre_hook(pre_hook))
            handles.append(module.register_forward_hook(hook))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            gen = torch.Generator().manual_seed(0)
            model(torch.randn(2, *input_shape, generator=gen))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return calls


def _is_block_conv(module: nn.Module) -> bool:
    """A 3x3 convolution, dense or grouped (ResNeXt, RegNet), not depthwise (nothing to factorise)."""
    return isinstance(module, nn.Conv2d) and module.kernel_size == (3, 3) \
        and (module.groups == 1 or module.groups < module.in_channels)


def _conv_blocks(calls: list[_Call]) -> list[list[int]]:
    """Each 3x3 dense conv, with the BatchNorm2d that consumes its output when there is one."""
    groups = []
    for i, call in enumerate(calls):
        if _is_block_conv(call.module):
            group = [i]
            nxt = calls[i + 1] if i + 1 < len(calls) else None
            if nxt is not None and isinstance(nxt.module, nn.BatchNorm2d) and nxt.inp is call.out:
                group.append(i + 1)
            groups.append(group)
    return groups


def _shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(int(d) for d in t.shape[1:])


def _layout(t: torch.Tensor, first: nn.Module) -> str:
    """How a block's tensor is laid out, from its shape and the first layer that reads it: a
    channels-last map is normalised or projected over its last axis (Swin's LayerNorm, Linear)."""
    if t.dim() == 3:
        return "tokens"
    last = t.shape[-1]
    if (isinstance(first, nn.LayerNorm) and tuple(first.normalized_shape) == (last,)) \
            or (isinstance(first, nn.Linear) and first.in_features == last):
        return "hwc"
    return "chw"


def _stride(inp: torch.Tensor, out: torch.Tensor, layout: str) -> int:
    if layout == "tokens":
        return 1
    axis = -1 if layout == "chw" else -2  # the width axis
    return max(1, inp.shape[axis] // out.shape[axis])


def _parent(name: str) -> str:
    return name.rsplit(".", 1)[0] if "." in name else ""


CONTAINERS = (nn.Sequential, nn.ModuleList)


@dataclass(frozen=True)
class _Seen:
    """What one module did in a traced forward: how often it ran, whether every call took exactly
    one tensor and returned one, and its first call's output."""

    calls: int
    single: bool
    out: torch.Tensor | None


def _observe(model: nn.Module, input_shape: Sequence[int]) -> dict[str, _Seen]:
    """Every named module's calls in one forward (batch of 2, eval mode, no gradients)."""
    seen: dict[str, tuple[int, bool, torch.Tensor | None]] = {}
    handles = []
    for name, module in model.named_modules():
        if not name:
            continue

        def hook(mod, args, kwargs, out, name=name):
            calls, single, first = seen.get(name, (0, True, None))
            one = len(args) == 1 and not kwargs and isinstance(args[0], torch.Tensor) and isinstance(out, torch.Tensor)
            seen[name] = (calls + 1, single and one, first if calls else (out.clone() if one else None))
        handles.append(module.register_forward_hook(hook, with_kwargs=True))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.randn(2, *input_shape, generator=torch.Generator().manual_seed(0)))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return {n: _Seen(*v) for n, v in seen.items()}


def _is_stage(module: nn.Module) -> bool:
    """A container that holds composite modules (a stage of units), not a plain run of layers
    (conv-BN-activation, a patch embedding, a downsampling layer) that happens to be an nn.Sequential."""
    return isinstance(module, CONTAINERS) and any(not _is_leaf(c) for c in module.children())


def _unit_modules(model: nn.Module, input_shape: Sequence[int]) -> dict[str, torch.Tensor]:
    """The repeated units of any network, by what they do rather than by their class.

    A unit is a composite module (not itself a container) held in an nn.Sequential or nn.ModuleList
    that ran exactly once in a forward, taking one tensor and returning one. A container holds units
    only when none of its children is a stage: in Swin's ``features`` the patch-merging layers sit
    between stages of blocks and are not units, while MobileNet's ``features`` holds its inverted
    residuals between plain conv-BN-activation layers. The outermost such modules are the units
    (an EfficientNet MBConv, not the squeeze-excitation inside it).
    """
    seen = _observe(model, input_shape)
    units: dict[str, torch.Tensor] = {}  # name: its output in the traced forward
    for name, module in model.named_modules():
        parent = _parent(name)
        holder = model.get_submodule(parent) if parent else model
        if not name or _is_leaf(module) or isinstance(module, CONTAINERS) or not isinstance(holder, CONTAINERS):
            continue
        if any(_is_stage(c) for c in holder.children()) or any(name.startswith(u + ".") for u in units):
            continue
        s = seen.get(name)
        if s is not None and s.calls == 1 and s.single and s.out is not None and s.out.dim() in (3, 4):
            units[name] = s.out
    return units


def _stage_blocks(calls: list[_Call]) -> list[list[int]]:
    """VGG stages: chains of sibling layers between poolings, from a 3x3 conv to the last BN/conv."""
    groups: list[list[int]] = []
    i = 0
    while i < len(calls):
        if not _is_block_conv(calls[i].module):
            i += 1
            continue
        parent, chain, j = _parent(calls[i].name), [i], i + 1
        while j < len(calls) and _parent(calls[j].name) == parent and calls[j].inp is calls[j - 1].out \
                and not isinstance(calls[j].module, POOLING):
            chain.append(j)
            j += 1
        while len(chain) > 1 and not isinstance(calls[chain[-1]].module, (nn.BatchNorm2d, nn.Conv2d)):
            chain.pop()  # end on a pre-activation, the trailing ReLU stays in the network
        groups.append(chain)
        i = chain[-1] + 1
    return groups


def find_blocks(model: nn.Module, input_shape: Sequence[int], granularity: str = "conv") -> list[BlockSpec]:
    """Describe the replaceable blocks of ``model`` for inputs of shape ``input_shape`` (C, H, W)."""
    calls = _trace(model, input_shape)
    spans: list[tuple[tuple[str, ...], int, int]] = []  # members, first call, last call
    unit_outputs: dict[str, torch.Tensor] = {}
    if granularity == "conv":
        for group in _conv_blocks(calls):
            spans.append((tuple(calls[k].name for k in group), group[0], group[-1]))
    elif granularity == "unit":
        units = unit_outputs = _unit_modules(model, input_shape)
        if units:
            for unit in units:
                idx = [k for k, c in enumerate(calls) if c.name.startswith(unit + ".")]
                spans.append(((unit,), idx[0], idx[-1]))
        else:
            for group in _stage_blocks(calls):
                spans.append((tuple(calls[k].name for k in group), group[0], group[-1]))
    else:
        raise ValueError(f"unknown granularity {granularity!r}; valid: conv, unit")

    blocks: list[BlockSpec] = []
    cumulative = [0]
    for call in calls:
        cumulative.append(cumulative[-1] + call.macs)
    for members, first, last in spans:
        inside = [k for k, c in enumerate(calls) if any(c.name == m or c.name.startswith(m + ".") for m in members)]
        if any(k < first or k > last for k in inside):
            continue  # a module also run outside the block cannot be replaced by one student
        inp, out, nonnegative = calls[first].inp, calls[last].out, calls[last].nonnegative
        if members[0] in unit_outputs:
            # the unit's own output is what the next module consumes, not its last leaf's output
            out = unit_outputs[members[0]]
            nonnegative = bool((out >= 0).all())
        if inp is None or out is None or inp.dim() not in (3, 4) or out.dim() != inp.dim():
            continue
        layout = _layout(inp, calls[first].module)
        params = sum(p.numel() for m in members for p in model.get_submodule(m).parameters())
        stride = _stride(inp, out, layout)
        nxt = calls[last + 1] if last + 1 < len(calls) and out is calls[last].out else None
        out_value = calls[last].out_value
        relu_after = (nxt is not None and isinstance(nxt.module, nn.ReLU) and nxt.inp is out
                      and nxt.inp_value is not None and out_value is not None and torch.equal(nxt.inp_value, out_value))
        blocks.append(BlockSpec(
            index=len(blocks), name=members[0], members=members,
            in_shape=_shape(inp), out_shape=_shape(out), stride=stride,
            params=params, macs=cumulative[last + 1] - cumulative[first],
            prefix_macs=cumulative[last + 1], nonnegative_output=nonnegative, relu_after=relu_after,
            layout=layout,
        ))
    if not blocks:
        raise ValueError(f"found no replaceable blocks (granularity {granularity!r}) in {type(model).__name__}")
    return blocks


def total_macs(model: nn.Module, input_shape: Sequence[int]) -> int:
    """Conv + linear multiply-accumulates per image (each call's ``macs`` is already per image)."""
    return sum(c.macs for c in _trace(model, input_shape))


def conv_params(model: nn.Module) -> int:
    """Parameters in convolutions (the paper's compression measure)."""
    return sum(p.numel() for m in model.modules() if isinstance(m, nn.Conv2d) for p in m.parameters())


class _StopForward(Exception):
    """Raised from a hook to end a teacher pass once the deepest needed block has run."""


class BlockTap:
    """Capture the inputs and targets of chosen blocks in one (truncated) teacher forward.

    ``tap(x)`` runs ``model`` on ``x`` only as deep as the deepest tapped block and returns
    ``{block index: (input, target)}``. Tensors are cloned because later in-place ops (ReLU(inplace),
    residual ``+=``) would otherwise overwrite them; the clone also puts 4-d tensors in
    ``memory_format`` (the layout the students train in) at no extra cost.
    """

    def __init__(self, model: nn.Module, blocks: Sequence[BlockSpec],
                 memory_format: torch.memory_format = torch.preserve_format,
                 clock: Callable[[], float] | None = None) -> None:
        self.model = model
        self.blocks = list(blocks)
        self.memory_format = memory_format
        self.clock = clock  # if given, ``stamps[index]`` = its time once a block's target is taken
        self.stamps: dict[int, float] = {}
        self._inputs: dict[int, torch.Tensor] = {}
        self._targets: dict[int, torch.Tensor] = {}

    def __call__(self, x: torch.Tensor) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        if not self.blocks:
            return {}
        self._inputs, self._targets = {}, {}

        def keep(t: torch.Tensor) -> torch.Tensor:
            return t.detach().clone(memory_format=self.memory_format if t.dim() == 4 else torch.preserve_format)

        remaining = {b.index for b in self.blocks}
        handles = []

        def pre_hook(index):
            def hook(module, args):
                self._inputs[index] = keep(args[0])
            return hook

        def post_hook(index):
            def hook(module, args, out):
                self._targets[index] = keep(out)
                if self.clock is not None:
                    self.stamps[index] = self.clock()
                remaining.discard(index)
                if not remaining:
                    raise _StopForward
            return hook

        for b in self.blocks:
            handles.append(self.model.get_submodule(b.members[0]).register_forward_pre_hook(pre_hook(b.index)))
            handles.append(self.model.get_submodule(b.members[-1]).register_forward_hook(post_hook(b.index)))
        try:
            with torch.no_grad():
                self.model(x)
        except _StopForward:
            pass
        finally:
            for h in handles:
                h.remove()
        return {i: (self._inputs[i], self._targets[i]) for i in self._targets}


def replace_blocks(model: nn.Module, replacements: dict[int, nn.Module], blocks: Sequence[BlockSpec]) -> nn.Module:
    """Put ``replacements[index]`` in place of each block, in ``model`` itself; returns ``model``."""
    by_index = {b.index: b for b in blocks}
    for index, student in replacements.items():
        spec = by_index[index]
        model.set_submodule(spec.members[0], student)
        for member in spec.members[1:]:
            model.set_submodule(member, nn.Identity())
    return model


def assemble(teacher: nn.Module, replacements: dict[int, nn.Module], blocks: Sequence[BlockSpec]) -> nn.Module:
    """A new model: the teacher with students swapped in (the teacher is left untouched)."""
    return replace_blocks(copy.deepcopy(teacher), {i: copy.deepcopy(s) for i, s in replacements.items()}, blocks)


class SwappedForward:
    """Teacher outputs with one block swapped for its student, for several blocks at once.

    Checking a student means running the teacher with that block swapped in. Run separately, every
    check repeats the teacher's unchanged prefix up to its block: for a deep network, most of the
    work. This is PBKD's own argument applied to validation: the teacher is traced once with
    ``torch.fx`` (block members as leaves), and ``forward(x, students)`` runs the shared prefix once,
    as deep as the deepest block asked for, keeping only the values some block's suffix still reads;
    then, per block, the suffix from that block on with the student in its place (looked up at call
    time through :func:`swapped`, so the result is that of the swapped model). A model ``torch.fx``
    cannot trace falls back to one full forward per block (``shares_prefix`` is then False).
    """

    def __init__(self, model: nn.Module, blocks: Sequence[BlockSpec]) -> None:
        self.model = model
        self.blocks = {b.index: b for b in blocks}
        self.shares_prefix = False
        self.reason = ""
        members = {m for b in blocks for m in b.members}

        class _Tracer(torch.fx.Tracer):
            def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
                return qualname in members or super().is_leaf_module(m, qualname)

        try:
            graph = _Tracer().trace(model)
        except Exception as exc:  # data-dependent control flow and the like: run whole forwards
            self.reason = f"torch.fx cannot trace {type(model).__name__}: {exc}"
            return
        self.nodes = list(graph.nodes)
        pos = {n: k for k, n in enumerate(self.nodes)}
        if [n.op for n in self.nodes].count("placeholder") != 1:
            self.reason = "the model takes more than one input"
            return
        self.start: dict[int, int] = {}
        for b in blocks:
            first = next((k for k, n in enumerate(self.nodes)
                          if n.op == "call_module" and n.target == b.members[0]), None)
            if first is None:
                self.reason = f"block {b.index} ({b.name}) is not a module call in the traced graph"
                return
            self.start[b.index] = first
        # the values computed before a block that the rest of the network reads: all a suffix needs
        self.cut = {i: [n for n in self.nodes[:s] if any(pos[u] >= s for u in n.users)]
                    for i, s in self.start.items()}
        self.last_use = {n: max((pos[u] for u in n.users), default=pos[n]) for n in self.nodes}
        self.shares_prefix = True

    def _run(self, node: torch.fx.Node, env: dict) -> object:
        args = torch.fx.node.map_arg(node.args, env.__getitem__)
        kwargs = torch.fx.node.map_arg(node.kwargs, env.__getitem__)
        target = node.target
        if node.op == "call_function" and callable(target):
            return target(*args, **kwargs)
        assert isinstance(target, str)  # modules, methods and attributes are named
        if node.op == "call_module":
            return self.model.get_submodule(target)(*args, **kwargs)
        if node.op == "call_method":
            return getattr(args[0], target)(*args[1:], **kwargs)
        if node.op == "get_attr":
            obj: object = self.model
            for part in target.split("."):
                obj = getattr(obj, part)
            return obj
        raise RuntimeError(f"unexpected node {node.op} in the traced teacher")

    def _execute(self, nodes_from: int, nodes_to: int, env: dict, keep: set) -> object:
        for k in range(nodes_from, nodes_to):
            node = self.nodes[k]
            if node.op == "output":
                return torch.fx.node.map_arg(node.args[0], env.__getitem__)
            env[node] = self._run(node, env)
            for used in (*node.all_input_nodes, node):
                if self.last_use[used] <= k and used not in keep:
                    env.pop(used, None)  # free activations as soon as nothing reads them
        return None

    def __call__(self, x: torch.Tensor, students: dict[int, nn.Module]) -> dict[int, torch.Tensor]:
        """``{block index: output of the teacher with that block swapped for students[index]}``."""
        order = sorted(students)
        return dict(zip(order, self.run(x, [(i, students[i]) for i in order])))

    def run(self, x: torch.Tensor, swaps: Sequence[tuple[int, nn.Module]]) -> list[torch.Tensor]:
        """The teacher's output with each ``(block index, student)`` of ``swaps`` swapped in alone,
        in the order given (several students of one block share its prefix too)."""
        order = sorted(range(len(swaps)), key=lambda j: swaps[j][0])
        outputs: list = [None] * len(swaps)
        if not self.shares_prefix:
            for j in order:
                with swapped(self.model, self.blocks[swaps[j][0]], swaps[j][1]):
                    outputs[j] = self.model(x)
            return outputs
        blocks = [swaps[j][0] for j in order]
        env: dict = {self.nodes[0]: x}
        self._execute(1, max(self.start[i] for i in blocks), env, {n for i in blocks for n in self.cut[i]})
        for pos, j in enumerate(order):
            i, student = swaps[j]
            later = {n for k in blocks[pos + 1:] for n in self.cut[k]}
            # a suffix may modify its inputs in place (ReLU(inplace), residual +=): copy what later
            # blocks still read
            local = {n: env[n].clone() if n in later and isinstance(env[n], torch.Tensor) else env[n]
                     for n in self.cut[i]}
            with swapped(self.model, self.blocks[i], student):
                outputs[j] = self._execute(self.start[i], len(self.nodes), local, set())
        return outputs


@contextlib.contextmanager
def swapped(model: nn.Module, spec: BlockSpec, student: nn.Module) -> Iterator[nn.Module]:
    """Temporarily run ``model`` with ``student`` in place of one block (for swapped accuracy)."""
    originals = [model.get_submodule(m) for m in spec.members]
    replace_blocks(model, {spec.index: student}, [spec])
    try:
        yield model
    finally:
        for member, module in zip(spec.members, originals):
            model.set_submodule(member, module)
