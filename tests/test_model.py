"""SwaV (fmcib's model): structure, queue timing against a deque oracle, checkpoints, fmcib keys, errors."""
import collections
import io
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch import nn

from swav_core import SwaV, SwaVLoss


def backbone_2d(channels: int = 3, width: int = 8) -> nn.Module:
    return nn.Sequential(nn.Conv2d(channels, width, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1))


def backbone_3d(channels: int = 1, width: int = 8) -> nn.Module:
    return nn.Sequential(nn.Conv3d(channels, width, 3), nn.ReLU(), nn.AdaptiveAvgPool3d(1))


def crops_2d(batch, n_high=2, n_low=2, device="cpu", generator=None):
    high = [torch.randn(batch, 3, 12, 12, generator=generator).to(device) for _ in range(n_high)]
    low = [torch.randn(batch, 3, 6, 6, generator=generator).to(device) for _ in range(n_low)]
    return high, low


class Recorder:
    """Records the unit-norm features z of every crop from the projection head's outputs."""

    def __init__(self, model: SwaV):
        self.z = []
        model.projection_head.register_forward_hook(self._hook)

    def _hook(self, module, args, output):
        self.z.append(F.normalize(output.detach(), dim=1))


def sorted_rows(x: torch.Tensor) -> torch.Tensor:
    return x[torch.argsort(x[:, 0])]


@pytest.mark.parametrize("n_prototypes", [7, [5, 9]])
@pytest.mark.parametrize("grouped", [False, True])
def test_output_structure_2d_and_3d(device, n_prototypes, grouped):
    for backbone, shape_high, shape_low, in_ch in [
        (backbone_2d(), (12, 12), (6, 6), 3),
        (backbone_3d(), (10, 10, 10), (5, 5, 5), 1),
    ]:
        model = SwaV(backbone, 8, 4, n_prototypes, n_queues=2, queue_length=3,
                     group_crops_by_resolution=grouped).to(device)
        high = [torch.randn(2, in_ch, *shape_high, device=device) for _ in range(2)]
        low = [torch.randn(2, in_ch, *shape_low, device=device) for _ in range(3)]
        for step in range(3):
            out_high, out_low, queue = model((high, low), epoch=0, step=step)
            assert len(out_high) == 2 and len(out_low) == 3
            heads = n_prototypes if isinstance(n_prototypes, list) else [n_prototypes]
            for scores in out_high + out_low:
                per_head = scores if isinstance(n_prototypes, list) else [scores]
                assert [tuple(s.shape) for s in per_head] == [(2, k) for k in heads]
            if step < 2:  # 2 rows per step into a length-3 queue: full before step 2
                assert queue is None
            else:
                assert len(queue) == 2
                for scores in queue:
                    per_head = scores if isinstance(n_prototypes, list) else [scores]
                    assert [tuple(s.shape) for s in per_head] == [(3, k) for k in heads]


def test_prototypes_normalised_every_forward(device):
    model = SwaV(backbone_2d(), 8, 4, 6, n_queues=0).to(device)
    with torch.no_grad():
        model.prototypes.heads[0].weight.mul_(3.0)
    model(crops_2d(2, device=device))
    norms = model.prototypes.heads[0].weight.norm(dim=1)
    torch.testing.assert_close(norms, torch.ones_like(norms))


def test_scores_are_cosines_of_unit_features(device):
    """Scores equal zᵀc with z the normalised projection and c the normalised prototypes."""
    model = SwaV(backbone_2d(), 8, 4, 6, n_queues=0).to(device).eval()
    recorder = Recorder(model)
    high, low = crops_2d(3, device=device)
    out_high, out_low, _ = model((high, low))
    w = model.prototypes.heads[0].weight
    for z, scores in zip(recorder.z, out_high + out_low):
        torch.testing.assert_close(scores, z @ w.T)
        assert scores.abs().max() <= 1 + 1e-6


def test_grouped_forward_matches_per_crop_in_eval(device):
    """With BatchNorm on running statistics, FAIR's grouped forward equals one call per crop."""
    torch.manual_seed(1)
    per_crop = SwaV(backbone_2d(), 8, 4, 6, n_queues=0).to(device).eval()
    grouped = SwaV(backbone_2d(), 8, 4, 6, n_queues=0, group_crops_by_resolution=True).to(device).eval()
    grouped.load_state_dict(per_crop.state_dict())
    high, low = crops_2d(4, n_high=2, n_low=3, device=device)
    for a, b in zip(sum(per_crop((high, low))[:2], []), sum(grouped((high, low))[:2], [])):
        torch.testing.assert_close(a, b)


