"""SwaV (fmcib's model): structure, queue timing against a deque oracle, errors."""
import collections
import subprocess
import sys

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from models import Recorder, backbone_2d, backbone_3d, crops_2d, sorted_rows
from swav_core import SwaV, SwaVLoss
from strategies import examples


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


@settings(max_examples=examples(25))
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


@pytest.mark.parametrize("bad_step", [1, 3])  # before the queues are full, and after
def test_a_non_finite_step_leaves_the_queues_clean(device, bad_step):
    """A NaN crop (an fp16 overflow GradScaler would skip) is named by the loss and never poisons the queues:
    the following steps train with finite losses and queue scores."""
    torch.manual_seed(0)
    model = SwaV(backbone_2d(), 8, 4, 5, n_queues=2, queue_length=4).to(device)
    loss_fn, optimizer = SwaVLoss(), torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(8):
        high, low = crops_2d(2, device=device)  # 2 rows per step: the queues are full from step 2 on
        if step == bad_step:
            high[1][0, 0, 0, 0] = float("nan")
        high_scores, low_scores, queue = model((high, low), epoch=0, step=step)
        assert (queue is not None) == (step >= 2)
        if step == bad_step:
            with pytest.raises(ValueError, match=r"high_resolution_outputs\[1\].*finite"):
                loss_fn(high_scores, low_scores, queue)
            continue
        loss = loss_fn(high_scores, low_scores, queue)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        assert bool(loss.isfinite()) and all(bool(s.isfinite().all()) for s in queue or [])
        assert all(bool(q.bank.isfinite().all()) for q in model.queues)


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
    with pytest.raises(ValueError, match=r"high-resolution crop 1 must be a batch tensor.*list"):
        model(([high[0], [high[1]]], low), epoch=1, step=0)
    with pytest.raises(ValueError, match=r"low-resolution crop 0 must be a batch tensor.*shape \(2,\)"):
        model((high, [torch.zeros(2, device=device)]), epoch=1, step=0)
    frozen = SwaV(backbone_2d(), 8, 4, 6, n_queues=0, n_steps_frozen_prototypes=3).to(device)
    with pytest.raises(ValueError, match=r"needs forward\(input, epoch, step=\.\.\.\) while training"):
        frozen((high, low))
    with pytest.raises(ValueError, match="step must be a non-negative int, got True"):
        frozen((high, low), step=True)
    frozen.eval()
    with torch.no_grad():
        frozen((high, low))  # evaluation never needs a step
    with pytest.raises(ValueError, match="queue_length"):
        SwaV(backbone_2d(), 8, 4, 6, n_queues=2)
    with pytest.raises(ValueError, match="n_queues"):
        SwaV(backbone_2d(), 8, 4, 6, n_queues=-1)
    with pytest.raises(ValueError, match=r"num_ftrs must be an int >= 2, got 8.0"):
        SwaV(backbone_2d(), 8.0, 4, 6, n_queues=0)


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
