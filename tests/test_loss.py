"""SwaVLoss: a per-pair fp64 oracle, ln K, gradients only through predictions, errors."""
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given, settings
from hypothesis import strategies as st

from oracles import make_crops, per_pair_oracle, textbook_fp64
from strategies import examples, swav_crop_configs
from swav_core import SwaVLoss

DTYPES = [torch.float16, torch.bfloat16, torch.float32]


# ---- value -------------------------------------------------------------------------------------


@settings(max_examples=examples(30))
@given(
    config=swav_crop_configs(),
    temperature=st.floats(0.05, 1.0),
    iterations=st.integers(1, 4),
    epsilon=st.sampled_from([0.03, 0.05, 0.2]),
)
@example(config=(1, 1, 1, 1, None, 0), temperature=0.1, iterations=3, epsilon=0.05)  # K = 1: loss 0
@example(config=(2, 6, 8, 16, [24, 24], 1), temperature=0.1, iterations=3, epsilon=0.05)  # SwAV's layout
def test_matches_per_pair_oracle(device, config, temperature, iterations, epsilon):
    high, low, queue = make_crops(*config, device)
    loss_fn = SwaVLoss(temperature, iterations, epsilon)
    loss = loss_fn(high, low, queue)
    assert loss.shape == () and loss.dtype == torch.float32 and loss.device.type == device
    expected = per_pair_oracle(high, low, queue, temperature, iterations, epsilon)
    torch.testing.assert_close(loss.double().cpu(), torch.as_tensor(expected).double(), rtol=1e-5, atol=1e-6)


def test_one_loss_module_keeps_each_call_independent(device):
    """One SwaVLoss over calls with growing, shrinking and regrowing queues, then a single backward of
    their sum (gradient accumulation) gives the same values and gradients as a fresh loss per call."""
    shared, calls = SwaVLoss(), []
    for seed, sizes in enumerate([[40, 40], [8, 12], [64, 50]]):
        high, low, queue = make_crops(2, 2, 6, 11, sizes, seed, device)
        for z in high + low:
            z.requires_grad_(True)
        calls.append((high + low, shared(high[:2], low, queue), SwaVLoss()(high[:2], low, queue)))
    torch.stack([s for _, s, _ in calls]).sum().backward()
    for crops, reused, fresh in calls:
        assert torch.equal(reused, fresh)
        grads = torch.autograd.grad(fresh, crops)
        for z, g in zip(crops, grads):
            assert torch.equal(z.grad, g)


