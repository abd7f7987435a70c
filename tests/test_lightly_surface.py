"""The public surface a lightly (1.6) or fmcib user's code touches, name for name, checked without lightly.

Each block pins one module: its constructor keywords in lightly's order with lightly's defaults
(``inspect.signature``), its methods and attributes, and what they hold after real calls (values
against fp64 formulas or hand-built expectations). swav_core's documented extras (``bias``,
``prototype_bias``, ``group_crops_by_resolution``) may only follow lightly's parameters, with defaults.
"""
import inspect
import math
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import swav_core
from oracles import assert_matches_oracle, make_crops, per_pair_oracle, textbook_fp64
from swav_core import MemoryBankModule, SwaV, SwaVLoss, SwaVProjectionHead, SwaVPrototypes, sinkhorn

REQUIRED = inspect.Parameter.empty


def assert_params(fn, expected, extras=None):
    """``fn``'s parameters (``self`` excluded) start with exactly ``expected`` (name, default), in order;
    the rest are exactly ``extras`` (swav_core's documented additions) or, when None, any with a default."""
    params = [p for p in inspect.signature(fn).parameters.values() if p.name != "self"]
    got = [(p.name, p.default) for p in params]
    assert got[: len(expected)] == list(expected)
    if extras is not None:
        assert got[len(expected):] == list(extras)
    assert all(default is not REQUIRED for _, default in got[len(expected):]), "additions need defaults"
    kinds = {p.kind for p in params}
    assert kinds <= {inspect.Parameter.POSITIONAL_OR_KEYWORD}, "callable by position and by keyword"


def test_public_names_without_lightly():
    names = {"SwaVProjectionHead", "SwaVPrototypes", "MemoryBankModule", "SwaVLoss", "sinkhorn", "SwaV"}
    assert names <= set(swav_core.__all__)
    assert all(callable(getattr(swav_core, name)) for name in names)
    assert "lightly" not in sys.modules and "fmcib" not in sys.modules


# ---- SwaVProjectionHead ------------------------------------------------------------------------


def test_projection_head_surface():
    head_params = [("input_dim", 2048), ("hidden_dim", 2048), ("output_dim", 128)]
    assert_params(SwaVProjectionHead.__init__, head_params, ())
    assert_params(SwaVProjectionHead.forward, [("x", REQUIRED)], ())
    head = SwaVProjectionHead()
    assert set(head.state_dict()) == {
        "layers.0.weight", "layers.1.weight", "layers.1.bias", "layers.1.running_mean",
        "layers.1.running_var", "layers.1.num_batches_tracked", "layers.3.weight", "layers.3.bias",
    }
    assert head.layers[0].weight.shape == (2048, 2048) and head.layers[3].weight.shape == (128, 2048)


def test_projection_head_computes_linear_bn_relu_linear(device):
    head = SwaVProjectionHead(6, 5, 4).to(device).eval()
    bn = head.layers[1]
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2), bn.weight.uniform_(0.5, 2)
        bn.bias.uniform_(-1, 1)
    x = torch.randn(3, 6, device=device)
    d = lambda t: t.detach().cpu().double()  # noqa: E731
    h = d(x) @ d(head.layers[0].weight).T
    h = (h - d(bn.running_mean)) / torch.sqrt(d(bn.running_var) + bn.eps) * d(bn.weight) + d(bn.bias)
    expected = h.clamp_min(0) @ d(head.layers[3].weight).T + d(head.layers[3].bias)
    torch.testing.assert_close(d(head(x)), expected, rtol=1e-5, atol=1e-6)


# ---- SwaVPrototypes ----------------------------------------------------------------------------


