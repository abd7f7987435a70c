"""SwaV under real DistributedDataParallel (2 gloo processes, default arguments).

DDP's defaults broadcast rank 0's buffers before every forward and reject parameters that get no
gradient; lightly's queues are buffers, so every rank ends up with rank 0's queue. Here each rank must
keep its own queue, frozen prototypes must get no gradient and not move, and a checkpoint must
restore the queues.
"""
import collections
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from distributed_utils import run_distributed
from swav_core import SwaV, SwaVLoss

FROZEN, STEPS, QUEUE, BATCH = 2, 5, 6, 3


def _model():
    torch.manual_seed(0)  # identical initial weights on every rank
    backbone = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1))
    return SwaV(backbone, 8, 4, 5, n_queues=2, queue_length=QUEUE, n_steps_frozen_prototypes=FROZEN)


def _train_ddp(rank, world_size):
    model = _model()
    features = []
    model.projection_head.register_forward_hook(
        lambda m, args, out: features.append(F.normalize(out.detach(), dim=1))
    )
    ddp = DistributedDataParallel(model)  # default arguments: broadcast_buffers=True
    optimizer = torch.optim.Adam(ddp.parameters(), lr=0.05, weight_decay=0.1)
    loss_fn = SwaVLoss(sinkhorn_gather_distributed=True)
    oracle = [collections.deque(maxlen=QUEUE) for _ in range(2)]
    prototypes = model.prototypes.heads[0].weight
    report = {"grads_none_while_frozen": [], "moved_after_unfreeze": None, "queue_used": []}
    for step in range(STEPS):
        g = torch.Generator().manual_seed(100 * rank + step)  # each rank sees its own data
        high = [torch.randn(BATCH, 3, 10, 10, generator=g) for _ in range(2)]
        low = [torch.randn(BATCH, 3, 6, 6, generator=g)]
        features.clear()
        out_high, out_low, queue = ddp((high, low), epoch=0, step=step)
        report["queue_used"].append(queue is not None)
        loss = loss_fn(out_high, out_low, queue)
        optimizer.zero_grad()
        loss.backward()
        if step < FROZEN:
            report["grads_none_while_frozen"].append(prototypes.grad is None)
        before = prototypes.detach().clone()
        optimizer.step()
        if step < FROZEN:
            assert torch.equal(prototypes, before), "frozen prototypes moved in optimizer.step()"
            assert all(p is not prototypes for p in optimizer.state), "the optimizer saw them"
        else:
            report["moved_after_unfreeze"] = (prototypes - before).abs().max().item()
        for i in range(2):
            oracle[i].extend(features[i])
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    restored = _model()
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    report["queues"] = [q.features(ordered=True) for q in model.queues]
    report["restored"] = [q.features(ordered=True) for q in restored.queues]
    report["oracle"] = [torch.stack(list(d)) for d in oracle]
    report["prototypes"] = prototypes.detach().clone()
    report["backbone"] = model.backbone[0].weight.detach().clone()
    return report


@pytest.mark.distributed
def test_ddp_default_arguments_keep_per_rank_queues_and_freeze_prototypes():
    r0, r1 = run_distributed(_train_ddp, 2)
    for r in (r0, r1):
        assert r["grads_none_while_frozen"] == [True] * FROZEN
        assert r["moved_after_unfreeze"] > 1e-4
        assert r["queue_used"] == [False, False, True, True, True]  # 2 steps × 3 rows fill 6
        for queue, restored, oracle in zip(r["queues"], r["restored"], r["oracle"]):
            assert torch.equal(queue, oracle)  # this rank's own features, oldest → newest
            assert torch.equal(restored, queue)
    assert not torch.allclose(r0["queues"][0], r1["queues"][0])  # not rank 0's queue everywhere
    # Parameters stay synchronised across ranks (gradients are all-reduced).
    torch.testing.assert_close(r0["prototypes"], r1["prototypes"])
    torch.testing.assert_close(r0["backbone"], r1["backbone"])
