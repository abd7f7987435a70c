"""lightly's SwaV examples (``examples/pytorch/swav.py`` and ``swav_queue.py``), rewritten on swav_core only.

The model classes below are built the way those examples build theirs (backbone → SwaVProjectionHead →
L2 normalisation → SwaVPrototypes with ``n_steps_frozen_prototypes``; for the queue variant one
MemoryBankModule per high-resolution crop, called with ``update=True`` to get the bank before this
step's push, re-scored by the prototypes and passed to the loss as ``queue_outputs``), with a small CNN
and a few Adam steps on multi-crop tensors. Each step checks the loss against the fp64 per-pair oracle,
prototype freezing by step, and, for the queue, what the banks hold and when queue scores appear.
"""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from models import Recorder
from oracles import per_pair_oracle
from swav_core import MemoryBankModule, MultiCrop, SwaVLoss, SwaVProjectionHead, SwaVPrototypes

BATCH, N_HIGH, N_LOW, DIM, K = 4, 2, 4, 8, 12


def _backbone():
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 16, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1))


class PlainSwaV(nn.Module):
    """lightly's examples/pytorch/swav.py model, with prototypes frozen for the first steps."""

    def __init__(self, backbone, n_steps_frozen_prototypes):
        super().__init__()
        self.backbone = backbone
        self.projection_head = SwaVProjectionHead(16, 16, DIM)
        self.prototypes = SwaVPrototypes(DIM, n_prototypes=K, n_steps_frozen_prototypes=n_steps_frozen_prototypes)

    def forward(self, x, step):
        x = self.backbone(x).flatten(start_dim=1)
        x = F.normalize(self.projection_head(x), dim=1, p=2)
        return self.prototypes(x, step)


class QueueSwaV(nn.Module):
    """lightly's examples/pytorch/swav_queue.py model: one queue per high-resolution crop."""

    def __init__(self, backbone, queue_length, start_queue_at_epoch, n_steps_frozen_prototypes):
        super().__init__()
        self.backbone = backbone
        self.projection_head = SwaVProjectionHead(16, 16, DIM)
        self.prototypes = SwaVPrototypes(DIM, K, n_steps_frozen_prototypes)
        self.queues = nn.ModuleList([MemoryBankModule(size=queue_length) for _ in range(N_HIGH)])
        self.queue_length = queue_length
        self.start_queue_at_epoch = start_queue_at_epoch
        self.num_features_queued = 0

    def forward(self, high_resolution, low_resolution, epoch, step):
        self.prototypes.normalize()
        high_features = [self._subforward(x) for x in high_resolution]
        low_features = [self._subforward(x) for x in low_resolution]
        high_scores = [self.prototypes(z, step) for z in high_features]
        low_scores = [self.prototypes(z, step) for z in low_features]
        return high_scores, low_scores, self._queue_scores(high_features, epoch, step)

    def _subforward(self, x):
        return F.normalize(self.projection_head(self.backbone(x).flatten(start_dim=1)), dim=1, p=2)

    @torch.no_grad()
    def _queue_scores(self, high_features, epoch, step):
        banks = []
        for queue, z in zip(self.queues, high_features):
            _, bank = queue(z, update=True)  # the bank before this push, (D, length)
            banks.append(bank.permute(1, 0))  # (length, D)
        # Use the queue once it holds queue_length features from earlier steps (counted before this push).
        enough = self.num_features_queued >= self.queue_length
        self.num_features_queued += high_features[0].shape[0]
        if not enough or epoch < self.start_queue_at_epoch:
            return None
        return [self.prototypes(bank, step) for bank in banks]


def _setup(model, device):
    model = model.to(device)
    # Adam as in lightly's examples; weight decay added so that only absent gradients keep prototypes still
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-4)
    crops = MultiCrop(high_size=16, low_size=8, n_high=N_HIGH, n_low=N_LOW)
    return model, optimizer, crops, torch.Generator().manual_seed(0)


def _snapshot(module):
    return [p.detach().clone() for p in module.parameters()]


def _same(module, snapshot):
    return all(torch.equal(p, s) for p, s in zip(module.parameters(), snapshot))


