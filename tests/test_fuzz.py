"""A fuzz of the public API over dtypes, shapes, non-finite values and memory layouts (issue 12).

Each call has two allowed outcomes: a correct result, checked against an oracle (and finite wherever the
contract promises it), or a ValueError / TypeError whose message names the argument at fault. Any other
exception, a NaN or inf the contract does not allow, or a wrong answer is a bug. Inputs the contract
leaves valid with finite values of moderate size must succeed. The heads, SwaV and MultiCrop check no
values (that costs a host sync): given NaN, inf or values their arithmetic overflows on, their result
must equal the same call on a contiguous copy, NaN for NaN.
"""
import collections
import copy
import math
from typing import NamedTuple, Tuple

import pytest
import torch
import torch.nn.functional as F
from hypothesis import event, example, given, settings
from hypothesis import strategies as st
from torch import nn

from oracles import per_pair_oracle
from strategies import examples, multicrop_configs
from swav_core import MemoryBankModule, MultiCrop, SwaV, SwaVLoss, SwaVProjectionHead, SwaVPrototypes, sinkhorn
from test_memory_bank import _push_model

FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
DTYPES = FLOATS + (torch.int64, torch.bool)
LAYOUTS = ("contiguous", "strided", "transposed", "expanded", "offset", "channels_last")
HUGE = {torch.float16: 6e4, torch.bfloat16: 1e38, torch.float32: 1e38, torch.float64: 1e300, torch.int64: 2**62}
VALUES = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf, "huge": 1.0, "-huge": -1.0}  # huge: × HUGE


class Fuzzed(NamedTuple):
    """A tensor recipe: values U(-1, 1) (integers: U(-8, 8)) from ``seed``, with the entries at the flat
    indices of ``bad`` set to NaN, ±inf or ±HUGE, in ``dtype``, laid out in memory as ``layout`` says."""
    shape: Tuple[int, ...]
    dtype: torch.dtype = torch.float32
    layout: str = "contiguous"
    bad: Tuple[Tuple[int, str], ...] = ()
    seed: int = 0


@st.composite
def fuzzed(draw, shape, *, wild=True):
    """A Fuzzed of ``shape`` in any layout. ``wild``: any dtype, some entries NaN, ±inf or ±HUGE, and one
    time in three one dim 0, the last dim dropped or one more dim; else a floating dtype, finite values."""
    shape = tuple(shape)
    change = draw(st.sampled_from(["same"] * 6 + ["zero", "fewer", "more"])) if wild else "same"
    if change == "zero" and shape:
        i = draw(st.integers(0, len(shape) - 1))
        shape = shape[:i] + (0,) + shape[i + 1:]
    elif change in ("fewer", "more"):
        shape = shape[:-1] if change == "fewer" else shape + (draw(st.integers(1, 3)),)
    bad = st.lists(st.tuples(st.integers(0, 999), st.sampled_from(list(VALUES))), max_size=3)
    return Fuzzed(shape, draw(st.sampled_from(DTYPES if wild else FLOATS)), draw(st.sampled_from(LAYOUTS)),
                  tuple(draw(bad) if wild else ()), draw(st.integers(0, 2**16)))


def make(spec: Fuzzed, device) -> torch.Tensor:
    """The tensor a Fuzzed describes, on ``device``."""
    base, d = list(spec.shape), len(spec.shape)
    layout = spec.layout if d else "contiguous"
    if layout == "expanded":
        base[0] = 1  # stride 0 along dim 0 after expand
    elif layout == "strided":
        base[-1] *= 2  # every other column
    elif layout == "offset":
        base[0] += 1  # a view from the second row on
    elif layout == "transposed" and d >= 2:
        base[-2], base[-1] = base[-1], base[-2]
    g = torch.Generator().manual_seed(spec.seed)
    x = torch.rand(base, generator=g, dtype=torch.float64) * 2 - 1
    if not spec.dtype.is_floating_point:
        x = (x * 8).round()
    flat = x.view(-1)
    for i, kind in spec.bad:
        scale = HUGE.get(spec.dtype) if kind.endswith("huge") else spec.dtype.is_floating_point  # bool: none
        if flat.numel() and scale:
            flat[i % flat.numel()] = VALUES[kind] * scale
    x = (x > 0 if spec.dtype == torch.bool else x.to(spec.dtype)).to(device)
    if layout == "expanded":
        return x.expand(spec.shape)
    if layout == "strided":
        return x[..., ::2]
    if layout == "offset":
        return x[1:]
    if layout == "transposed" and d >= 2:
        return x.transpose(-1, -2)
    if layout == "channels_last" and d in (4, 5):
        return x.contiguous(memory_format=torch.channels_last if d == 4 else torch.channels_last_3d)
    return x


