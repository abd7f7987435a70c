"""Projection head and prototypes: checkpoint keys, fp64 oracles, normalize() and prototype freezing."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch import nn

from swav_core import SwaVProjectionHead, SwaVPrototypes
from strategies import examples, optimizer_configs, prototype_configs


# ---- projection head ---------------------------------------------------------------------------
def test_projection_head_state_dict_keys():
    keys = set(SwaVProjectionHead(8, 6, 4).state_dict())
    bn = {f"layers.1.{k}" for k in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")}
    assert keys == {"layers.0.weight", "layers.3.weight", "layers.3.bias"} | bn


def test_projection_head_matches_fp64_formula(device):
    head = SwaVProjectionHead(8, 6, 4).to(device).train()
    nn.init.normal_(head.layers[1].weight)
    nn.init.normal_(head.layers[1].bias)
    x = torch.randn(5, 8, device=device)
    z = head(x)
    assert z.shape == (5, 4)
    w1, bn, w2 = (m.double() for m in (head.layers[0].weight, head.layers[1], head.layers[3]))
    h = x.double() @ w1.T  # (B, hidden)
    h = (h - h.mean(0)) / torch.sqrt(h.var(0, unbiased=False) + bn.eps) * bn.weight + bn.bias
    expected = h.clamp_min(0) @ w2.weight.T + w2.bias  # (B, D)
    torch.testing.assert_close(z.double(), expected, rtol=1e-5, atol=1e-5)


# ---- prototypes: layout and scores -------------------------------------------------------------
@pytest.mark.parametrize("bias", [False, True])
def test_prototype_state_dict_keys(bias):
    keys = set(SwaVPrototypes(4, [3, 5], bias=bias).state_dict())
    weights, biases = ({f"heads.{i}.{k}" for i in range(2)} for k in ("weight", "bias"))
    assert keys == weights | (biases if bias else set())
    assert set(SwaVPrototypes(4, 3, bias=bias).state_dict()) == {"heads.0.weight"} | (
        {"heads.0.bias"} if bias else set()
    )


@pytest.mark.parametrize("bias", [False, True])
def test_prototype_scores_int_and_list(device, bias):
    x = torch.randn(6, 4, device=device)
    single = SwaVPrototypes(4, 7, bias=bias).to(device)
    scores = single(x)
    assert isinstance(scores, torch.Tensor) and scores.shape == (6, 7)
    head = single.heads[0]
    expected = x.double() @ head.weight.double().T + (head.bias.double() if bias else 0)
    torch.testing.assert_close(scores.double(), expected, rtol=1e-6, atol=1e-6)
    multi = SwaVPrototypes(4, [7, 2, 3], bias=bias).to(device)
    out = multi(x)
    assert isinstance(out, list) and [s.shape for s in out] == [(6, 7), (6, 2), (6, 3)]


@settings(max_examples=examples(30))
@given(
    k=st.integers(1, 40),
    dim=st.integers(1, 300),
    zero_rows=st.integers(0, 3),
    log_scale=st.floats(-20, 20),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]),
)
@example(k=1, dim=1, zero_rows=1, log_scale=0.0, dtype=torch.float32)  # a single zero prototype
# Found by the deep profile: float64 cosine similarity of 257 terms is itself off by 3 eps.
@example(k=28, dim=257, zero_rows=3, log_scale=-5.042237455113996, dtype=torch.float64)
def test_normalize_unit_idempotent_direction(device, k, dim, zero_rows, log_scale, dtype):
    protos = SwaVPrototypes(dim, [k, 2]).to(device=device, dtype=dtype)
    with torch.no_grad():
        protos.heads[0].weight.mul_(2.0**log_scale)
        protos.heads[0].weight[:zero_rows] = 0
    before = [h.weight.detach().double().clone() for h in protos.heads]
    protos.normalize()
    eps = torch.finfo(dtype).eps
    for h, w0 in zip(protos.heads, before):
        w = h.weight.detach().double()
        assert torch.isfinite(w).all()
        nonzero = w0.norm(dim=1) > 0
        assert torch.equal(w[~nonzero], w0[~nonzero])  # zero rows stay zero
        norms = w[nonzero].norm(dim=1)
        # Narrower dtypes: norms and scaling in float64 are exact enough that only each element's
        # rounding to the dtype (<= eps/2 relatively) counts. float64: normalize()'s norm and this one
        # each sum D squares in some order, off by at most (D/2 + 1)u (u = eps/2, Higham's bound for a
        # sum, halved by the square root), and the scaling adds 2u.
        atol = (dim + 4) * eps / 2 if dtype == torch.float64 else 2 * eps
        torch.testing.assert_close(norms, torch.ones_like(norms), rtol=0, atol=atol)
        # Same direction: each row is its old row times one scale, up to one rounding per element
        # (u = eps/2) and, for float64, one more in the test's own quotient: the ratios of a row
        # spread by at most 2eps (float64) or eps (rounded to a narrower dtype, quotient exact enough).
        ratio = torch.where(w0 != 0, w / w0, torch.nan)[nonzero]  # (rows, D)
        high, low = ratio.nan_to_num(-torch.inf).amax(dim=1), ratio.nan_to_num(torch.inf).amin(dim=1)
        spread = 2 * eps if dtype == torch.float64 else eps + 2.0**-50
        assert bool((high - low <= spread * low * (1 + 2.0**-40)).all()), ((high - low) / low).max()
    once = [h.weight.detach().clone() for h in protos.heads]
    protos.normalize()
    for h, w1 in zip(protos.heads, once):
        assert torch.equal(h.weight, w1)  # exactly idempotent: frozen prototypes stay bit-identical


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(input_dim=0), "input_dim must be a positive int, got 0"),
        (dict(n_prototypes=[]), r"non-empty list of them, got \[\]"),
        (dict(n_prototypes=[3, 0]), "every entry of n_prototypes must be a positive int, got 0"),
        (dict(n_prototypes=2.5), "got 2.5"),
        (dict(n_steps_frozen_prototypes=-1), "n_steps_frozen_prototypes must be a non-negative int, got -1"),
        (dict(n_steps_frozen_prototypes=True), "got True"),
    ],
)
def test_prototype_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SwaVPrototypes(**kwargs)


def test_bad_forward_inputs(device):
    with pytest.raises(ValueError, match=r"hidden_dim must be a positive int, got -3"):
        SwaVProjectionHead(4, -3, 2)
    with pytest.raises(ValueError, match=r"SwaVProjectionHead expects .*\(B, 4\), got \(2, 5\)"):
        SwaVProjectionHead(4, 3, 2).to(device)(torch.ones(2, 5, device=device))
    protos = SwaVPrototypes(4, 3, n_steps_frozen_prototypes=2).to(device)
    with pytest.raises(ValueError, match=r"SwaVPrototypes expects .*\(B, 4\), got \(4,\)"):
        protos(torch.ones(4, device=device), step=0)
    with pytest.raises(ValueError, match=r"n_steps_frozen_prototypes=2\) needs forward\(x, step=...\)"):
        protos(torch.ones(2, 4, device=device))
    with pytest.raises(ValueError, match="step must be a non-negative int, got 0.5"):
        protos(torch.ones(2, 4, device=device), step=0.5)
    with pytest.raises(ValueError, match="step must be a non-negative int, got -1"):
        protos(torch.ones(2, 4, device=device), step=-1)


# ---- freezing ----------------------------------------------------------------------------------
def _lars_step(params, lr, weight_decay, trust):
    """A LARS-style update written here: trust-ratio scaled SGD that skips parameters without grad."""
    with torch.no_grad():
        for p in params:
            if p.grad is None:
                continue
            g = p.grad + weight_decay * p
            ratio = trust * p.norm() / (g.norm() + 1e-12) if p.norm() > 0 else torch.ones(())
            p.sub_(lr * ratio * g)


def _make_optimizer(name, hp, params):
    params = list(params)
    if name == "sgd":
        return torch.optim.SGD(params, **hp)
    if name == "adam":
        return torch.optim.Adam(params, **hp)
    if name == "adamw":
        return torch.optim.AdamW(params, **hp)

    class Lars:
        state = {}

        def step(self):
            _lars_step(params, **hp)

    return Lars()


def _loss(scores, targets):
    scores = scores if isinstance(scores, list) else [scores]
    # the squared term keeps every gradient non-zero, also for a single prototype (K = 1)
    return sum(F.cross_entropy(s / 0.1, t % s.shape[1]) + s.pow(2).mean() for s, t in zip(scores, targets))


@settings(max_examples=examples(25))
@given(
    config=prototype_configs(),
    opt=optimizer_configs(),
    extra_steps=st.integers(1, 2),
    crops=st.integers(1, 3),
    set_to_none=st.booleans(),
)
@example(config=(3, 4, 2, False), opt=("adam", dict(lr=0.1, weight_decay=0.1)), extra_steps=1, crops=2,
         set_to_none=False)
@example(config=(1, 1, 0, False), opt=("sgd", dict(lr=0.5, momentum=0.0, weight_decay=0.0625)), extra_steps=1,
         crops=1, set_to_none=False)  # K = 1: cross-entropy alone has no gradient
def test_frozen_prototypes_do_not_move(device, config, opt, extra_steps, crops, set_to_none):
    dim, ks, n, bias = config
    features = nn.Linear(5, dim).to(device)
    protos = SwaVPrototypes(dim, ks, n_steps_frozen_prototypes=n, bias=bias).to(device)
    optimizer = _make_optimizer(opt[0], opt[1], list(features.parameters()) + list(protos.parameters()))
    protos.normalize()  # as SwaV does before every forward
    frozen = [p.detach().clone() for p in protos.parameters()]
    targets = torch.randint(0, 100, (3, 6), device=device)
    for step in range(n + extra_steps):
        protos.normalize()
        before = [p.detach().clone() for p in protos.parameters()]
        if hasattr(optimizer, "zero_grad"):
            optimizer.zero_grad(set_to_none=set_to_none)
        else:
            for p in list(features.parameters()) + list(protos.parameters()):
                p.grad = None
        loss = sum(_loss(protos(features(torch.randn(6, 5, device=device)), step=step), targets)
                   for _ in range(crops))
        loss.backward()
        assert features.weight.grad is not None and features.weight.grad.abs().sum() > 0
        if step < n:
            assert all(p.grad is None for p in protos.parameters())
        else:
            assert all(p.grad is not None for p in protos.parameters())
        optimizer.step()
        if step < n:
            assert all(torch.equal(p, f) for p, f in zip(protos.parameters(), frozen))
            assert not any(p in optimizer.state for p in protos.parameters())
        else:  # every head's weight (and bias) trains again
            assert all(not torch.equal(p, b) for p, b in zip(protos.parameters(), before))


def test_externally_frozen_prototypes_stay_frozen(device):
    features = nn.Linear(5, 3).to(device)
    protos = SwaVPrototypes(3, 4, n_steps_frozen_prototypes=1).to(device)
    protos.requires_grad_(False)
    optimizer = torch.optim.AdamW(list(features.parameters()) + list(protos.parameters()), weight_decay=0.1)
    w0 = protos.heads[0].weight.clone()
    for step in range(3):
        optimizer.zero_grad()
        protos(features(torch.randn(4, 5, device=device)), step=step).logsumexp(1).sum().backward()
        optimizer.step()
        assert not protos.heads[0].weight.requires_grad and protos.heads[0].weight.grad is None
        assert features.weight.grad is not None
    assert torch.equal(protos.heads[0].weight, w0)


def test_eval_and_no_grad_need_no_step_but_freeze_with_one(device):
    features = nn.Linear(5, 3).to(device)
    protos = SwaVPrototypes(3, 4, n_steps_frozen_prototypes=5).to(device)
    x = torch.randn(2, 3, device=device)
    with torch.no_grad():
        assert protos(x).shape == (2, 4)
    protos.eval()  # e.g. to keep BatchNorm statistics fixed while training on
    protos(features(torch.randn(2, 5, device=device))).sum().backward()
    assert protos.heads[0].weight.grad is not None  # no step: nothing frozen
    protos.zero_grad(set_to_none=True)
    protos(features(torch.randn(2, 5, device=device)), step=4).sum().backward()
    assert protos.heads[0].weight.grad is None and features.weight.grad is not None  # step 4 < 5
    protos.train()
    with pytest.raises(ValueError, match="needs forward"):
        protos(x)


def test_aborted_backward_does_not_disarm_freezing(device):
    features = nn.Linear(5, 3).to(device)
    protos = SwaVPrototypes(3, 4, n_steps_frozen_prototypes=2).to(device)

    def fail(grad):
        raise RuntimeError("abort this backward")

    z = features(torch.randn(4, 5, device=device))
    scores = protos(z, step=0)
    z.register_hook(fail)  # runs after the scores' hook has queued its callback
    with pytest.raises(RuntimeError, match="abort this backward"):
        scores.sum().backward()
    protos(features(torch.randn(4, 5, device=device)), step=1).sum().backward()
    assert protos.heads[0].weight.grad is None and features.weight.grad is not None