def test_one_loss_shared_by_threads_gives_each_call_its_value(device):
    """4 threads × 20 calls of one SwaVLoss with queues (real threads): every value equals the same call
    made alone. A loss that keeps a scratch between calls (as it once did on the CPU) mixes them up."""
    import pickle
    import threading
    shared = SwaVLoss()
    cases = [make_crops(2, 4, 64, 300, [768, 768], seed, device) for seed in range(4)]
    alone = [SwaVLoss()(*case) for case in cases]
    got, errors = {}, []

    def calls(t: int) -> None:
        try:
            for j in range(20):
                got[t, j] = shared(*cases[(t + j) % 4])
        except Exception as e:  # noqa: BLE001 (reported below, with the thread)
            errors.append((t, e))

    threads = [threading.Thread(target=calls, args=(t,)) for t in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not errors and len(got) == 80
    assert [key for key, value in got.items() if not torch.equal(value, alone[(key[0] + key[1]) % 4])] == []
    assert len(pickle.dumps(shared)) < 2000  # no buffer travels with it


def test_overridden_subloss_is_called_per_pair(device):
    """A subclass' subloss sees each (prediction, code) pair, as in lightly: an override with the same
    formula gives the base loss (which sums the codes first), and every pair v ≠ i is passed once."""
    high, low, queue = make_crops(2, 3, 6, 9, [8, 8], 5, device)
    pairs = []

    class Recording(SwaVLoss):
        def subloss(self, z, q):
            pairs.append((z, q))
            return -(q * F.log_softmax(z / self.temperature, dim=1)).sum(dim=1).mean()

    loss = Recording()(high, low, queue)
    torch.testing.assert_close(loss, SwaVLoss()(high, low, queue), rtol=1e-6, atol=1e-7)
    assert len(pairs) == 2 * 4  # n_high · (n_crops − 1)
    for i in range(2):
        code = textbook_fp64(torch.cat([high[i], queue[i]]))[:6]
        predictors = [z for v, z in enumerate(high + low) if v != i]
        for (z, q), expected_z in zip(pairs[4 * i : 4 * i + 4], predictors):
            assert torch.equal(z, expected_z)
            torch.testing.assert_close(q.cpu().double(), code, rtol=1e-4, atol=1e-7)


def test_iterations_zero_codes_are_the_softmax(device):
    high, low, _ = make_crops(2, 2, 6, 9, None, 3, device)
    softmax_codes = lambda i: torch.softmax(high[i].cpu().double() / 0.05, dim=1)  # noqa: E731
    expected = per_pair_oracle(high, low, codes=softmax_codes)
    torch.testing.assert_close(SwaVLoss(sinkhorn_iterations=0)(high, low).double().cpu(), expected.double())


@settings(max_examples=examples(20))
@given(config=swav_crop_configs(max_prototypes=3000), value=st.floats(-1.0, 1.0, width=32))
@example(config=(2, 6, 8, 3000, [64, 64], 0), value=0.3)
def test_uniform_scores_give_ln_k(device, config, value):
    n_high, n_low, batch, prototypes, queue_sizes, _ = config
    full = lambda n: torch.full((n, prototypes), value, device=device)  # noqa: E731
    queue = None if queue_sizes is None else [full(n) for n in queue_sizes]
    loss = SwaVLoss()([full(batch) for _ in range(n_high)], [full(batch) for _ in range(n_low)], queue)
    torch.testing.assert_close(loss.item(), math.log(prototypes), rtol=1e-6, atol=1e-7)


def test_empty_queue_list_is_no_queue(device):
    high, low, _ = make_crops(2, 3, 5, 7, None, 0, device)
    loss = SwaVLoss()
    assert torch.equal(loss(high, low, []), loss(high, low))
    assert torch.equal(loss(high, low, None), loss(high, low))


def test_multi_head_is_the_mean_over_heads(device):
    g = torch.Generator().manual_seed(0)
    ks = [7, 3, 12]
    crop = lambda: [torch.randn(5, k, generator=g).to(device) for k in ks]  # noqa: E731
    high, low, queue = [crop() for _ in range(2)], [crop() for _ in range(3)], [crop(), crop()]
    loss = SwaVLoss()(high, low, queue)
    per_head = [
        per_pair_oracle([c[h] for c in high], [c[h] for c in low], [c[h] for c in queue]) for h in range(3)
    ]
    torch.testing.assert_close(loss.double().cpu(), torch.stack(per_head).mean(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_result_is_0dim_float32_or_float64(device, dtype):
    high, low, queue = make_crops(2, 2, 4, 6, [5, 3], 0, device, dtype)
    loss = SwaVLoss()(high, low, queue)
    assert loss.shape == () and loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    expected = per_pair_oracle(high, low, queue)
    torch.testing.assert_close(loss.double().cpu(), expected.double(), rtol=1e-5, atol=1e-6)


def test_autocast_is_finite_and_close_to_float32(device):
    g = torch.Generator().manual_seed(0)
    prototypes = torch.nn.Linear(64, 300, bias=False).to(device)
    features = [F.normalize(torch.randn(32, 64, generator=g), dim=1).to(device) for _ in range(8)]
    loss_fn = SwaVLoss()

    def loss():
        scores = [prototypes(f) for f in features]
        return loss_fn(scores[:2], scores[2:], [prototypes(f) for f in features[6:]])

    reference = loss()
    for dtype in [torch.bfloat16] + ([torch.float16] if device == "cuda" else []):
        with torch.autocast(device_type=device, dtype=dtype):
            low_precision = loss()
        assert prototypes(features[0]).dtype == torch.float32  # outside autocast again
        assert low_precision.dtype == torch.float32 and low_precision.shape == ()
        assert torch.isfinite(low_precision) and abs(low_precision.item() - reference.item()) <= 1e-2


# ---- gradient ----------------------------------------------------------------------------------


@settings(max_examples=examples(20))
@given(config=swav_crop_configs(), temperature=st.floats(0.05, 1.0))
def test_gradient_only_through_predictions(device, config, temperature):
    """dℓ/dz_v = (s_v · softmax(z_v/τ) − W_v) / (N τ), W_v = Σ_{i≠v} q_i the fixed codes, s_v its
    row sums, N = n_high (n_crops − 1) B: the codes act as constants; the queue gets no gradient."""
    high, low, queue = make_crops(*config, device)
    crops = [z.requires_grad_() for z in high + low]
    if queue is not None:
        queue = [x.requires_grad_() for x in queue]
    SwaVLoss(temperature)(crops[: len(high)], crops[len(high) :], queue).backward()
    n_high, n = len(high), len(crops)
    batch = high[0].shape[0]
    codes = []
    for i, z in enumerate(high):
        scores = z if queue is None else torch.cat([z, queue[i]])
        codes.append(textbook_fp64(scores)[:batch])
    for v, z in enumerate(crops):
        weight = sum(q for i, q in enumerate(codes) if i != v)
        if n_high == 1 and v == 0:  # a lone high-resolution crop only provides codes
            assert z.grad is None or not z.grad.any()
            continue
        p = torch.softmax(z.detach().cpu().double() / temperature, dim=1)
        scale = 1.0 / (n_high * (n - 1) * batch * temperature)
        expected = (weight.sum(dim=1, keepdim=True) * p - weight) * scale
        # s·p and W (entries ≤ n_high) cancel where the prediction matches: compare at their scale.
        torch.testing.assert_close(z.grad.cpu().double(), expected, rtol=1e-4, atol=1e-5 * n_high * scale)
    assert queue is None or all(x.grad is None for x in queue)


# ---- errors ------------------------------------------------------------------------------------


def _crops(n, batch=4, k=5):
    return [torch.randn(batch, k) for _ in range(n)]


@pytest.mark.parametrize(
    "args, match",
    [
        ((_crops(1), []), "at least 2 crops"),
        (([], _crops(3)), "at least one crop"),
        ((_crops(2), [torch.randn(3, 5)]), "same shape"),
        ((_crops(2), [torch.randn(4, 6)]), "same shape"),
        ((_crops(2), _crops(1), _crops(3, 10)), "one entry per high-resolution crop"),
        ((_crops(2), _crops(1), [torch.randn(10, 5), torch.randn(10, 4)]), "queue_outputs\\[1\\]"),
        ((torch.randn(2, 4, 5), _crops(2)), "must be a list"),
        ((_crops(2), _crops(1), torch.randn(10, 5)), "must be a list"),
        (([torch.randn(4)], _crops(1)), "floating-point tensor"),
        (([torch.ones(4, 5, dtype=torch.long)], _crops(1)), "floating-point tensor"),
        (([_crops(2), _crops(2)], [_crops(1)]), "list over the 2 prototype heads"),
        (([[torch.randn(4, 5)], torch.randn(4, 5)], []), "list over the 1 prototype heads"),
        (([[], []], []), "at least one prototype head"),
    ],
)
def test_bad_inputs_raise(device, args, match):
    def to(x):  # the same nested arguments on the device
        return x.to(device) if isinstance(x, torch.Tensor) else [to(y) for y in x] if isinstance(x, list) else x

    with pytest.raises(ValueError, match=match):
        SwaVLoss()(*to(list(args)))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(temperature=0.0), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(sinkhorn_iterations=-1), "iterations"),
        (dict(sinkhorn_epsilon=0.0), "epsilon"),
    ],
)
def test_bad_hyper_parameters_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SwaVLoss(**kwargs)