def _call(f):
    """f()'s result, or the ValueError / TypeError it raised; any other exception fails the test."""
    try:
        return f()
    except (ValueError, TypeError) as error:
        return error


def _refused(result, *names) -> bool:
    """Whether ``result`` is an error whose message names one of ``names``; asserts it when it is an error."""
    event("refused" if isinstance(result, Exception) else "result")  # pytest --hypothesis-show-statistics
    if isinstance(result, Exception):
        assert any(name in str(result) for name in names), f"{result!r} names none of {names}"
        return True
    return False


def _moderate(*xs) -> bool:
    """Every tensor among ``xs`` is finite, within ±8."""
    return all(x is None or not torch.is_tensor(x) or x.numel() == 0 or
               bool((x.double().abs() <= 8).all()) for x in xs)


def _scores(x) -> bool:
    """A (B, K) floating-point score tensor, B, K >= 1."""
    return torch.is_tensor(x) and x.ndim == 2 and x.is_floating_point() and x.numel() > 0


# ---- sinkhorn ------------------------------------------------------------------------------------
def _exact_codes(scores, iterations, epsilon):
    """Exact Sinkhorn in float64, in the log domain (−inf entries allowed), on the scores less each column's
    maximum (the same codes, and differences of 1e38-sized scores survive); the softmax for 0 rounds."""
    s = scores.double().cpu()
    y = (s - s.amax(dim=0 if iterations else 1, keepdim=True)) / epsilon
    for _ in range(iterations):
        y = y - torch.logsumexp(y, dim=0, keepdim=True)  # each prototype: equal mass
        y = y - torch.logsumexp(y, dim=1, keepdim=True)  # each sample: mass 1
    return y.softmax(dim=1)


@st.composite
def sinkhorn_args(draw):
    """One wild argument, named by the last entry; the others valid."""
    b, k, n = draw(st.integers(1, 6)), draw(st.integers(1, 6)), draw(st.integers(0, 6))
    wild = draw(st.sampled_from(["out", "queue", "iterations", "epsilon"]))
    queue = fuzzed((n, k), wild=True) if wild == "queue" else st.none() | fuzzed((n, k), wild=False)
    iterations = [3, 0, 1, 10] + ([-1, 2.0, True, None] if wild == "iterations" else [])
    epsilon = [0.05, 1.0, 1e-3] + ([0.0, -0.1, math.nan, math.inf, 1e-320, "0.05"] if wild == "epsilon" else [])
    return (draw(fuzzed((b, k), wild=wild == "out")), draw(queue), draw(st.sampled_from(iterations)),
            draw(st.sampled_from(epsilon)), wild)


@settings(max_examples=examples(300))
@given(args=sinkhorn_args())
@example(args=(Fuzzed((2, 2), torch.bfloat16, "expanded", ((0, "huge"),)), Fuzzed((1, 2), torch.float16), 3, 0.05,
               "out"))  # 1e38 beside 0.4: the differences survive
