"""Data-parallel teams: several ranks share a group of blocks and split every batch.

Hybrid parallelism in one idea: the plan may give a group of blocks to a *team* of ranks instead
of one rank. Each member takes its slice of every batch, runs the teacher on it, and trains the
team's students on it; the members' gradients are summed (MPI allreduce) so every member takes the
same optimizer step, and BatchNorm statistics are computed over the whole team batch. The trained
blocks therefore equal a single rank's blocks for the same total batch (within float tolerance),
which is what keeps results independent of the plan.

All collectives here go through the team's MPI communicator; GPU tensors are staged through host
memory, which costs little because student gradients are small.
"""
from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn


class Team:
    """The MPI communicator of one team, and this rank's place in it."""

    def __init__(self, comm: Any) -> None:
        self.comm = comm
        self.rank = comm.rank
        self.size = comm.size

    @property
    def is_leader(self) -> bool:
        return self.rank == 0

    def slice(self, n: int) -> slice:
        """This member's rows of a batch of ``n`` (balanced; members differ by at most one row)."""
        return slice(self.rank * n // self.size, (self.rank + 1) * n // self.size)

    def allreduce_(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """In-place allreduce of a contiguous tensor (float64 sums keep results order-independent)."""
        from mpi4py import MPI

        host = tensor.detach().to("cpu", torch.float64).contiguous()
        self.comm.Allreduce(MPI.IN_PLACE, host.numpy(), op=MPI.MAX if op == "max" else MPI.SUM)
        tensor.copy_(host.to(tensor.dtype))
        return tensor

    def any(self, flag: bool) -> bool:
        """True on every member if any member says True (stop requests must be agreed)."""
        from mpi4py import MPI

        return bool(self.comm.allreduce(int(flag), op=MPI.MAX))

    def sum_grads(self, params: Iterable[nn.Parameter], extra: torch.Tensor | None = None) -> torch.Tensor | None:
        """Sum the gradients of ``params`` (and an optional small tensor) over the team, in one call."""
        params = [p for p in params if p.grad is not None]
        parts = [p.grad.reshape(-1) for p in params] + ([extra.reshape(-1)] if extra is not None else [])
        if not parts:
            return extra
        flat = torch.cat([t.to(torch.float64) for t in parts])
        self.allreduce_(flat)
        offset = 0
        for p in params:
            n = p.grad.numel()
            p.grad.copy_(flat[offset: offset + n].view_as(p.grad))
            offset += n
        return flat[offset:].to(extra.dtype) if extra is not None else None


class _SyncBatchNormFn(torch.autograd.Function):
    """Batch normalisation over the union of the team members' batches (forward and backward)."""

    @staticmethod
    def forward(ctx, x, weight, bias, team: Team, eps: float):  # type: ignore[override]
        c = x.shape[1]
        dims = (0, 2, 3)
        stats = torch.cat([x.sum(dims), (x * x).sum(dims), x.new_tensor([x.numel() / c])]).to(torch.float64)
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
    def backward(ctx, dy, _dmean, _dvar, _dcount):  # type: ignore[override]
        xhat, invstd, weight = ctx.saved_tensors
        c = dy.shape[1]
        dims = (0, 2, 3)
        local = torch.cat([dy.sum(dims), (dy * xhat).sum(dims)])
        dbias, dweight = local[:c].clone(), local[c:].clone()  # local: summed with all grads later
        total = ctx.team.allreduce_(local.to(torch.float64)).to(dy.dtype)
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
            self.num_batches_tracked += 1
            m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
            unbiased = var * count / max(float(count) - 1, 1.0)
            self.running_mean.mul_(1 - m).add_(mean.to(self.running_mean.dtype), alpha=m)
            self.running_var.mul_(1 - m).add_(unbiased.to(self.running_var.dtype), alpha=m)
        return y


def to_team(module: nn.Module, team: Team) -> nn.Module:
    """Swap every BatchNorm2d of ``module`` for a TeamBatchNorm2d sharing its weights (in place)."""
    for name, child in list(module.named_children()):
        if type(child) is nn.BatchNorm2d:
            bn = TeamBatchNorm2d(child.num_features, child.eps, child.momentum, child.affine,
                                 child.track_running_stats)
            bn.load_state_dict(child.state_dict())
            bn.team = team
            setattr(module, name, bn.to(child.weight.device))
        else:
            to_team(child, team)
    return module