def test_prototypes_surface():
    assert_params(
        SwaVPrototypes.__init__,
        [("input_dim", 128), ("n_prototypes", 3000), ("n_steps_frozen_prototypes", 0)],
        [("bias", False)],
    )
    assert_params(SwaVPrototypes.forward, [("x", REQUIRED), ("step", None)], ())
    assert_params(SwaVPrototypes.normalize, [], ())
    protos = SwaVPrototypes()
    assert protos.n_steps_frozen_prototypes == 0
    assert isinstance(protos.heads, nn.ModuleList) and len(protos.heads) == 1
    assert isinstance(protos.heads[0], nn.Linear) and protos.heads[0].weight.shape == (3000, 128)


@pytest.mark.parametrize("bias", [False, True])
def test_prototypes_heads_scores_and_normalize(device, bias):
    protos = SwaVPrototypes(4, [3, 5], bias=bias).to(device)
    keys = {f"heads.{i}.{p}" for i in range(2) for p in (["weight", "bias"] if bias else ["weight"])}
    assert set(protos.state_dict()) == keys
    assert protos.normalize() is None
    for head in protos.heads:
        norms = head.weight.detach().double().norm(dim=1)
        torch.testing.assert_close(norms, torch.ones_like(norms))
    x = torch.randn(6, 4, device=device)
    scores = protos(x, 0)  # lightly passes the step positionally
    assert isinstance(scores, list) and [s.shape for s in scores] == [(6, 3), (6, 5)]
    for s, head in zip(scores, protos.heads):
        expected = x.double() @ head.weight.double().T + (head.bias.double() if bias else 0)
        torch.testing.assert_close(s.double(), expected, rtol=1e-5, atol=1e-6)
    single = SwaVPrototypes(4, 3).to(device)
    assert isinstance(single(x), torch.Tensor) and single(x).shape == (6, 3)


def test_prototypes_frozen_by_step_as_lightly(device):
    """lightly freezes for ``step < n_steps_frozen_prototypes`` (no gradient reaches the prototypes)
    and raises when a training forward omits the step."""
    protos = SwaVPrototypes(4, 6, n_steps_frozen_prototypes=2).to(device).train()
    x = torch.randn(5, 4, device=device, requires_grad=True)
    for step, frozen in [(0, True), (1, True), (2, False), (7, False)]:
        protos.zero_grad(set_to_none=True)
        x.grad = None
        protos(x, step).logsumexp(dim=1).sum().backward()
        assert (protos.heads[0].weight.grad is None) == frozen
        assert x.grad is not None and bool(x.grad.abs().sum() > 0)
    with pytest.raises(ValueError, match="step"):
        protos(x)


# ---- MemoryBankModule --------------------------------------------------------------------------


def _rows(first, n, dim, device):
    """n distinct rows, row r holding (first + r) * (1, 2, ..., dim): exact in float32."""
    ids = torch.arange(first, first + n, dtype=torch.float32, device=device)
    return ids[:, None] * torch.arange(1, dim + 1, dtype=torch.float32, device=device)


def test_memory_bank_surface():
    assert_params(
        MemoryBankModule.__init__,
        [("size", 65536), ("gather_distributed", False), ("feature_dim_first", True)],
        (),
    )
    assert_params(MemoryBankModule.forward, [("output", REQUIRED), ("labels", None), ("update", False)], ())
    mb = MemoryBankModule()
    assert mb.size == 65536 and mb.gather_distributed is False and mb.feature_dim_first is True
    mb = MemoryBankModule(size=(4, 2), gather_distributed=False, feature_dim_first=False)
    assert mb.size == (4, 2) and mb.feature_dim_first is False