@example(args=(Fuzzed((3, 2), torch.float16, bad=((0, "huge"), (1, "huge"))), None, 3, 0.05, "out"))  # 0.9% off
def test_sinkhorn(device, args):
    """Codes against exact log-domain Sinkhorn in float64 wherever the contract promises them (no NaN or
    +inf score, every sample and prototype with a finite one), and the same on a contiguous copy."""
    out_spec, queue_spec, iterations, epsilon, wild = args
    out = make(out_spec, device)
    queue = None if queue_spec is None else make(queue_spec, device)
    q = _call(lambda: sinkhorn(out, iterations, epsilon, queue=queue))
    valid = _scores(out) and (queue is None or (queue.ndim == 2 and queue.is_floating_point()
                                                 and queue.shape[1] == out.shape[1]))
    used = [out] + ([queue] if valid and queue is not None and len(queue) and iterations else [])
    wide = torch.float64 if any(s.dtype == torch.float64 for s in used) else torch.float32
    valid = valid and type(iterations) is int and iterations >= 0
    valid = valid and type(epsilon) is float and 0 < epsilon < math.inf
    oracle = None  # the exact codes, where the contract promises them
    if valid and 2 / epsilon < torch.finfo(wide).max and not any(
            bool(s.double().nan_to_num(posinf=math.nan).isnan().any()) for s in used):
        oracle = _exact_codes(torch.cat([s.double() for s in used]), iterations, epsilon)
        oracle = oracle[: len(out)] if bool(oracle.isfinite().all()) else None  # else a row or column of −inf
    if _refused(q, wild):
        assert oracle is None, q
        return
    assert oracle is not None, f"an invalid call returned {q}"
    assert q.shape == out.shape and q.device == out.device
    assert q.dtype == wide
    assert bool(q.isfinite().all())
    scores = torch.cat([s.double().flatten() for s in used])
    span = float(scores[scores.isfinite()].abs().max()) / epsilon
    # SPEC §2: 1e-4 where FAIR's routine stays finite in float64 (|S|/ε < 709); beyond, rounding the scores
    # to the compute dtype moves each exponent by up to 2|S|·eps/ε (1% at float16's 6e4 with ε = 0.05)
    rtol = 1e-4 if span < 700 else 2 * span * torch.finfo(wide).eps
    torch.testing.assert_close(q.double().cpu(), oracle, rtol=rtol, atol=1e-6)
    contiguous = None if queue is None else queue.contiguous()
    assert torch.equal(q, sinkhorn(out.contiguous(), iterations, epsilon, queue=contiguous))


# ---- SwaVLoss ------------------------------------------------------------------------------------
@st.composite
def loss_args(draw):
    """(n_high, crops, queue or None, temperature, the wild ingredient's name); the others valid."""
    n_high, b, k = draw(st.integers(1, 2)), draw(st.integers(1, 4)), draw(st.integers(1, 5))
    n_crops, has_queue = n_high + draw(st.integers(2 - n_high, 2)), draw(st.booleans())
    names = [f"high_resolution_outputs[{i}]" for i in range(n_high)] + [
        f"low_resolution_outputs[{i}]" for i in range(n_crops - n_high)] + [
        f"queue_outputs[{i}]" for i in range(n_high if has_queue else 0)] + ["temperature"]
    wild = draw(st.integers(0, len(names) - 1))
    tensors = [draw(fuzzed((b, k) if i < n_crops else (draw(st.integers(0, 6)), k), wild=i == wild))
               for i in range(len(names) - 1)]
    temperature = draw(st.sampled_from([0.1, 1.0] + ([1e-6, 1e-39] if names[wild] == "temperature" else [])))
    return n_high, tensors[:n_crops], tensors[n_crops:] if has_queue else None, temperature, names[wild]