def test_grouped_forward_calls_backbone_once_per_resolution_run(device):
    calls = []
    backbone = backbone_2d().to(device)
    backbone.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    model = SwaV(backbone, 8, 4, 6, n_queues=0, group_crops_by_resolution=True).to(device)
    high, low = crops_2d(3, n_high=2, n_low=4, device=device)
    model((high, low))
    assert calls == [2 * 3, 4 * 3]


@settings(max_examples=25)
@given(
    batch=st.integers(2, 5),  # BatchNorm in training needs 2 samples
    queue_length=st.integers(1, 12),
    start_epoch=st.integers(0, 3),
    steps_per_epoch=st.integers(1, 3),
    n_steps=st.integers(1, 10),
)
@example(batch=4, queue_length=8, start_epoch=0, steps_per_epoch=1, n_steps=4)  # fills exactly
@example(batch=5, queue_length=3, start_epoch=2, steps_per_epoch=1, n_steps=4)  # batch > queue
def test_queue_scores_appear_exactly_when_prepush_queue_full(
    device, batch, queue_length, start_epoch, steps_per_epoch, n_steps
):
    torch.manual_seed(0)
    model = SwaV(backbone_2d(), 8, 4, 5, n_queues=2, queue_length=queue_length,
                 start_queue_at_epoch=start_epoch).to(device)
    recorder = Recorder(model)
    oracle = [collections.deque(maxlen=queue_length) for _ in range(2)]
    for t in range(n_steps):
        epoch = t // steps_per_epoch
        recorder.z.clear()
        _, _, queue = model(crops_2d(batch, device=device), epoch=epoch, step=t)
        expect_queue = t * batch >= queue_length and epoch >= start_epoch
        assert (queue is not None) == expect_queue, (t, epoch)
        w = model.prototypes.heads[0].weight
        for i in range(2):
            if expect_queue:  # the stored rows, from earlier steps only, scored by current prototypes
                stored = torch.stack(list(oracle[i]))
                torch.testing.assert_close(sorted_rows(queue[i]), sorted_rows(stored @ w.T))
            oracle[i].extend(recorder.z[i])  # this step's high-res features enter after scoring


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
    # Saving again adds the queue state, and the fmcib keys are all still there, unchanged.
    saved = model.state_dict()
    assert set(FMCIB_KEYS) <= set(saved)
    assert set(saved) - set(FMCIB_KEYS) == {
        f"queues.{i}.{k}" for i in range(2) for k in ("bank", "bank_ptr", "bank_filled")
    }


def test_default_has_no_prototype_bias():
    model = SwaV(backbone_2d(), 8, 4, 6, n_queues=0)
    assert "prototypes.heads.0.bias" not in model.state_dict()
    assert model.queues is None and model.queue_length == 0 and model.start_queue_at_epoch == 0


def test_bad_input_raises_clear_errors(device):
    model = SwaV(backbone_2d(), 8, 4, 6, n_queues=2, queue_length=4, start_queue_at_epoch=1).to(device)
    high, low = crops_2d(2, device=device)
    with pytest.raises(ValueError, match=r"3 high-resolution crops.*n_queues=2"):
        model((high + high[:1], low), epoch=1, step=0)
    with pytest.raises(ValueError, match=r"epoch is required.*start_queue_at_epoch=1"):
        model((high, low), step=0)
    with pytest.raises(ValueError, match=r"same batch size, got \[2, 2, 3, 2\]"):
        model((high, [torch.randn(3, 3, 6, 6, device=device), low[1]]), epoch=1, step=0)
    wrong = SwaV(backbone_2d(width=6), 8, 4, 6, n_queues=0).to(device)
    with pytest.raises(ValueError, match=r"flattens to 6 features.*num_ftrs=8"):
        wrong((high, low))
    frozen = SwaV(backbone_2d(), 8, 4, 6, n_queues=0, n_steps_frozen_prototypes=3).to(device)
    with pytest.raises(ValueError, match="step"):
        frozen((high, low))
    frozen.eval()
    with torch.no_grad():
        frozen((high, low))  # evaluation never needs a step
    with pytest.raises(ValueError, match="queue_length"):
        SwaV(backbone_2d(), 8, 4, 6, n_queues=2)
    with pytest.raises(ValueError, match="n_queues"):
        SwaV(backbone_2d(), 8, 4, 6, n_queues=-1)


def test_import_changes_no_global_torch_setting():
    probe = (
        "import torch\n"
        "def snap(): return (torch.get_float32_matmul_precision(), torch.get_default_dtype(),\n"
        "  torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32,\n"
        "  torch.backends.cudnn.allow_tf32, torch.is_grad_enabled(), torch.get_num_threads())\n"
        "before = snap()\n"
        "import swav_core, swav_core.pretrain\n"
        "assert snap() == before, (before, snap())\n"
    )
    subprocess.run([sys.executable, "-c", probe], check=True)