def test_memory_bank_bank_and_bank_ptr(device):
    mb = MemoryBankModule(size=(4, 2)).to(device)
    assert mb.bank.shape == (4, 2) and mb.bank.dtype == torch.float32 and mb.bank.device.type == device
    assert torch.equal(mb.bank, torch.zeros(4, 2, device=device))  # empty slots are zeros
    ptr = mb.bank_ptr
    assert ptr.shape == (1,) and ptr.dtype == torch.long and ptr.tolist() == [0]
    a, b = _rows(1, 2, 2, device), _rows(3, 3, 2, device)
    mb(a, update=True)
    assert mb.bank_ptr.tolist() == [2] and torch.equal(mb.bank[:2], a)
    storage = mb.bank.data_ptr()
    mb(b, update=True)  # wraps around: b[0], b[1] into slots 2, 3, b[2] into slot 0
    assert mb.bank_ptr.tolist() == [1]
    assert torch.equal(mb.bank, torch.stack([b[2], a[1], b[0], b[1]]))
    assert mb.bank.data_ptr() == storage, "bank is the storage itself, written in place, not a copy"
    assert not any(name.split(".")[-1] in ("bank", "bank_ptr") for name, _ in mb.named_buffers()), (
        "registered buffers are what DDP broadcasts from rank 0 over every rank's queue"
    )


@pytest.mark.parametrize("feature_dim_first", [True, False])
def test_memory_bank_forward_returns_bank_before_update(device, feature_dim_first):
    mb = MemoryBankModule(size=(5, 3), feature_dim_first=feature_dim_first).to(device)
    shape = (3, 5) if feature_dim_first else (5, 3)
    first = _rows(1, 2, 3, device)
    out, bank = mb(first)  # update=False: nothing stored
    assert out is first and bank.shape == shape and not bool(bank.any())
    assert mb.bank_ptr.tolist() == [0] and not bool(mb.bank.any())
    out, bank = mb(first, labels=torch.arange(2, device=device), update=True)  # labels are ignored
    assert out is first and not bool(bank.any()) and mb.bank_ptr.tolist() == [2]
    second = _rows(7, 2, 3, device)
    _, bank = mb(second, update=True)
    before = bank.T if feature_dim_first else bank
    assert torch.equal(before[:2], first) and not bool(before[2:].any())
    assert not bank.requires_grad
    bank.fill_(-1.0)  # a copy: the queue does not see it
    assert torch.equal(mb.bank[:4], torch.cat([first, second]))


def test_memory_bank_size_zero_and_int_size(device):
    x = torch.randn(3, 4, device=device)
    out, bank = MemoryBankModule(size=0)(x, update=True)
    assert out is x and bank is None
    mb = MemoryBankModule(size=6).to(device)  # lightly's examples pass an int: D from the first batch
    _, bank = mb(x, update=True)
    assert bank.shape == (4, 6) and mb.bank.shape == (6, 4) and torch.equal(mb.bank[:3], x)


class _NegativesLoss(MemoryBankModule):
    """A loss built the way lightly's docstring shows: subclass, then ``super().forward(..., update=True)``."""

    def __init__(self, memory_bank_size=(8, 3)):
        super().__init__(memory_bank_size)

    def forward(self, output, labels=None):
        output, negatives = super().forward(output, update=True)  # negatives (D, length)
        return (output @ negatives).sum()


def test_memory_bank_subclass_as_lightly_losses(device):
    loss_fn = _NegativesLoss().to(device)
    a = torch.randn(2, 3, device=device)
    assert loss_fn(a).item() == 0.0  # an empty bank is zeros
    b = torch.randn(2, 3, device=device, requires_grad=True)
    value = loss_fn(b)
    torch.testing.assert_close(value.double(), (b.double() @ a.double().T).sum(), rtol=1e-6, atol=1e-6)
    value.backward()  # through the output only; the bank is detached
    torch.testing.assert_close(b.grad, a.sum(0).expand(2, 3))
    assert loss_fn.bank_ptr.tolist() == [4] and torch.equal(loss_fn.bank[2:4], b.detach())
    restored = _NegativesLoss().to(device)
    restored.load_state_dict(loss_fn.state_dict())
    assert torch.equal(restored.bank, loss_fn.bank) and restored.bank_ptr.tolist() == [4]