@settings(max_examples=examples(250))
@given(args=loss_args())
@example(args=(2, [Fuzzed((2, 5), torch.float16)] * 2, None, 1e-6, "temperature"))  # inf gradients before
def test_loss(device, args):
    """The loss as the same call on contiguous copies in the compute dtype, and as the float64 per-pair oracle;
    finite gradients."""
    n_high, specs, queue_specs, temperature, wild = args
    crops = [make(s, device).detach() for s in specs]  # detach keeps the layout: a leaf with its strides
    crops = [z.requires_grad_() if z.is_floating_point() else z for z in crops]
    queue = None if queue_specs is None else [make(s, device) for s in queue_specs]
    loss_fn = SwaVLoss(temperature)
    loss = _call(lambda: loss_fn(crops[:n_high], crops[n_high:], queue))
    valid = all(_scores(z) and z.shape == crops[0].shape for z in crops) and all(
        q.ndim == 2 and q.is_floating_point() and q.shape[1] == crops[0].shape[1] for q in queue or [])
    narrow = valid and 1 / ((len(crops) - 1) * len(crops[0]) * temperature) > min(
        torch.finfo(z.dtype).max for z in crops)
    if _refused(loss, wild, "temperature"):  # z/τ overflowing: the temperature's fault
        assert not valid or narrow or not _moderate(*crops, *(queue or [])) or temperature < 1e-30, loss
        return
    assert valid and not narrow, f"an invalid call returned {loss}"
    used = crops + [q for q in queue or [] if len(q)]  # an empty queue is no queue
    wide = torch.float64 if any(z.dtype == torch.float64 for z in used) else torch.float32
    assert loss.shape == () and loss.dtype == wide and bool(loss.isfinite())
    loss.backward()  # and finite gradients, whatever the crops' dtype
    assert all(z.grad is None or bool(z.grad.isfinite().all()) for z in crops)
    compute = torch.float64 if any(z.dtype == torch.float64 for z in crops) else torch.float32  # predictions
    copies = [z.detach().to(compute, memory_format=torch.contiguous_format) for z in crops]
    same = loss_fn(copies[:n_high], copies[n_high:], queue and [q.contiguous() for q in queue])
    torch.testing.assert_close(loss, same, rtol=1e-6, atol=1e-7)
    if _moderate(*crops, *(queue or [])):
        expected = per_pair_oracle(crops[:n_high], crops[n_high:], queue, temperature)  # fp64 textbook
        torch.testing.assert_close(loss.double().cpu(), expected, rtol=1e-5, atol=1e-6)


# ---- MemoryBankModule ----------------------------------------------------------------------------
@st.composite
def bank_args(draw):
    length, dim = draw(st.integers(0, 5)), draw(st.integers(1, 4))
    call = st.tuples(st.sampled_from(["push", "forward", "update"]),
                     st.integers(0, 2 * length + 1).flatmap(lambda b: fuzzed((b, dim))))
    return (length, dim, draw(st.booleans()), draw(st.sampled_from(FLOATS)), draw(st.booleans()),
            draw(st.booleans()), draw(st.lists(call, min_size=1, max_size=4)))


@settings(max_examples=examples(200))
@given(args=bank_args())
@example(args=(4, 3, False, torch.float32, True, False, [("push", Fuzzed((3, 0)))]))  # 3 rows "filled" before
@example(args=(2, 2, True, torch.float16, True, False, [  # a NaN row, then a float32 row that overflows float16
    ("push", Fuzzed((2, 2))), ("update", Fuzzed((1, 2), bad=((0, "nan"),))),
    ("push", Fuzzed((1, 2), bad=((1, "huge"),)))]))