@pytest.mark.parametrize(
    "where, value, match",
    [
        ("high", float("nan"), r"codes of high_resolution_outputs\[1\] and queue_outputs\[1\]: sinkhorn: out must "
                               r"be finite: got NaN"),
        ("queue", float("nan"), r"codes of high_resolution_outputs\[1\] and queue_outputs\[1\]: sinkhorn: queue "
                                r"must be finite: got NaN or \+inf"),
        ("high", float("-inf"), r"SwaVLoss: high_resolution_outputs\[1\] must be finite: its NaN or ±inf"),
        ("low", float("nan"), r"SwaVLoss: low_resolution_outputs\[1\] must be finite"),
        ("low", float("inf"), r"SwaVLoss: low_resolution_outputs\[1\] must be finite"),
        ("low", float("-inf"), r"SwaVLoss: low_resolution_outputs\[1\] must be finite"),
    ],
)
def test_non_finite_scores_raise_naming_the_argument(device, where, value, match):
    """No NaN or inf loss is passed on: the codes' scores are checked by sinkhorn, the predictions
    through the loss value (an isolated -inf is a valid score for the codes, not a prediction)."""
    high, low, queue = make_crops(2, 2, 4, 5, [6, 6], 0, device)
    {"high": high, "low": low, "queue": queue}[where][1][1, 2] = value
    with pytest.raises(ValueError, match=match):
        SwaVLoss()(high, low, queue)


