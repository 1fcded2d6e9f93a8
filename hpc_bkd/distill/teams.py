"""Data-parallel teams: several ranks share a group of blocks and split every batch.

Hybrid parallelism in one idea: the plan may give a group of blocks to a *team* of ranks instead
of one rank. Each member takes its slice of every batch, runs the teacher on it, and trains the
team's students on it; the members' gradients are summed (MPI allreduce) so every member takes the
same optimizer step, and BatchNorm statistics are computed over the whole team batch. The trained
blocks therefore equal a single rank's blocks for the same total batch (within float tolerance),
which is what keeps results independent of the plan.

Two ways to keep BatchNorm statistics placement-independent:

* ghost batches (``distill.bn_groups`` = G > 1, the default job's choice): every batch is cut into G
  fixed slices and each student BatchNorm normalises each slice on its own, on one rank or many. A
  team of up to G members gives each member whole slices, so members never talk about BatchNorm:
  one allreduce per step carries every student's gradients and BN running-statistic updates (like
  DDP without SyncBN, but with the same result as one rank).
* whole-batch statistics (G = 1): members exchange per-channel sums at every BatchNorm, forward and
  backward (``TeamBatchNorm2d``). Exact, but a round trip per layer; the planner charges for it.

A team's collectives (the step's allreduce, synced BatchNorm sums, the teacher cache's row
exchange) go through one of two transports, ``distill.team_backend``:

* ``mpi``: the team's MPI communicator; GPU tensors are staged through host memory (student
  gradients are small, so this costs little on CPUs and a PCIe round trip per step on GPUs).
* ``nccl`` (the default between GPU ranks) or ``gloo``: a ``torch.distributed`` process group of
  just the team, bootstrapped from MPI: the team leader opens a ``TCPStore`` on a free port and
  broadcasts its address over the team's communicator, so no ``MASTER_ADDR``/``MASTER_PORT``
  or launcher support is needed. Across nodes that address is one every member has just reached
  (not a host name that may resolve to loopback), and members that cannot meet fail within
  ``RENDEZVOUS_TIMEOUT_S`` naming it, never a silent hang. A rank belongs to at most one team, so the team's group is the
  process's default group.
"""
from __future__ import annotations

import os
import socket
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any

import torch
from torch import nn

from hpc_bkd.distributed.netaddr import LOOPBACK, interface_towards, offered_addresses, reachable
from hpc_bkd.errors import UserError

TORCH_BACKENDS = ("nccl", "gloo")
CPU = torch.device("cpu")


def team_backend(setting: str, device: torch.device) -> str:
    """The transport a team uses (``distill.team_backend``): ``auto`` means NCCL between GPU ranks
    and MPI between CPU ranks. Raises ValueError for NCCL on CPU ranks."""
    if setting == "auto":
        return "nccl" if device.type == "cuda" else "mpi"
    if setting == "nccl" and device.type != "cuda":
        raise ValueError(f"distill.team_backend: nccl needs GPU ranks, but this rank runs on {device}; "
                         "use mpi or gloo (or auto) on CPUs")
    return setting


RENDEZVOUS_TIMEOUT_S = 60.0  # members meeting the leader's store and each other, at most
PROBE_TIMEOUT_S = 5.0        # one member trying one of the leader's addresses


class TeamRendezvousError(UserError, RuntimeError):
    """A team's members cannot meet the leader: names the addresses and port tried and who failed."""