def test_memory_bank(device, args):
    """push, forward and features against the deque model of test_memory_bank (a row that is not finite
    in the bank's dtype keeps its slot's content); the bank never holds NaN or inf."""
    length, dim, fixed, dtype, dim_first, gather, calls = args  # gather: no process group, the same queue
    size = (length, dim) if fixed else length
    bank = MemoryBankModule(size, gather_distributed=gather, feature_dim_first=dim_first).to(device, dtype)
    model, pushed = collections.deque(maxlen=length), 0
    for what, spec in calls:
        x = make(spec, device)
        before = bank.bank.clone()
        valid = length > 0 and x.ndim == 2 and x.shape[1] > 0 and x.shape[1] == (bank.dim or x.shape[1])
        if what == "push":
            result = _call(lambda: bank.push(x))
        else:
            result = _call(lambda: bank(x, update=what == "update"))
        if length == 0 and what != "push":
            assert result[0] is x and result[1] is None
            continue
        if _refused(result, "features", "size"):
            assert not valid, result
            assert torch.equal(bank.bank, before) and bank.num_filled == len(model)
            continue
        assert valid, f"an invalid batch {tuple(x.shape)} was accepted"
        if what != "push":
            assert result[0] is x
            stored = before if bank.dim == before.shape[1] else bank.bank.new_zeros(length, bank.dim)
            assert torch.equal(result[1], stored.T if dim_first else stored) and result[1].is_contiguous()
        if what != "forward":
            _push_model(model, pushed, x.to(dtype))
            pushed += len(x)
        assert bool(bank.bank.isfinite().all()) and bank.features().dtype == dtype
        assert (bank.num_filled, bank.is_full, int(bank.bank_ptr)) == (len(model), len(model) == length,
                                                                       pushed % length)
        rows = torch.stack(list(model)) if model else bank.bank.new_zeros(0, bank.dim or 0)
        assert torch.equal(bank.features(), rows) and torch.equal(bank.features(ordered=False),
                                                                  rows.roll(pushed % length, 0))


# ---- SwaVProjectionHead and SwaVPrototypes -------------------------------------------------------
@st.composite
def head_args(draw):
    b, d_in = draw(st.integers(2, 5)), draw(st.integers(1, 6))
    ks = st.integers(1, 5)
    x = draw(fuzzed((b, d_in)))
    dtype = draw(st.sampled_from([x.dtype] * 4 + list(FLOATS) if x.dtype.is_floating_point else FLOATS))
    return (b, d_in, draw(ks), draw(ks | st.lists(ks, min_size=1, max_size=3)), draw(st.booleans()),
            dtype, draw(st.booleans()), x)


def _same_call(module, x, result):
    """``result`` equals ``module`` (as it was) on a contiguous copy of ``x``, NaN for NaN."""
    again = module(x.contiguous())
    for a, b in zip(_flat(result), _flat(again)):
        torch.testing.assert_close(a, b, equal_nan=True)


@settings(max_examples=examples(150))
@given(args=head_args())
@example(args=(2, 1, 1, 1, False, torch.float16, False, Fuzzed((2, 1), torch.bfloat16)))  # torch's RuntimeError
@example(args=(2, 3, 2, [2, 3], True, torch.float32, True, Fuzzed((2, 3), torch.int64)))  # torch's RuntimeError
def test_heads(device, args):
    """Both heads against their float64 formulas: z = W₂ ReLU(BN(W₁ x)) + b₂ (batch statistics while
    training, running ones in eval) and S = x Cᵀ (+ b)."""
    b, d_in, d_out, ks, bias, dtype, train, spec = args
    x = make(spec, device)
    head = SwaVProjectionHead(d_in, 4, d_out).to(device, dtype).train(train)
    protos = SwaVPrototypes(d_in, ks, bias=bias).to(device, dtype).train(train)
    valid = x.ndim == 2 and x.shape[1] == d_in and x.dtype == dtype
    for module, oracle in ((head, _head_formula), (protos, _prototype_formula)):
        before = copy.deepcopy(module)
        out = _call(lambda: module(x))
        if _refused(out, "features"):
            assert not valid, out
            continue
        assert valid, f"{type(module).__name__} accepted {tuple(x.shape)} {x.dtype}"
        _same_call(copy.deepcopy(before), x, out)
        expected = oracle(before, x.double().cpu(), train)
        for got, want in zip(_flat(out), expected):
            assert got.dtype == dtype and got.shape == want.shape
            if _moderate(x) and dtype in (torch.float32, torch.float64):
                assert bool(got.isfinite().all())
                torch.testing.assert_close(got.double().cpu(), want, rtol=1e-4, atol=1e-5)