def test_memory_bank_loads_lightly_state_dict_strict(device):
    """lightly's bank is a non-persistent buffer: its state_dict holds no queue state."""
    mb = MemoryBankModule(size=(4, 2)).to(device)
    mb(torch.ones(3, 2, device=device), update=True)
    result = mb.load_state_dict({}, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert mb.bank_ptr.tolist() == [0] and not bool(mb.bank.any())


# ---- SwaVLoss and sinkhorn ---------------------------------------------------------------------


def test_loss_and_sinkhorn_surface():
    assert_params(
        SwaVLoss.__init__,
        [("temperature", 0.1), ("sinkhorn_iterations", 3), ("sinkhorn_epsilon", 0.05),
         ("sinkhorn_gather_distributed", False)],
        (),
    )
    assert_params(
        SwaVLoss.forward,
        [("high_resolution_outputs", REQUIRED), ("low_resolution_outputs", REQUIRED), ("queue_outputs", None)],
        (),
    )
    assert_params(SwaVLoss.subloss, [("z", REQUIRED), ("q", REQUIRED)], ())
    # sinkhorn: lightly's four parameters first; swav_core may add keywords after them
    sinkhorn_params = [("out", REQUIRED), ("iterations", 3), ("epsilon", 0.05), ("gather_distributed", False)]
    assert_params(sinkhorn, sinkhorn_params)
    loss = SwaVLoss()
    assert (loss.temperature, loss.sinkhorn_iterations, loss.sinkhorn_epsilon) == (0.1, 3, 0.05)
    assert loss.sinkhorn_gather_distributed is False


@pytest.mark.parametrize("temperature", [0.1, 0.5])
def test_subloss_is_the_cross_entropy(device, temperature):
    g = torch.Generator().manual_seed(1)
    z = (torch.rand(6, 9, generator=g) * 2 - 1).to(device).requires_grad_(True)
    q = torch.softmax(torch.randn(6, 9, generator=g), dim=1).to(device)
    value = SwaVLoss(temperature=temperature).subloss(z, q)
    expected = -(q.double() * F.log_softmax(z.double() / temperature, dim=1)).sum(dim=1).mean()
    assert value.shape == ()
    torch.testing.assert_close(value.double(), expected, rtol=1e-6, atol=1e-7)
    value.backward()
    assert z.grad is not None


class _DoubledLoss(SwaVLoss):
    def subloss(self, z, q):
        return 2 * super().subloss(z, q)


class _SquaredErrorLoss(SwaVLoss):
    def subloss(self, z, q):
        return ((torch.softmax(z / self.temperature, dim=1) - q) ** 2).sum(dim=1).mean()


def test_subloss_override_changes_forward(device):
    """lightly's forward calls ``self.subloss(z_v, q_i)`` for every pair, so a subclass that overrides
    it changes the loss."""
    high, low, queue = make_crops(2, 3, 5, 8, [6, 6], 0, device)
    base = per_pair_oracle(high, low, queue)
    torch.testing.assert_close(_DoubledLoss()(high, low, queue).double().cpu(), 2 * base, rtol=1e-5, atol=1e-6)
    crops = [z.cpu().double() for z in high + low]
    total = 0.0
    for i in range(2):
        q = textbook_fp64(torch.cat([high[i], queue[i]]))[:5]
        pairs = [((torch.softmax(z / 0.1, dim=1) - q) ** 2).sum(dim=1).mean()
                 for v, z in enumerate(crops) if v != i]
        total += sum(pairs) / (len(crops) - 1)
    # the codes enter linearly here; sinkhorn's guarantee is 1e-4 relative per element
    value = _SquaredErrorLoss()(high, low, queue).double().cpu()
    torch.testing.assert_close(value, total / 2, rtol=1e-4, atol=1e-6)


def test_loss_forward_by_keyword_matches_oracle(device):
    high, low, queue = make_crops(2, 4, 6, 10, [12, 12], 3, device)
    loss = SwaVLoss()(high_resolution_outputs=high, low_resolution_outputs=low, queue_outputs=queue)
    assert loss.shape == () and loss.dtype == torch.float32
    expected = per_pair_oracle(high, low, queue).double()
    torch.testing.assert_close(loss.double().cpu(), expected, rtol=1e-5, atol=1e-6)
    uniform = [torch.zeros(6, 10, device=device)] * 2
    torch.testing.assert_close(SwaVLoss()(uniform, uniform).item(), math.log(10), rtol=1e-6, atol=1e-7)


def test_gather_distributed_flag(device, monkeypatch):
    high, low, _ = make_crops(2, 2, 4, 7, None, 5, device)
    # without a process group the flag changes nothing
    assert torch.equal(SwaVLoss(sinkhorn_gather_distributed=True)(high, low), SwaVLoss()(high, low))
    monkeypatch.setattr(torch.distributed, "is_available", lambda: False)
    with pytest.raises(ValueError, match="sinkhorn_gather_distributed"):
        SwaVLoss(sinkhorn_gather_distributed=True)
    SwaVLoss()  # the default needs no torch.distributed


def test_sinkhorn_called_by_keyword(device):
    scores = make_crops(1, 0, 16, 12, None, 2, device)[0][0].requires_grad_(True)
    q = sinkhorn(out=scores, iterations=3, epsilon=0.05, gather_distributed=False)
    assert q.shape == (16, 12) and q.dtype == torch.float32 and not q.requires_grad
    assert_matches_oracle(q, textbook_fp64(scores))
    torch.testing.assert_close(sinkhorn(scores), q, rtol=0, atol=0)


# ---- fmcib's SwaV ------------------------------------------------------------------------------


def _backbone():
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1))