def _team_address(comm: Any, probe_s: float = PROBE_TIMEOUT_S) -> str:
    """Where members reach the leader's store: loopback when the team shares a node, else an
    address of the leader that every member has just connected to (``HPC_BKD_TEAM_ADDR``, the
    leader's, overrides the candidates, e.g. with an InfiniBand interface's IP). Raises
    ``TeamRendezvousError`` (on every member at once) when no candidate works for all."""
    host = socket.gethostname()
    seen = comm.allgather((host, os.environ.get("HPC_BKD_TEAM_ADDR")))
    leader_host, override = seen[0]  # the leader's word, whatever the members' environments say
    if not override and len({h for h, _ in seen}) == 1:
        return LOOPBACK
    listener, candidates = None, None
    if comm.rank == 0:
        candidates = [override] if override else offered_addresses(host)
        listener = socket.create_server(("", 0))  # a throwaway port, only to be connected to
    candidates, port = comm.bcast((candidates, listener.getsockname()[1] if listener else None), root=0)
    reached = comm.allgather(reachable(candidates, port, probe_s) if comm.rank or override else candidates)
    if listener is not None:
        listener.close()
    for addr in candidates:
        if all(addr in r for r in reached):
            return addr
    who = "; ".join(f"team rank {r} on {seen[r][0]} reaches {', '.join(a) or 'none'}" for r, a in enumerate(reached))
    raise TeamRendezvousError(
        f"team of {comm.size} ranks: no address of the leader (team rank 0, on {leader_host}) that every member "
        f"reaches: tried {', '.join(candidates) or 'no address'} on test port {port}, {probe_s:g}s each ({who}); "
        "set HPC_BKD_TEAM_ADDR to a leader address every member reaches, or use distill.team_backend=mpi")


def init_torch_group(comm: Any, backend: str, device: torch.device, timeout_s: float = 600.0,
                     rendezvous_s: float = RENDEZVOUS_TIMEOUT_S) -> None:
    """Make the team's ``torch.distributed`` process group (the default group of this process),
    bootstrapped from its MPI communicator ``comm``. The members meet within ``rendezvous_s`` or
    every one raises ``TeamRendezvousError`` naming the address and port; ``timeout_s`` bounds
    each collective afterwards."""
    import torch.distributed as dist

    addr = _team_address(comm)
    store, port = None, None
    if comm.rank == 0:  # port 0: the OS picks a free port, no race with other jobs on the node
        store = dist.TCPStore(addr, 0, comm.size, is_master=True, timeout=timedelta(seconds=rendezvous_s),
                              wait_for_workers=False)
        port = store.port
    port = comm.bcast(port, root=0)
    kwargs: dict[str, Any] = {"device_id": device} if backend == "nccl" else {}
    env_before = os.environ.get("GLOO_SOCKET_IFNAME")
    iface = interface_towards(addr) if addr != LOOPBACK and backend == "gloo" and env_before is None else None
    if iface:
        os.environ["GLOO_SOCKET_IFNAME"] = iface  # read when the group creates its device
    try:
        if store is None:
            store = dist.TCPStore(addr, port, comm.size, is_master=False, timeout=timedelta(seconds=rendezvous_s))
        dist.init_process_group(backend, store=store, rank=comm.rank, world_size=comm.size,
                                timeout=timedelta(seconds=timeout_s), **kwargs)
    except Exception as exc:
        raise TeamRendezvousError(f"team of {comm.size} ranks: rank {comm.rank} on {socket.gethostname()} could not "
                                  f"meet the team at {addr}:{port} within {rendezvous_s:g}s ({backend}"
                                  f"{', interface ' + iface if iface else ''}): {exc}") from exc
    finally:
        if iface:
            os.environ.pop("GLOO_SOCKET_IFNAME", None)