def test_heads_take_any_float_under_autocast(device):
    """The dtype check leaves mixed precision to autocast, which casts every float but float64."""
    head, protos = SwaVProjectionHead(4, 4, 3).to(device), SwaVPrototypes(3, [2, 5]).to(device)
    with torch.autocast(device, dtype=torch.bfloat16):
        z = head(torch.randn(2, 4, device=device, dtype=torch.float16))
        assert z.dtype == torch.bfloat16 and [s.dtype for s in protos(z.float())] == [torch.bfloat16] * 2
        with pytest.raises(ValueError, match=r"SwaVPrototypes expects torch.float32 features .*got torch.float64"):
            protos(z.double())


def _head_formula(head, x, train):
    w1, bn, w2 = (m.double().cpu() for m in (head.layers[0], head.layers[1], head.layers[3]))
    h = x @ w1.weight.T
    mean, var = (h.mean(0), h.var(0, unbiased=False)) if train else (bn.running_mean, bn.running_var)
    h = (h - mean) / torch.sqrt(var + bn.eps) * bn.weight + bn.bias
    return [F.relu(h) @ w2.weight.T + w2.bias]


def _prototype_formula(protos, x, train):
    return [x @ h.weight.double().cpu().T + (0 if h.bias is None else h.bias.double().cpu()) for h in protos.heads]


# ---- MultiCrop -----------------------------------------------------------------------------------
@st.composite
def multicrop_args(draw):
    shape, cfg = draw(multicrop_configs(max_batch=2, max_size_2d=9, max_size_3d=5))
    return shape, dict(cfg, scale_per_side=draw(st.booleans())), draw(fuzzed(shape))


_3D = dict(high_size=(4, 4, 4), low_size=(2, 2, 2), n_high=2, n_low=1, high_scale=(0.5, 1.0), low_scale=(0.3, 0.5))


@settings(max_examples=examples(150))
@given(args=multicrop_args())
@example(args=((1, 1, 6, 6, 6), _3D, Fuzzed((1, 6, 6, 6))))  # one unbatched volume: 2D crops before
@example(args=((2, 1, 6, 6), dict(high_size=4, low_size=2, intensity=0.3), Fuzzed((2, 1, 6, 6), torch.float16,
                                                                                   bad=((5, "huge"),))))  # inf crops
def test_multicrop(device, args):
    """Crops of the right shape, dtype and device, within each sample's and channel's jittered range."""
    shape, cfg, spec = args
    x, crops = make(spec, device), MultiCrop(**cfg)
    result = _call(lambda: crops(x, torch.Generator().manual_seed(0)))
    d = [len(s) for s in (crops.high_size, crops.low_size) if len(s) > 1]
    valid = x.ndim in (4, 5) and all(n == x.ndim - 2 for n in d) and x.is_floating_point() and x.numel() > 0
    i = crops.intensity
    if valid and i > 0 and x.element_size() < 4:  # narrow dtypes: refused where the jitter could overflow
        valid = bool(x.isnan().any() or (x.double().abs() <= (torch.finfo(x.dtype).max - i) / (1 + i)).all())
    if _refused(result, "MultiCrop expects", "intensity"):
        assert not valid, result
        return
    assert valid, f"MultiCrop accepted {tuple(x.shape)} {x.dtype}"
    again = crops(x.contiguous(), torch.Generator().manual_seed(0))
    values = x.double().flatten(2)  # (B, C, n) per sample and channel
    lo, hi = values.amin(2)[..., None], values.amax(2)[..., None]
    eps = 0 if x.dtype == torch.float64 else 2 ** -7 if x.dtype == torch.bfloat16 else 2 ** -10
    for c, ref, size in zip(result[0] + result[1], again[0] + again[1],
                            [crops.high_size] * crops.n_high + [crops.low_size] * crops.n_low):
        full = size * (x.ndim - 2) if len(size) == 1 else size
        assert c.shape == x.shape[:2] + full and c.dtype == x.dtype and c.device == x.device
        torch.testing.assert_close(c, ref, equal_nan=True)
        if _moderate(x):
            flat = c.double().flatten(2)
            assert bool(flat.isfinite().all())
            slack = (1 + i) * torch.maximum(lo.abs(), hi.abs()) * eps + 1e-6
            assert bool((flat >= torch.minimum((1 - i) * lo, (1 + i) * lo) - i - slack).all())
            assert bool((flat <= torch.maximum((1 - i) * hi, (1 + i) * hi) + i + slack).all())