def test_swav_surface():
    assert_params(
        SwaV.__init__,
        [("backbone", REQUIRED), ("num_ftrs", REQUIRED), ("out_dim", REQUIRED), ("n_prototypes", REQUIRED),
         ("n_queues", REQUIRED), ("queue_length", 0), ("start_queue_at_epoch", 0),
         ("n_steps_frozen_prototypes", 0)],
        [("prototype_bias", False), ("group_crops_by_resolution", False)],
    )
    assert_params(SwaV.forward, [("input", REQUIRED), ("epoch", None), ("step", None)], ())
    backbone = _backbone()
    model = SwaV(backbone, 8, 4, 10, 2, 6, 3, 5)  # fmcib's positional order
    assert model.backbone is backbone
    assert isinstance(model.projection_head, SwaVProjectionHead)
    assert [m.weight.shape for m in model.projection_head.layers[::3]] == [(4, 8), (4, 4)]  # num_ftrs // 2
    assert isinstance(model.prototypes, SwaVPrototypes) and model.prototypes.n_steps_frozen_prototypes == 5
    assert model.prototypes.heads[0].weight.shape == (10, 4)
    assert isinstance(model.queues, nn.ModuleList) and len(model.queues) == 2
    assert all(isinstance(q, MemoryBankModule) and q.bank.shape == (6, 4) for q in model.queues)
    assert (model.queue_length, model.start_queue_at_epoch) == (6, 3)
    assert SwaV(_backbone(), 8, 4, 10, 0).queues is None


def test_swav_forward_contract(device):
    model = SwaV(_backbone(), 8, 4, 10, n_queues=2, queue_length=6).to(device)
    g = torch.Generator().manual_seed(0)
    for step in range(4):
        high = [torch.randn(3, 3, 12, 12, generator=g).to(device) for _ in range(2)]
        low = [torch.randn(3, 3, 6, 6, generator=g).to(device) for _ in range(3)]
        out = model((high, low), 0, step)
        assert isinstance(out, tuple) and len(out) == 3
        out_high, out_low, queue = out
        assert [s.shape for s in out_high + out_low] == [(3, 10)] * 5
        if step < 2:  # 3 rows a step: the queues of 6 are full before step 2
            assert queue is None
        else:
            assert [s.shape for s in queue] == [(6, 10)] * 2 and not any(s.requires_grad for s in queue)