def group_bounds(n: int, groups: int) -> list[int]:
    """Row boundaries of the ``groups`` ghost-batch slices of a batch of ``n`` rows."""
    return [j * n // groups for j in range(groups + 1)]


class Transport:
    """How a team's members exchange tensors: the interface of the two transports below."""

    name = ""

    def allreduce_(self, tensor: torch.Tensor, op: str) -> None:
        """Reduce ``tensor`` over the team, in place (``op``: sum or max)."""
        raise NotImplementedError

    def allgather_rows_(self, tensor: torch.Tensor, bounds: list[int]) -> None:
        """Member k filled rows ``bounds[k]:bounds[k + 1]``; afterwards every member has all."""
        raise NotImplementedError

    def close(self) -> None:
        """Release what the transport holds (nothing by default)."""


class MpiTransport(Transport):
    """The team's MPI communicator; tensors off the CPU are staged through host memory (student
    gradients are small, so this costs little on CPUs and a PCIe round trip per step on GPUs)."""

    name = "mpi"

    def __init__(self, comm: Any) -> None:
        self.comm = comm

    def allreduce_(self, tensor: torch.Tensor, op: str) -> None:
        from mpi4py import MPI

        host = tensor.detach().to("cpu").contiguous()
        self.comm.Allreduce(MPI.IN_PLACE, host.numpy(), op=MPI.MAX if op == "max" else MPI.SUM)
        if host.data_ptr() != tensor.data_ptr():  # else reduced in place
            tensor.copy_(host)

    def allgather_rows_(self, tensor: torch.Tensor, bounds: list[int]) -> None:
        from mpi4py import MPI

        per_row = tensor[0].numel() if tensor.shape[0] else 0
        counts = [(bounds[k + 1] - bounds[k]) * per_row for k in range(len(bounds) - 1)]
        displs = [bounds[k] * per_row for k in range(len(bounds) - 1)]
        host = tensor.detach().to("cpu").contiguous()
        mpi_type = {torch.float32: MPI.FLOAT, torch.float64: MPI.DOUBLE}[host.dtype]
        self.comm.Allgatherv(MPI.IN_PLACE, [host.numpy().reshape(-1), (counts, displs), mpi_type])
        if host.data_ptr() != tensor.data_ptr():
            tensor.copy_(host)


class TorchTransport(Transport):
    """A ``torch.distributed`` group (NCCL: device to device; Gloo) of just the team."""

    def __init__(self, comm: Any, backend: str, device: torch.device) -> None:
        self.name = backend
        init_torch_group(comm, backend, device)

    def allreduce_(self, tensor: torch.Tensor, op: str) -> None:
        import torch.distributed as dist

        dist.all_reduce(tensor, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)

    def allgather_rows_(self, tensor: torch.Tensor, bounds: list[int]) -> None:
        import torch.distributed as dist

        for k in range(len(bounds) - 1):  # row blocks of uneven size: no padding, no second table
            if bounds[k + 1] > bounds[k]:
                dist.broadcast(tensor[bounds[k]:bounds[k + 1]], src=k)

    def close(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def make_transport(comm: Any, backend: str, device: torch.device) -> Transport:
    if backend == "mpi":
        return MpiTransport(comm)
    if backend in TORCH_BACKENDS:
        return TorchTransport(comm, backend, device)
    raise ValueError(f"unknown team backend {backend!r}; choose mpi, {', '.join(TORCH_BACKENDS)}")


class Team:
    """The MPI communicator of one team, this rank's place in it, and its transport."""

    def __init__(self, comm: Any, bn_groups: int = 1, backend: str = "mpi", device: torch.device = CPU) -> None:
        self.comm = comm
        self.rank = comm.rank
        self.size = comm.size
        self.bn_groups = bn_groups
        if 1 < bn_groups < self.size:
            raise ValueError(f"a team of {self.size} ranks cannot split {bn_groups} BatchNorm groups "
                             "(distill.bn_groups must be 1 or at least the team size)")
        self.transport = make_transport(comm, backend, device)

    @property
    def backend(self) -> str:
        return self.transport.name

    def close(self) -> None:
        """Tear down the team's transport (a torch.distributed group; nothing for MPI)."""
        self.transport.close()

    @property
    def is_leader(self) -> bool:
        return self.rank == 0

    @property
    def local_bn(self) -> bool:
        """Members hold whole ghost batches: no BatchNorm communication."""
        return self.bn_groups >= self.size > 1

    def groups(self) -> range:
        """The ghost-batch slices this member holds (all of them when BN statistics are synced)."""
        if not self.local_bn:
            return range(self.bn_groups)
        g = self.bn_groups
        return range(self.rank * g // self.size, (self.rank + 1) * g // self.size)

    def slice(self, n: int) -> slice:
        """This member's rows of a batch of ``n``: whole ghost batches, else balanced rows."""
        if self.local_bn:
            bounds, held = group_bounds(n, self.bn_groups), self.groups()
            return slice(bounds[held.start], bounds[held.stop])
        return slice(self.rank * n // self.size, (self.rank + 1) * n // self.size)

    def row_range(self, n: int) -> range:
        """This member's even share of ``n`` rows of a table every member needs whole (the teacher
        cache: each member computes its share, then ``allgather_rows_``)."""
        return range(self.rank * n // self.size, (self.rank + 1) * n // self.size)

    def allgather_rows_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every member filled its ``row_range`` of ``tensor`` (rows = first dimension); afterwards
        every member holds every row."""
        self.transport.allgather_rows_(tensor, group_bounds(tensor.shape[0], self.size))
        return tensor

    def allreduce_(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """In-place allreduce of a tensor in its own dtype."""
        self.transport.allreduce_(tensor, op)
        return tensor


class StepBucket:
    """Everything a team sums at each step, in one flat buffer: one allreduce, nothing to pack.

    The students' parameters get ``.grad`` views into the front of the buffer, so autograd
    accumulates straight into it and the optimizers read the team's sums in place (as DDP's
    buckets do). Behind the gradients sit the ghost BatchNorms' pending running-statistic
    updates, the losses and the stop flag. Packing some 150 small gradients into a float64 copy
    and scattering them back cost about 9 ms of a 140 ms step on the default job; here the only
    per-step copies are the BatchNorm statistics and the losses. Sums are float32, like the
    gradients themselves: with every member reducing the same values, members stay identical.
    """

    def __init__(self, params: Sequence[nn.Parameter], bns: Sequence[GroupBatchNorm2d], n_losses: int) -> None:
        self.params, self.bns = list(params), list(bns)
        self.sizes = [p.numel() for p in self.params]
        self.n_grad = sum(self.sizes)
        n_bn = [2 * bn.num_features for bn in self.bns]  # pending: channel sums of means, then variances
        ref = self.params[0]
        self.flat = torch.zeros(self.n_grad + sum(n_bn) + n_losses + 1, dtype=ref.dtype, device=ref.device)
        *self.pending, self.losses, self.stop = self.flat[self.n_grad:].split(n_bn + [n_losses, 1])
        self.attach()

    def attach(self) -> None:
        """Point every parameter's ``.grad`` at its slice (again, if another bucket took it)."""
        for p, g in zip(self.params, self.flat[: self.n_grad].split(self.sizes)):
            p.grad = g.view(p.shape)

    def zero(self) -> None:
        self.flat.zero_()

    def allreduce(self, team: Team, losses: Sequence[torch.Tensor], stop: bool) -> tuple[list[float], bool]:
        """Sum gradients, BatchNorm updates, losses and stop requests over the team, apply the
        BatchNorm updates; returns the summed losses and whether any member asked to stop."""
        for bn, slot in zip(self.bns, self.pending):
            slot.copy_(bn.pending)
        self.losses.copy_(torch.stack([loss.reshape(()) for loss in losses]))
        self.stop.fill_(1.0 if stop else 0.0)
        team.allreduce_(self.flat)
        for bn, slot in zip(self.bns, self.pending):
            bn.apply_pending(slot)
        return self.losses.tolist(), bool(self.stop.item() > 0)


class _SyncBatchNormFn(torch.autograd.Function):
    """Batch normalisation over the union of the team members' batches (forward and backward)."""

    @staticmethod
    def forward(ctx, x, weight, bias, team: Team, eps: float):
        c = x.shape[1]
        dims = (0, 2, 3)
        f64 = torch.float64  # accumulate as native BatchNorm does on CPU: float32 sums depend on the layout
        stats = torch.cat([x.sum(dims, dtype=f64), (x * x).sum(dims, dtype=f64), x.new_tensor([x.numel() / c], dtype=f64)])
        team.allreduce_(stats)
        count = stats[-1]
        mean = stats[:c] / count
        var = (stats[c:2 * c] / count - mean * mean).clamp_min(0)
        invstd = torch.rsqrt(var + eps)
        xhat = (x - mean.to(x.dtype).view(1, c, 1, 1)) * invstd.to(x.dtype).view(1, c, 1, 1)
        ctx.save_for_backward(xhat, invstd.to(x.dtype), weight)
        ctx.team, ctx.count = team, float(count)
        ctx.mark_non_differentiable(mean, var, count)
        y = xhat * weight.view(1, c, 1, 1) + bias.view(1, c, 1, 1)
        return y, mean, var, count

    @staticmethod
    def backward(ctx, dy, _dmean, _dvar, _dcount):
        xhat, invstd, weight = ctx.saved_tensors
        c = dy.shape[1]
        dims = (0, 2, 3)
        local = torch.cat([dy.sum(dims, dtype=torch.float64), (dy * xhat).sum(dims, dtype=torch.float64)])
        dbias, dweight = local[:c].to(dy.dtype), local[c:].to(dy.dtype)  # local: summed with all grads later
        total = ctx.team.allreduce_(local).to(dy.dtype)
        sum_dy, sum_dy_xhat = total[:c].view(1, c, 1, 1), total[c:].view(1, c, 1, 1)
        dx = (weight * invstd).view(1, c, 1, 1) * (dy - sum_dy / ctx.count - xhat * sum_dy_xhat / ctx.count)
        return dx, dweight, dbias, None, None


class TeamBatchNorm2d(nn.BatchNorm2d):
    """A BatchNorm2d whose training statistics span the whole team batch.

    Same parameters and buffers as ``nn.BatchNorm2d``, so its state_dict loads into a plain student.
    """

    team: Team | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.team is None or self.team.size == 1:
            return super().forward(x)
        y, mean, var, count = _SyncBatchNormFn.apply(x, self.weight, self.bias, self.team, self.eps)
        with torch.no_grad():
            assert self.num_batches_tracked is not None and self.running_mean is not None and self.running_var is not None
            self.num_batches_tracked += 1
            m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
            unbiased = var * count / max(float(count) - 1, 1.0)
            self.running_mean.mul_(1 - m).add_(mean.to(self.running_mean.dtype), alpha=m)
            self.running_var.mul_(1 - m).add_(unbiased.to(self.running_var.dtype), alpha=m)
        return y


class GhostLayout:
    """Row counts of the ghost-batch slices in this rank's part of the current batch; shared by
    every GroupBatchNorm2d of a rank and set once per step by the distiller."""

    def __init__(self, groups: int) -> None:
        self.groups = groups      # slices in the whole (team) batch
        self.sizes: list[int] = []

    def set(self, n: int, held: range) -> None:
        bounds = group_bounds(n, self.groups)
        self.sizes = [bounds[j + 1] - bounds[j] for j in held]


class _GhostBatchNormFn(torch.autograd.Function):
    """Batch normalisation of each slice of the batch with its own statistics, in one output tensor.

    Normalising the slices separately and concatenating costs a copy of the activation forward and
    another backward, a sizeable share of a large student's step. Here each slice's native kernel
    writes straight into its part of the output. The backward's ``.out`` variant still copies each
    slice's input gradient into place (ATen computes it, then copies), no worse than a concatenation.
    Returns the output and the slices' means and inverse standard deviations.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, sizes: list[int], eps: float):
        y = torch.empty_like(x)
        means = x.new_empty(len(sizes), x.shape[1])
        invstds = x.new_empty(len(sizes), x.shape[1])
        for j, (chunk, out) in enumerate(zip(x.split(sizes), y.split(sizes))):
            torch.ops.aten.native_batch_norm.out(chunk, weight, bias, None, None, True, 0.0, eps,
                                                 out=out, save_mean=means[j], save_invstd=invstds[j])
        ctx.sizes, ctx.eps = sizes, eps
        ctx.save_for_backward(x, weight, means, invstds)
        ctx.mark_non_differentiable(means, invstds)
        return y, means, invstds

    @staticmethod
    def backward(ctx, dy, _dmeans, _dinvstds):
        x, weight, means, invstds = ctx.saved_tensors
        dy = dy.contiguous(memory_format=_layout(x))
        dx = torch.empty_like(x)
        dweight, dbias = torch.zeros_like(weight), torch.zeros_like(weight)
        part_w, part_b = torch.empty_like(weight), torch.empty_like(weight)
        for j, (g, chunk, out) in enumerate(zip(dy.split(ctx.sizes), x.split(ctx.sizes), dx.split(ctx.sizes))):
            torch.ops.aten.native_batch_norm_backward.out(g, chunk, weight, None, None, means[j], invstds[j], True,
                                                          ctx.eps, [True, True, True], out0=out, out1=part_w,
                                                          out2=part_b)
            dweight += part_w
            dbias += part_b
        return dx, dweight, dbias, None, None


def _layout(x: torch.Tensor) -> torch.memory_format:
    return torch.channels_last if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) \
        and not x.is_contiguous() else torch.contiguous_format


class GroupBatchNorm2d(nn.BatchNorm2d):
    """Ghost batch normalisation: each slice of the batch is normalised with its own statistics.

    The running statistics move once per step by the mean of all slices' statistics. Slices can
    live on different team members, so the update is left in ``pending`` (per-channel sums of the
    slices' means and unbiased variances) and applied by ``apply_pending`` once the team has summed
    it (with the gradients, in the step's single allreduce). Same parameters and buffers as
    ``nn.BatchNorm2d``.
    """

    layout: GhostLayout
    pending: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        sizes = self.layout.sizes
        if sum(sizes) != x.shape[0]:
            raise RuntimeError(f"ghost layout {sizes} does not match a batch of {x.shape[0]}")
        if len(sizes) == 1:  # a team member holding one ghost batch: the plain kernel, no copies
            y, mean, invstd = torch.native_batch_norm(x, self.weight, self.bias, None, None, True, 0.0, self.eps)
            means, invstds = mean.detach()[None], invstd.detach()[None]
        else:
            y, means, invstds = _GhostBatchNormFn.apply(x, self.weight, self.bias, list(sizes), self.eps)
        variances = []
        for size, invstd in zip(sizes, invstds):
            n = size * x[0, 0].numel()
            variances.append((invstd.double().pow(-2) - self.eps) * n / max(n - 1, 1))
        self.pending = torch.cat([means.double().sum(0), torch.stack(variances).sum(0)])
        return y

    def apply_own(self) -> None:
        """Alone (no team to sum with): apply this rank's own pending statistics."""
        assert self.pending is not None, "no pending statistics: no forward in train mode since the last step"
        self.apply_pending(self.pending)

    @torch.no_grad()
    def apply_pending(self, summed: torch.Tensor) -> None:
        """Move the running statistics by the mean over all ghost batches of the team batch."""
        c, g = self.num_features, self.layout.groups
        assert self.num_batches_tracked is not None and self.running_mean is not None and self.running_var is not None
        self.num_batches_tracked += 1
        m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
        self.running_mean.mul_(1 - m).add_((summed[:c] / g).to(self.running_mean.dtype), alpha=m)
        self.running_var.mul_(1 - m).add_((summed[c:] / g).to(self.running_var.dtype), alpha=m)
        self.pending = None


def _swap_batchnorms(module: nn.Module, make: Callable[[nn.BatchNorm2d], nn.BatchNorm2d]) -> None:
    for name, child in list(module.named_children()):
        if type(child) is nn.BatchNorm2d:
            bn = make(child)
            bn.load_state_dict(child.state_dict())
            setattr(module, name, bn.to(child.weight.device))
        else:
            _swap_batchnorms(child, make)


def prepare_student(module: nn.Module, team: Team | None, layout: GhostLayout | None) -> nn.Module:
    """Give a student the BatchNorm its training needs (in place; state_dicts stay plain):
    ghost batches when ``layout`` is given, else team-synced statistics in a team, else unchanged."""
    def make(child: nn.BatchNorm2d) -> nn.BatchNorm2d:
        args = (child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats)
        if layout is not None:
            ghost = GroupBatchNorm2d(*args)
            ghost.layout = layout
            return ghost
        synced = TeamBatchNorm2d(*args)
        synced.team = team
        return synced

    if layout is not None or team is not None:
        _swap_batchnorms(module, make)
    return module


def ghost_batchnorms(module: nn.Module) -> list[GroupBatchNorm2d]:
    return [m for m in module.modules() if isinstance(m, GroupBatchNorm2d)]

