"""Prototype freezing and the queue under real two-process DistributedDataParallel (gloo, CPU)."""
import collections

import pytest
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from swav_core import MemoryBankModule, SwaVPrototypes
from distributed_utils import run_distributed

N_FROZEN = 2


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Linear(6, 4)
        self.bn = nn.BatchNorm1d(4)  # a buffer for broadcast_buffers=True to broadcast
        self.prototypes = SwaVPrototypes(4, 5, n_steps_frozen_prototypes=N_FROZEN)

    def forward(self, crops, step):
        return [self.prototypes(nn.functional.normalize(self.bn(self.features(x)), dim=1), step=step)
                for x in crops]


def _freeze_under_ddp(rank, world_size):
    torch.manual_seed(0)  # same initial model on every rank (DDP would broadcast it anyway)
    model = _Tiny()
    ddp = DDP(model)  # default arguments: find_unused_parameters=False, broadcast_buffers=True
    optimizer = torch.optim.Adam(ddp.parameters(), lr=0.05, weight_decay=0.1)
    torch.manual_seed(100 + rank)  # every rank sees its own data
    model.prototypes.normalize()
    w0 = model.prototypes.heads[0].weight.detach().clone()
    log = []
    for step in range(N_FROZEN + 2):
        model.prototypes.normalize()
        optimizer.zero_grad()
        scores = ddp([torch.randn(8, 6), torch.randn(8, 6)], step=step)  # two crops, one backward
        (scores[0].logsumexp(1).mean() - scores[1][:, 0].mean()).backward()
        grad_none = model.prototypes.heads[0].weight.grad is None
        feature_grad = model.features.weight.grad.clone()
        optimizer.step()
        log.append((grad_none, feature_grad, model.prototypes.heads[0].weight.detach().clone()))
    return w0, log


@pytest.mark.distributed
def test_prototype_freezing_under_default_ddp():
    (w0, log0), (w1, log1) = run_distributed(_freeze_under_ddp, 2)
    assert torch.equal(w0, w1)
    for step, ((none0, g0, w_0), (none1, g1, w_1)) in enumerate(zip(log0, log1)):
        assert torch.equal(g0, g1) and g0.abs().sum() > 0  # features get all-reduced gradients
        assert torch.equal(w_0, w_1)  # ranks stay in sync
        if step < N_FROZEN:
            assert none0 and none1
            assert torch.equal(w_0, w0)  # bit-identical while frozen
        else:
            assert not none0 and not none1
            assert not torch.equal(w_0, log0[step - 1][2])  # they train once unfrozen


class _WithQueue(nn.Module):
    def __init__(self, size=6):
        super().__init__()
        self.features = nn.Linear(3, 2)
        self.bn = nn.BatchNorm1d(2)
        self.queue = MemoryBankModule(size=size)

    def forward(self, x, push):
        self.queue.push(push)
        return self.bn(self.features(x)).pow(2).sum()


def _pushed(rank, step, b=4):
    ids = torch.arange(b, dtype=torch.float32)[:, None] + 1000 * rank + 10 * step  # (b, 1), unique
    return ids + torch.tensor([[0.0, 0.5]])  # (b, 2), no row is zero


def _queue_under_ddp(rank, world_size):
    torch.manual_seed(0)
    ddp = DDP(_WithQueue())  # broadcast_buffers=True: rank 0's buffers are sent before every forward
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1)
    for step in range(4):
        optimizer.zero_grad()
        ddp(torch.randn(5, 3), _pushed(rank, step)).backward()
        optimizer.step()
    after = ddp.module.queue.features()
    state = ddp.module.state_dict()
    restored = _WithQueue()
    restored.load_state_dict(state, strict=True)
    ddp2 = DDP(restored)
    ddp2(torch.randn(5, 3), _pushed(rank, 4)).backward()
    return after, restored.queue.features()


@pytest.mark.distributed
def test_queue_survives_ddp_buffer_broadcast():
    results = run_distributed(_queue_under_ddp, 2)
    for rank, (after, resumed) in enumerate(results):
        model = collections.deque(maxlen=6)
        for step in range(5):
            model.extend(_pushed(rank, step).unbind(0))
            if step == 3:
                assert torch.equal(after, torch.stack(list(model)))  # its own rows, not rank 0's
        assert torch.equal(resumed, torch.stack(list(model)))


_SIZES = [[3, 0, 5, 2], [1, 4, 2, 6]]  # per rank, per step: unequal and sometimes empty


def _gathered_queue(rank, world_size):
    queue = MemoryBankModule(size=7, gather_distributed=True)
    for step, b in enumerate(_SIZES[rank]):
        _, before = queue(_pushed(rank, step, b), update=True)
    return queue.features(), before


@pytest.mark.distributed
def test_gathered_queue_equals_one_deque_in_rank_order():
    results = run_distributed(_gathered_queue, 2)
    model = collections.deque(maxlen=7)
    for step in range(len(_SIZES[0])):
        if step == len(_SIZES[0]) - 1:
            last_before = torch.stack(list(model))
        for rank in range(2):
            model.extend(_pushed(rank, step, _SIZES[rank][step]).unbind(0))
    for features, before in results:
        assert torch.equal(features, torch.stack(list(model)))
        slots = before.T  # (length, D) in slot order; full, so the same rows as the queue, permuted
        assert torch.equal(slots[slots[:, 1].argsort()], last_before[last_before[:, 1].argsort()])