class _LightlyLikeSwaV(nn.Module):
    """The module tree of fmcib's SwaV on lightly (plain torch): what its state_dict keys come from."""

    def __init__(self, num_ftrs, out_dim, n_prototypes):
        super().__init__()
        self.backbone = _backbone()
        self.projection_head = nn.Module()
        self.projection_head.layers = nn.Sequential(
            nn.Linear(num_ftrs, num_ftrs // 2, bias=False), nn.BatchNorm1d(num_ftrs // 2), nn.ReLU(),
            nn.Linear(num_ftrs // 2, out_dim),
        )
        self.prototypes = nn.Module()
        self.prototypes.heads = nn.ModuleList([nn.Linear(out_dim, n_prototypes)])  # lightly: with bias

    def forward(self, x):
        z = F.normalize(self.projection_head.layers(self.backbone(x).flatten(1)), dim=1)
        head = self.prototypes.heads[0]
        return F.linear(z, F.normalize(head.weight, dim=1), head.bias)


def test_lightly_state_dict_loads_strict_into_prototype_bias(device):
    ref = _LightlyLikeSwaV(8, 4, 10)
    with torch.no_grad():
        for t in ref.state_dict().values():
            if t.is_floating_point():
                t.uniform_(0.5, 1.5)
    state = ref.state_dict()
    assert {k.split(".")[0] for k in state} == {"backbone", "projection_head", "prototypes"}
    assert {"prototypes.heads.0.weight", "prototypes.heads.0.bias"} <= set(state)
    model = SwaV(_backbone(), 8, 4, 10, n_queues=2, queue_length=6, prototype_bias=True)
    result = model.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert all(q.bank_ptr.tolist() == [0] and not bool(q.bank.any()) for q in model.queues)
    model, ref = model.to(device).eval(), ref.to(device).eval()
    x = torch.randn(3, 3, 12, 12, device=device)
    high, _, queue = model(([x, x], []))
    assert queue is None
    torch.testing.assert_close(high[0], ref(x), rtol=1e-5, atol=1e-5)


def test_remaining_differences_from_lightly_and_fmcib(device):
    """The README's difference rows without a test elsewhere: sizes are kept as given (lightly stores a
    tuple / list), newer lightly's ``dim_first`` keyword is 1.6's ``feature_dim_first``, fmcib's
    ``num_features_queued`` is each queue's ``num_filled``, and fmcib's own loss took the model's output
    triple where swav_core's (lightly's) takes its three parts: ``loss(*model(crops))``."""
    assert MemoryBankModule(size=8).size == 8 and SwaVPrototypes(4, 5).n_prototypes == 5
    assert SwaVPrototypes(4, [5, 3]).n_prototypes == [5, 3]
    with pytest.raises(TypeError):
        MemoryBankModule(size=8, dim_first=False)
    backbone = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1))
    model = SwaV(backbone, 4, 4, 6, n_queues=2, queue_length=4).to(device)
    assert not hasattr(model, "num_features_queued")
    crops = ([torch.randn(2, 3, 8, 8, device=device) for _ in range(2)], [torch.randn(2, 3, 6, 6, device=device)])
    loss = SwaVLoss()(*model(crops, epoch=0, step=0))
    assert loss.shape == () and torch.isfinite(loss)
    assert [q.num_filled for q in model.queues] == [2, 2]


def test_every_public_forward_documents_itself():
    """``help(SwaV.forward)`` and the others show their own text, not torch's generic ``Module.forward``."""
    for cls in (SwaV, SwaVLoss, SwaVProjectionHead, SwaVPrototypes, MemoryBankModule):
        doc = inspect.getdoc(cls.forward)
        assert cls.forward is not nn.Module.forward and doc and doc != inspect.getdoc(nn.Module.forward), cls