# ---- SwaV ----------------------------------------------------------------------------------------
class _BackboneError(Exception):
    """The user's backbone refused a crop (its own business, not SwaV's)."""


class _Backbone(nn.Module):
    """A backbone that takes any dtype (SwaV's own checks are under test) and flags its own errors."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1))

    def forward(self, x):
        try:
            return self.net(x.float())
        except RuntimeError as error:
            raise _BackboneError(error) from error


@st.composite
def swav_args(draw):
    n_high, n_low, b = draw(st.integers(1, 2)), draw(st.integers(0, 2)), draw(st.integers(2, 3))
    wild = draw(st.integers(0, n_high + n_low))  # one wild crop, or none
    high = [draw(fuzzed((b, 3, 7, 7), wild=i == wild)) for i in range(n_high)]
    low = [draw(fuzzed((b, 3, 5, 5), wild=n_high + i == wild)) for i in range(n_low)]
    ks = st.integers(1, 5)
    return high, low, draw(ks | st.lists(ks, min_size=1, max_size=2)), draw(st.integers(1, 6)), draw(st.booleans())


@settings(max_examples=examples(60))
@given(args=swav_args())
@example(args=([Fuzzed((2, 3, 7, 7)), Fuzzed((2, 3, 7, 7), bad=((0, "nan"),))], [], 5, 2, False))  # NaN queues
@example(args=([Fuzzed((2, 3, 7, 7), torch.float16), Fuzzed((2, 3, 7, 7), torch.int64, bad=((0, "huge"),))], [],
               1, 1, True))  # grouped: 2**62 was cast to float16 (inf) by concatenating crops of two dtypes
def test_swav(device, args):
    """Three training forwards: scores as on contiguous float32 copies, queues that never hold NaN or inf,
    and a loss that is finite whenever the crops are (a bad step never poisons the queues)."""
    high_specs, low_specs, ks, queue_length, grouped = args
    model = SwaV(_Backbone(), 8, 4, ks, n_queues=len(high_specs), queue_length=queue_length,
                 group_crops_by_resolution=grouped).to(device)
    high, low = [make(s, device) for s in high_specs], [make(s, device) for s in low_specs]
    valid = len({x.shape[0] if x.ndim else -1 for x in high + low}) == 1 and all(
        x.ndim == 4 and x.shape[1] == 3 and min(x.shape[2:]) >= 3 for x in high + low)
    for step in range(3):
        before = copy.deepcopy(model)
        try:
            out = _call(lambda: model((high, low), epoch=0, step=step))
        except _BackboneError:
            event("the backbone refused")
            assert not valid
            return
        if _refused(out, "crop", "num_ftrs", "batch size"):
            assert not valid, out
            return
        assert valid, "SwaV accepted crops of shapes " + str([tuple(x.shape) for x in high + low])
        ref = before(([x.float().contiguous() for x in high], [x.float().contiguous() for x in low]), 0, step)
        for got, want in zip(_flat(out), _flat(ref)):
            torch.testing.assert_close(got, want, equal_nan=True)
            assert bool(got.isfinite().all()) or not _moderate(*high, *low)
        assert all(bool(q.bank.isfinite().all()) for q in model.queues)
        assert out[2] is None or all(bool(s.isfinite().all()) for s in _flat(out[2]))
        if len(high) + len(low) >= 2:
            loss = _call(lambda: SwaVLoss()(*out))
            assert not _refused(loss, "outputs") and bool(loss.isfinite()) or not _moderate(*high, *low)


def _flat(tree):
    if torch.is_tensor(tree):
        return [tree]
    return [] if tree is None else [t for item in tree for t in _flat(item)]
