"""Ghost batch normalisation: what lets a team skip BatchNorm communication and still match one rank."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hpc_bkd.distill.teams import (
    GhostLayout,
    GroupBatchNorm2d,
    ghost_batchnorms,
    group_bounds,
    prepare_student,
    team_backend,
)


def _bn(groups: int) -> tuple[GroupBatchNorm2d, GhostLayout]:
    layout = GhostLayout(groups)
    model = prepare_student(nn.Sequential(nn.BatchNorm2d(3)), None, layout)
    bn = model[0]
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    return bn, layout


def test_group_bounds_cover_the_batch():
    assert group_bounds(64, 2) == [0, 32, 64]
    assert group_bounds(13, 4) == [0, 3, 6, 9, 13]


def test_each_ghost_batch_is_normalised_on_its_own():
    torch.manual_seed(0)
    bn, layout = _bn(2)
    x = torch.randn(10, 3, 4, 4) * 3 + 1
    layout.set(len(x), range(2))
    y = bn(x)
    for rows in (slice(0, 5), slice(5, 10)):
        expect = F.batch_norm(x[rows], None, None, bn.weight, bn.bias, True, 0.0, bn.eps)
        assert torch.allclose(y[rows], expect, atol=1e-5)
    bn.apply_pending(bn.pending)  # running stats: mean over the groups of each group's statistics
    means = torch.stack([x[:5].mean((0, 2, 3)), x[5:].mean((0, 2, 3))]).mean(0)
    variances = torch.stack([x[:5].var((0, 2, 3)), x[5:].var((0, 2, 3))]).mean(0)
    assert torch.allclose(bn.running_mean, 0.1 * means, atol=1e-5)
    assert torch.allclose(bn.running_var, 0.9 + 0.1 * variances, atol=1e-5)
    assert bn.num_batches_tracked == 1 and bn.pending is None


def test_split_ghost_batches_match_one_pass():
    """Two 'members' each holding one ghost batch, with pending statistics and gradients summed
    (what the team's single allreduce does), equal one rank doing both batches."""
    torch.manual_seed(1)
    one, layout = _bn(2)
    member, member_layout = copy.deepcopy(one), GhostLayout(2)
    member.layout = member_layout
    x, target = torch.randn(8, 3, 4, 4), torch.randn(8, 3, 4, 4)
    layout.set(8, range(2))
    F.mse_loss(one(x), target).backward()
    one.apply_pending(one.pending)
    grads, pending = [], []
    for rank, rows in enumerate((slice(0, 4), slice(4, 8))):
        member.zero_grad()
        member_layout.set(8, range(rank, rank + 1))
        (F.mse_loss(member(x[rows]), target[rows]) * 0.5).backward()
        grads.append([p.grad.clone() for p in member.parameters()])
        pending.append(member.pending)
    member.apply_pending(pending[0] + pending[1])
    for p, g0, g1 in zip(one.parameters(), *grads):
        assert torch.allclose(p.grad, g0 + g1, atol=1e-6)
    assert torch.allclose(one.running_mean, member.running_mean) and torch.allclose(one.running_var, member.running_var)


def test_a_wrong_layout_is_an_error_not_silent():
    bn, layout = _bn(2)
    layout.set(6, range(2))
    with pytest.raises(RuntimeError, match="ghost layout"):
        bn(torch.randn(8, 3, 2, 2))


def test_prepared_students_keep_plain_state_dicts():
    student = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3))
    keys = set(student.state_dict())
    prepare_student(student, None, GhostLayout(2))
    assert len(ghost_batchnorms(student)) == 1 and set(student.state_dict()) == keys
    plain = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3))
    plain.load_state_dict(student.state_dict())


def test_a_step_bucket_holds_the_gradients_and_sums_everything_at_once():
    """The bucket's flat buffer *is* the gradients (autograd accumulates into it, the optimizer
    reads it), and its one allreduce carries the BatchNorm updates, losses and stop flag too. With
    a one-rank communicator the sums are the values themselves, so the step equals a plain one."""
    from mpi4py import MPI

    from hpc_bkd.distill.teams import StepBucket, Team

    torch.manual_seed(0)
    layout = GhostLayout(2)

    def make() -> nn.Module:
        return prepare_student(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)),
                               None, layout)

    bucketed, plain = make(), make()
    plain.load_state_dict(bucketed.state_dict())
    x = torch.randn(8, 3, 5, 5)
    layout.set(len(x), range(2))
    params = list(bucketed.parameters())
    bucket = StepBucket(params, ghost_batchnorms(bucketed), n_losses=1)
    team = Team(MPI.COMM_SELF, bn_groups=2)
    for step in range(2):
        bucket.zero()
        loss = bucketed(x).square().mean()
        loss.backward()
        for p in params:  # every gradient lives inside the flat buffer
            assert bucket.flat.data_ptr() <= p.grad.data_ptr() < bucket.flat.data_ptr() + 4 * bucket.flat.numel()
        losses, stop = bucket.allreduce(team, [loss.detach()], stop=step == 1)
        assert losses == pytest.approx([float(loss.detach())]) and stop == (step == 1)
        plain.zero_grad(set_to_none=True)
        plain(x).square().mean().backward()
        for bn in ghost_batchnorms(plain):
            bn.apply_pending(bn.pending)
        for a, b in zip(params, plain.parameters()):
            assert torch.allclose(a.grad, b.grad, atol=1e-6)
        for name, buf in plain.named_buffers():
            assert torch.allclose(dict(bucketed.named_buffers())[name].float(), buf.float(), atol=1e-6), name
    other = StepBucket(params, ghost_batchnorms(bucketed), n_losses=1)  # takes the gradients over...
    bucket.attach()  # ...until the first bucket takes them back
    assert params[0].grad.data_ptr() == bucket.flat.data_ptr() != other.flat.data_ptr()


def test_team_backend_auto_is_nccl_on_gpus_and_mpi_on_cpus():
    assert team_backend("auto", torch.device("cuda", 0)) == "nccl"
    assert team_backend("auto", torch.device("cpu")) == "mpi"
    assert team_backend("gloo", torch.device("cpu")) == "gloo"
    assert team_backend("mpi", torch.device("cuda", 1)) == "mpi"
    with pytest.raises(ValueError, match="nccl needs GPU ranks"):
        team_backend("nccl", torch.device("cpu"))
