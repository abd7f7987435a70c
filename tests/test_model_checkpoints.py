"""SwaV checkpoints: exact resume from a saved state, fmcib state_dicts loading strictly, and
training steps on a device matching the CPU."""
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from models import backbone_2d, crops_2d
from swav_core import SwaV, SwaVLoss


def _train(model, loss_fn, optimizer, steps, seed_offset, device):
    losses = []
    for t in steps:
        g = torch.Generator().manual_seed(1000 + t + seed_offset)
        high, low, queue = model(crops_2d(4, device=device, generator=g), epoch=0, step=t)
        loss = loss_fn(high, low, queue)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())
    return torch.stack(losses)


def _fresh(device, seed=0):
    torch.manual_seed(seed)
    model = SwaV(backbone_2d(), 8, 4, 6, n_queues=2, queue_length=8, n_steps_frozen_prototypes=2).to(device)
    return model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)


def test_checkpoint_resume_continues_identically(device):
    loss_fn = SwaVLoss()
    model, opt = _fresh(device)
    uninterrupted = _train(model, loss_fn, opt, range(8), 0, device)

    model, opt = _fresh(device)
    first = _train(model, loss_fn, opt, range(4), 0, device)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)
    model, opt = _fresh(device, seed=123)  # different init: everything must come from the checkpoint
    model.load_state_dict(checkpoint["model"])
    opt.load_state_dict(checkpoint["optimizer"])
    assert all(q.num_filled == 8 for q in model.queues)
    resumed = _train(model, loss_fn, opt, range(4, 8), 0, device)
    assert torch.equal(torch.cat([first, resumed]), uninterrupted)


FMCIB_KEYS = {
    "backbone.0.weight": (8, 3, 3, 3),
    "backbone.0.bias": (8,),
    "projection_head.layers.0.weight": (4, 8),
    "projection_head.layers.1.weight": (4,),
    "projection_head.layers.1.bias": (4,),
    "projection_head.layers.1.running_mean": (4,),
    "projection_head.layers.1.running_var": (4,),
    "projection_head.layers.1.num_batches_tracked": (),
    "projection_head.layers.3.weight": (5, 4),
    "projection_head.layers.3.bias": (5,),
    "prototypes.heads.0.weight": (6, 5),
    "prototypes.heads.0.bias": (6,),
}


def test_fmcib_checkpoint_loads_strict_and_reproduces_outputs(device):
    """A state_dict laid out as fmcib/lightly save it (no queue state) loads with strict=True."""
    g = torch.Generator().manual_seed(7)
    state = {k: torch.rand(shape, generator=g) + 0.5 for k, shape in FMCIB_KEYS.items()}
    state["projection_head.layers.1.num_batches_tracked"] = torch.tensor(10)
    model = SwaV(backbone_2d(), 8, 5, 6, n_queues=2, queue_length=4, prototype_bias=True).to(device)
    model.load_state_dict(state, strict=True)
    assert all(q.num_filled == 0 for q in model.queues)
    model.eval()
    x = torch.randn(3, 3, 12, 12, device=device)
    out_high, _, queue = model(([x, x], []))
    assert queue is None
    # Independent oracle: the same computation written out from the raw tensors.
    s = {k: v.to(device) for k, v in state.items()}
    h = F.relu(F.conv2d(x, s["backbone.0.weight"], s["backbone.0.bias"])).mean(dim=(2, 3))
    h = h @ s["projection_head.layers.0.weight"].T
    h = (h - s["projection_head.layers.1.running_mean"]) / torch.sqrt(
        s["projection_head.layers.1.running_var"] + 1e-5
    ) * s["projection_head.layers.1.weight"] + s["projection_head.layers.1.bias"]
    z = F.normalize(F.relu(h) @ s["projection_head.layers.3.weight"].T + s["projection_head.layers.3.bias"], dim=1)
    c = F.normalize(s["prototypes.heads.0.weight"], dim=1)
    torch.testing.assert_close(out_high[0], z @ c.T + s["prototypes.heads.0.bias"])
    # Saving again adds the queue state (and whose it is), and the fmcib keys are all still there, unchanged.
    saved = model.state_dict()
    assert set(FMCIB_KEYS) <= set(saved)
    assert set(saved) - set(FMCIB_KEYS) == {
        f"queues.{i}.{k}" for i in range(2) for k in ("bank", "bank_ptr", "bank_filled", "_extra_state")
    }


def test_training_steps_on_device_match_cpu(device):
    """SwaV + SwaVLoss + SGD for a few steps (frozen, then queued) give the same losses and weights on
    the device as on the CPU, to float32 rounding accumulated over the steps. (A linear backbone:
    cuDNN convolutions may use TF32.)"""
    if device == "cpu":
        pytest.skip("compares another device with the CPU")
    runs = {}
    for dev in ("cpu", device):
        torch.manual_seed(0)
        backbone = nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(12, 8))
        model = SwaV(backbone, 8, 4, 6, n_queues=2, queue_length=8, n_steps_frozen_prototypes=1).to(dev)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        losses = _train(model, SwaVLoss(), opt, range(4), 0, dev)
        runs[dev] = (losses.cpu(), {k: v.cpu() for k, v in model.state_dict().items()})
    torch.testing.assert_close(runs[device][0], runs["cpu"][0], rtol=1e-4, atol=1e-5)
    for key, value in runs["cpu"][1].items():
        torch.testing.assert_close(runs[device][1][key], value, rtol=1e-4, atol=1e-5, msg=key)