def _step(model, optimizer, loss, step, frozen_steps, frozen_weights):
    """Backward and update; checks that the prototypes train exactly from step ``frozen_steps`` on."""
    assert torch.isfinite(loss)
    loss.backward()
    assert all((p.grad is None) == (step < frozen_steps) for p in model.prototypes.parameters())
    backbone, prototypes = _snapshot(model.backbone), _snapshot(model.prototypes)
    optimizer.step()
    optimizer.zero_grad()
    assert not _same(model.backbone, backbone)
    if step < frozen_steps:
        assert _same(model.prototypes, frozen_weights), "frozen prototypes must stay bit-identical"
    else:
        assert not _same(model.prototypes, prototypes)


def test_plain_example_trains_with_frozen_prototypes(device):
    model, optimizer, crops, g = _setup(PlainSwaV(_backbone(), n_steps_frozen_prototypes=2), device)
    criterion = SwaVLoss()
    for step in range(4):
        high, low = crops(torch.rand(BATCH, 3, 24, 24, generator=g).to(device), generator=g)
        model.prototypes.normalize()
        frozen_weights = _snapshot(model.prototypes) if step == 0 else frozen_weights
        high_scores = [model(x, step) for x in high]
        low_scores = [model(x, step) for x in low]
        loss = criterion(high_scores, low_scores)
        expected = per_pair_oracle(high_scores, low_scores)
        torch.testing.assert_close(loss.double().cpu(), expected.double(), rtol=1e-5, atol=1e-6)
        _step(model, optimizer, loss, step, 2, frozen_weights)


@pytest.mark.parametrize("start_queue_at_epoch, first_queued_step", [(0, 3), (2, 4)])
def test_queue_example_fills_scores_and_trains(device, start_queue_at_epoch, first_queued_step):
    length, steps = 3 * BATCH, 6  # the queue holds the features of the last 3 steps
    model = QueueSwaV(_backbone(), length, start_queue_at_epoch, n_steps_frozen_prototypes=2)
    model, optimizer, crops, g = _setup(model, device)
    recorder = Recorder(model)  # unit features z of every crop, in call order
    criterion, high_z = SwaVLoss(), []
    for step in range(steps):
        epoch = step // 2
        high, low = crops(torch.rand(BATCH, 3, 24, 24, generator=g).to(device), generator=g)
        before = [q.bank.clone() for q in model.queues]
        recorder.z.clear()
        high_scores, low_scores, queue_scores = model(high, low, epoch, step)
        frozen_weights = _snapshot(model.prototypes) if step == 0 else frozen_weights
        high_z.append(recorder.z[:N_HIGH])
        assert (queue_scores is None) == (step < first_queued_step)
        if queue_scores is not None:  # the pushed-before-this-step bank, scored by today's prototypes
            w = model.prototypes.heads[0].weight.detach()
            for scores, bank in zip(queue_scores, before):
                assert scores.shape == (length, K) and not scores.requires_grad
                torch.testing.assert_close(scores, bank @ w.T, rtol=1e-5, atol=1e-6)
        loss = criterion(high_scores, low_scores, queue_scores)
        expected = per_pair_oracle(high_scores, low_scores, queue_scores)
        torch.testing.assert_close(loss.double().cpu(), expected.double(), rtol=1e-5, atol=1e-6)
        _step(model, optimizer, loss, step, 2, frozen_weights)
        _check_banks(model.queues, high_z, length)


def _check_banks(queues, high_z, length):
    """After k steps each bank holds the last length / B steps' features of its crop, step s at slot
    (s·B) mod length, and bank_ptr points at (k·B) mod length."""
    k = len(high_z)
    for i, queue in enumerate(queues):
        assert queue.bank.shape == (length, DIM)
        assert queue.bank_ptr.tolist() == [(k * BATCH) % length]
        for s in range(max(0, k - length // BATCH), k):
            slot = (s * BATCH) % length
            assert torch.equal(queue.bank[slot : slot + BATCH], high_z[s][i])
        if k < length // BATCH:
            assert not bool(queue.bank[k * BATCH :].any())
