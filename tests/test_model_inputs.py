"""Arguments of SwaV, its heads and the other modules: integers, flags, the step, the epoch and the crop lists are
checked before anything runs, with errors that name the argument and the value received."""
import copy
import re

import pytest
import torch
import torch.nn.functional as F

from models import backbone_2d, crops_2d
from swav_core import MemoryBankModule, MultiCrop, SwaV, SwaVLoss, SwaVProjectionHead, SwaVPrototypes


class Index:
    """An integer that is not an int, as NumPy's integers are (numpy is not a test dependency)."""

    def __init__(self, value):
        self.value = value

    def __index__(self):
        return self.value


def test_integer_like_arguments_are_accepted_and_stored_as_ints():
    protos = SwaVPrototypes(Index(4), Index(5), n_steps_frozen_prototypes=Index(2))
    assert (protos.input_dim, protos.n_prototypes, protos.n_steps_frozen_prototypes) == (4, 5, 2)
    assert all(type(v) is int for v in (protos.input_dim, protos.n_prototypes, protos.n_steps_frozen_prototypes))
    model = SwaV(backbone_2d(), Index(8), 4, 6, n_queues=Index(2), queue_length=Index(3))
    assert (model.num_ftrs, model.queue_length, len(model.queues)) == (8, 3, 2)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: SwaVPrototypes(4, 5, bias="no"), "bias must be a bool, got 'no'"),
        (lambda: SwaV(backbone_2d(), 8, 4, 6, 0, prototype_bias="no"), "prototype_bias must be a bool, got 'no'"),
        (lambda: SwaV(backbone_2d(), 8, 4, 6, 0, group_crops_by_resolution=2),
         "group_crops_by_resolution must be a bool, got 2"),
        (lambda: SwaV(backbone_2d(), True, 4, 6, 0), "num_ftrs must be an int >= 2, got True"),
    ],
)
def test_bad_constructor_arguments(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_forward_arguments_are_checked_before_any_state_changes(device):
    backbone = torch.nn.Sequential(backbone_2d(), torch.nn.Flatten(), torch.nn.BatchNorm1d(8))
    model = SwaV(backbone, 8, 4, 6, n_queues=2, queue_length=4, n_steps_frozen_prototypes=3).to(device)
    state = copy.deepcopy(model.state_dict())
    high, low = crops_2d(2, device=device)
    cases = [
        (dict(input=(high, low), epoch=0), r"SwaV\(n_steps_frozen_prototypes=3\) needs forward\(input, epoch, step"),
        (dict(input=(high, low), epoch=0, step=-1), "step must be a non-negative int, got -1"),
        (dict(input=(high, low), epoch="1", step=0), "epoch must be a non-negative int, got '1'"),
        (dict(input=(high, low), epoch=-1, step=0), "epoch must be a non-negative int, got -1"),
        (dict(input=(high[0], low), epoch=0, step=0),
         r"the high-resolution crops must be a list of batch tensors \(B, C, \.\.\.\), got a tensor of shape \(2, 3, 12, 12\)"),
        (dict(input=(high, low[0]), epoch=0, step=0), "the low-resolution crops must be a list"),
    ]
    for kwargs, match in cases:
        with pytest.raises(ValueError, match=match):
            model(**kwargs)
    after = model.state_dict()  # BatchNorm statistics, queues and their counters untouched
    assert all(torch.equal(state[k], after[k]) for k in state)


def test_grouped_forward_runs_the_projection_head_once_over_all_crops_in_training(device):
    """FAIR's grouped forward: BatchNorm of the projection head normalises over all V·B rows at once."""
    torch.manual_seed(0)
    model = SwaV(backbone_2d(), 8, 4, 6, n_queues=0, group_crops_by_resolution=True).to(device)
    reference = copy.deepcopy(model)
    calls = []
    model.projection_head.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    high, low = crops_2d(3, n_high=2, n_low=3, device=device)
    out_high, out_low, _ = model((high, low))
    assert calls == [5 * 3]
    with torch.no_grad():
        reference.prototypes.normalize()
        h = torch.cat([reference.backbone(torch.cat(high)), reference.backbone(torch.cat(low))]).flatten(1)
        z = F.normalize(reference.projection_head(h), dim=1)  # batch statistics over all 15 rows
        expected = (z @ reference.prototypes.heads[0].weight.T).split(3)
    for got, want in zip(out_high + out_low, expected):
        torch.testing.assert_close(got, want)


def test_extra_repr():
    text = repr(SwaVPrototypes(16, [30, 10], n_steps_frozen_prototypes=7, bias=True))
    assert "input_dim=16, n_prototypes=[30, 10], n_steps_frozen_prototypes=7, bias=True" in text
    assert "input_dim=8, hidden_dim=6, output_dim=4" in repr(SwaVProjectionHead(8, 6, 4))


@pytest.mark.parametrize(
    "make, name",
    [
        (lambda: MultiCrop(8, 4, flip="no"), "flip"),
        (lambda: MultiCrop(8, 4, scale_per_side="yes"), "scale_per_side"),
        (lambda: MemoryBankModule(4, gather_distributed="no"), "gather_distributed"),
        (lambda: MemoryBankModule(4, feature_dim_first=2), "feature_dim_first"),
        (lambda: SwaVLoss(sinkhorn_gather_distributed="no"), "sinkhorn_gather_distributed"),
    ],
)
def test_flags_must_be_bools(make, name):
    """A string such as "no" is truthy: every on/off argument takes a bool (or 0 / 1) only."""
    with pytest.raises(ValueError, match=f"{name} must be a bool, got"):
        make()


class NumpyStyleBool:
    """Stands for numpy.bool_ (numpy is not a test dependency): not an int, compares equal to 0 or 1."""

    __module__ = "numpy"

    def __init__(self, value):
        self.value = value

    def __eq__(self, other):
        return self.value == other

    def __hash__(self):
        return hash(self.value)

    def __bool__(self):
        return self.value


NumpyStyleBool.__name__ = "bool_"


@pytest.mark.parametrize("value", [True, 0, Index(1), NumpyStyleBool(True), torch.tensor(False)])
def test_flags_take_bool_like_values(value):
    assert MultiCrop(8, 4, flip=value).flip is bool(value)
    assert SwaVPrototypes(4, 5, bias=value).bias is bool(value)



def test_lightly_and_fmcib_call_forms_name_the_call_that_works(device):
    torch.manual_seed(0)
    model = SwaV(backbone_2d(), 8, 4, 5, n_queues=0).to(device)
    high, low = crops_2d(3, device=device)
    with pytest.raises(ValueError, match=re.escape("SwaV takes the crops as one pair: model((high_resolution_crops, "
                                                   "low_resolution_crops), epoch, step=step), got a list as epoch")):
        model(high, low, 0)  # lightly's examples call their own model this way
    with pytest.raises(ValueError, match=re.escape("call model((high, low), epoch, step=step)")):
        model(high[0])
    outputs = model((high, low))
    with pytest.raises(ValueError, match=re.escape("SwaVLoss takes the model's three outputs as three arguments: "
                                                   "criterion(*model(crops))")):
        SwaVLoss()(outputs)  # fmcib's own loss takes the triple
    assert SwaVLoss()(*outputs).ndim == 0