def test_lone_high_resolution_crop_may_hold_minus_inf(device):
    """A single high-resolution crop only supplies codes, where -inf is valid: it is never blamed."""
    high, low, _ = make_crops(1, 1, 4, 5, None, 0, device)
    high[0][0, 1] = float("-inf")
    assert torch.isfinite(SwaVLoss()(high, low))
    low[0][2, 3] = 3e38  # but 3e38 / τ overflows
    with pytest.raises(ValueError, match=r"scores up to 3e\+38 divided by temperature=0.1 overflow"):
        SwaVLoss()(high, low)


@settings(max_examples=examples(30))
@given(config=swav_crop_configs(), temperature=st.floats(1e-7, 1e-3), dtype=st.sampled_from(DTYPES))
@example(config=(2, 0, 2, 5, None, 0), temperature=1e-6, dtype=torch.float16)  # gradients of 5e5: inf
def test_low_precision_scores_get_finite_gradients_or_a_clear_error(device, config, temperature, dtype):
    """A tiny τ on float16 scores: either a ValueError naming the temperature and the dtype, or a finite
    loss with finite gradients. |∂ℓ/∂z| reaches 1/((n_crops − 1) B τ) for a confident wrong prediction."""
    high, low, queue = make_crops(*config, device, dtype)
    crops = [z.requires_grad_() for z in high + low]
    n_high = len(high)
    bound = 1.0 / ((len(crops) - 1) * crops[0].shape[0] * temperature)
    if bound > torch.finfo(dtype).max:
        with pytest.raises(ValueError, match=f"temperature={temperature}.*{dtype}"):
            SwaVLoss(temperature)(crops[:n_high], crops[n_high:], queue)
        return
    loss = SwaVLoss(temperature)(crops[:n_high], crops[n_high:], queue)
    loss.backward()
    assert torch.isfinite(loss) and all(z.grad is None or torch.isfinite(z.grad).all() for z in crops)


def test_overflowing_temperature_raises(device):
    high, low, _ = make_crops(2, 2, 4, 5, None, 0, device)
    with pytest.raises(ValueError, match=r"temperature=1e-39 overflow"):
        SwaVLoss(temperature=1e-39)(high, low)


def test_defaults_and_repr():
    loss = SwaVLoss()
    assert (loss.temperature, loss.sinkhorn_iterations, loss.sinkhorn_epsilon) == (0.1, 3, 0.05)
    assert "temperature=0.1" in repr(loss) and "sinkhorn_epsilon=0.05" in repr(loss)
    assert list(loss.state_dict()) == []
