"""sinkhorn(): fp64 textbook and exact log-domain oracles, stability, symmetries, the queue argument."""
import importlib

import pytest
import torch
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from oracles import assert_matches_oracle, cosine_scores, exact_fp64, far_pair_scores, textbook_fp64, textbook_native
from strategies import examples, score_matrices
from swav_core import sinkhorn

sinkhorn_module = importlib.import_module("swav_core.sinkhorn")  # swav_core.sinkhorn is the function


# ---- agreement with the textbook ----------------------------------------------------------------


@settings(max_examples=examples(40))
@given(
    scores=score_matrices(max_batch=32, max_prototypes=32, max_abs=4.0),
    iterations=st.integers(1, 10),
    epsilon=st.floats(0.02, 1.0),
)
def test_matches_textbook_fp64(device, scores, iterations, epsilon):
    # Where exp(S/ε) stays far from float64's range the textbook is exact; beyond, it underflows to
    # wrong zeros or NaN (see the exact-Sinkhorn test below for those inputs).
    assume(scores.abs().max().item() / epsilon <= 300)
    q = sinkhorn(scores.to(device), iterations, epsilon)
    assert q.dtype == torch.float32 and q.shape == scores.shape and q.device.type == device
    assert_matches_oracle(q, textbook_fp64(scores, iterations, epsilon))


@pytest.mark.parametrize("batch, prototypes", [(4096, 3000), (1024, 3000), (300, 7)])
def test_matches_textbook_fp64_large(device, batch, prototypes):
    scores = cosine_scores(batch, prototypes, device, seed=batch)
    assert_matches_oracle(sinkhorn(scores), textbook_fp64(scores))


@settings(max_examples=examples(30))
@given(scores=score_matrices(max_batch=24, max_abs=2.0), iterations=st.integers(0, 6), data=st.data())
def test_queue_rows_share_the_equipartition(device, scores, iterations, data):
    """``queue=`` returns the first B rows of the codes of the concatenation (SwAV's queue): against
    the exact fp64 oracle on cat(out, queue), and equal to slicing sinkhorn's own full result."""
    batch = data.draw(st.integers(1, len(scores)), label="batch")
    scores = scores.to(device)
    q = sinkhorn(scores[:batch], iterations, 0.05, queue=scores[batch:])
    assert q.shape == (batch, scores.shape[1])
    torch.testing.assert_close(q, sinkhorn(scores, iterations, 0.05)[:batch], rtol=1e-6, atol=1e-30)
    if iterations == 0:  # a per-sample softmax: the queue plays no part
        assert torch.equal(q, sinkhorn(scores[:batch], 0, 0.05))
    else:
        assert_matches_oracle(q, exact_fp64(scores, iterations, 0.05)[:batch])


def test_log_domain_hand_over_only_beyond_float32s_range(device, monkeypatch):
    """v spanning more than float32 can scale (a far prototype after many rounds at small ε) sends
    the codes to exact log-domain Sinkhorn in float64; SwAV's shapes and settings never go there."""
    calls = []  # the log-domain branch computes its potentials with _neg_logsumexp, 2 per round but the last
    neg_logsumexp = sinkhorn_module._neg_logsumexp
    monkeypatch.setattr(sinkhorn_module, "_neg_logsumexp", lambda *a: calls.append(1) or neg_logsumexp(*a))
    scores = far_pair_scores().to(device)
    for iterations, handed_over in [(10, False), (30, True)]:
        calls.clear()
        q = sinkhorn(scores, iterations, 0.01)
        assert len(calls) == (2 * iterations - 1 if handed_over else 0)
        assert_matches_oracle(q, exact_fp64(scores, iterations, 0.01))
    for batch in (256, 4096):
        calls.clear()
        sinkhorn(cosine_scores(batch, 3000, device, seed=batch), 3, 0.01)
        assert calls == []


@settings(max_examples=examples(30))
@given(
    scores=score_matrices(max_abs=32.0),
    iterations=st.integers(1, 5),
    epsilon=st.sampled_from([1e-3, 0.01, 0.05, 0.3]),
)
@example(scores=torch.tensor([[-18.5195, 3.0], [2.0, 1.0]]), iterations=1, epsilon=0.01)  # textbook: NaN
def test_matches_exact_sinkhorn_where_textbook_underflows(device, scores, iterations, epsilon):
    """|S|/ε up to 6e4: exp(S/ε) over- and underflows even in float64, yet the codes equal exact
    Sinkhorn within the spec's tolerance (1e-4 per element, 1e-5 in Frobenius norm)."""
    q = sinkhorn(scores.to(device), iterations, epsilon)
    assert_matches_oracle(q, exact_fp64(scores, iterations, epsilon))


@settings(max_examples=examples(40))
@given(
    scores=score_matrices(max_batch=12, max_prototypes=40),
    iterations=st.integers(5, 60),
    epsilon=st.sampled_from([1e-3, 3e-3, 0.01, 0.03]),
    dtype=st.sampled_from([torch.float32, torch.float16]),
)
@example(scores=far_pair_scores(), iterations=30, epsilon=0.01, dtype=torch.float32)  # v spans e^328
@example(scores=far_pair_scores(), iterations=200, epsilon=0.01, dtype=torch.float16)
def test_many_iterations_at_small_epsilon_stay_exact(device, scores, iterations, epsilon, dtype):
    """Many rounds at small ε let v span far beyond float32 (a far prototype must be scaled up by
    e^328 here): the codes still equal exact Sinkhorn, not a clamped approximation."""
    scores = scores.to(dtype)
    q = sinkhorn(scores.to(device), iterations, epsilon)
    assert_matches_oracle(q, exact_fp64(scores, iterations, epsilon))


def test_iterations_zero_is_per_sample_softmax(device):
    scores = cosine_scores(64, 50, device)
    for eps in (1e-3, 0.05, 1.0):
        expected = torch.softmax(scores.cpu().double() / eps, dim=1)
        assert_matches_oracle(sinkhorn(scores, 0, eps), expected)


SLOW_2X2 = torch.tensor([[-0.3174, 0.6523], [0.4111, -0.2939]])
SLOW_3X3 = torch.tensor([[0.3926, -0.0078, 0.3828], [-0.875, 0.5156, -0.3867], [0.8242, -0.4062, -0.582]])


@settings(max_examples=examples(20))
@given(scores=score_matrices(max_batch=16, max_prototypes=16), epsilon=st.floats(0.1, 1.0))
@example(scores=SLOW_3X3, epsilon=0.125)  # converges slowly: 2e-4 off after 300 iterations
@example(scores=SLOW_2X2, epsilon=0.1015625)  # slower still: 6.8e-4 → 4.3e-4 in 300 iterations
def test_prototype_marginals_approach_b_over_k(device, scores, epsilon):
    """The prototype marginals (column sums; rows sum to 1) move monotonically and strictly towards
    B/K (in float64, exactly; the ℓ1 violation of Sinkhorn never grows). How fast depends on the
    scores (SLOW_2X2 is still 4.3e-4 off after 300 rounds, as in the fp64 textbook); that they reach
    B/K is the next test's."""
    batch, prototypes = scores.shape
    errors = []
    for iterations in (1, 2, 3, 10, 30, 100, 300):
        q = sinkhorn(scores.to(device, torch.float64), iterations, epsilon)
        errors.append((q.sum(dim=0) - batch / prototypes).abs().sum().item() / batch)
    assert all(later <= earlier + 1e-12 for earlier, later in zip(errors, errors[1:]))
    assert errors[-1] < errors[0] or errors[0] < 1e-12


def test_prototype_marginals_converge(device):
    scores = cosine_scores(64, 50, device)
    q = sinkhorn(scores, 200, 0.05)
    torch.testing.assert_close(q.sum(dim=0), torch.full_like(q[0], 64 / 50), rtol=1e-5, atol=0)


# ---- properties ---------------------------------------------------------------------------------

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


@settings(max_examples=examples(40))
@given(
    scores=score_matrices(max_abs=8.0),
    dtype=st.sampled_from(DTYPES),
    epsilon=st.floats(1e-3, 1.0),
    iterations=st.integers(0, 6),
    offset=st.sampled_from([0.0, 1e3, -6e4]),
    magnitude=st.sampled_from([1.0, 1e4, 1e36]),
)
def test_finite_rows_sum_to_one_nonnegative(device, scores, dtype, epsilon, iterations, offset, magnitude):
    """Every finite input in every dtype, ε ≥ 1e-3: finite, ≥ 0, rows sum to 1, float32 (or 64)."""
    if dtype != torch.float16:  # float16 ends at 65504
        scores = scores * magnitude
    q = sinkhorn((scores + offset).to(device=device, dtype=dtype), iterations, epsilon)
    assert q.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert torch.isfinite(q).all() and (q >= 0).all()
    torch.testing.assert_close(q.sum(dim=1), torch.ones_like(q[:, 0]), rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "case",
    [
        "eps0.01_score_above_0.887",  # lightly / FAIR: exp(88.7) overflows float32 → NaN
        "fp16_batch16_eps0.05",  # lightly / FAIR in fp16: the sum of exp(S/ε) overflows → NaN
        "far_prototype_eps1e-3",  # a prototype far from every sample: its column underflows → NaN
        "far_sample_eps1e-3",  # the same for a sample: its row underflows
        "extreme_fp32",  # differences of ±3e38 overflow unless halved first
        "extreme_fp32_far_sample",  # and a sample 6e38 below every prototype's best
    ],
)
def test_finite_where_textbook_fails(device, case):
    scores = cosine_scores(32, 20, device)
    epsilon, dtype = 1e-3, torch.float32
    if case == "eps0.01_score_above_0.887":
        scores[0, 0], epsilon = 0.9, 0.01
    elif case == "fp16_batch16_eps0.05":
        scores, epsilon, dtype = scores.abs(), 0.05, torch.float16
    elif case == "far_prototype_eps1e-3":
        scores[:, 3] = -1.0
    elif case == "far_sample_eps1e-3":
        scores[5] = -1.0
    else:
        scores = scores.sign() * 3e38
        if case == "extreme_fp32_far_sample":
            scores[5] = -3e38
    scores = scores.to(dtype)
    extreme = case.startswith("extreme")
    if not extreme:  # the case is real: the textbook in the input's precision fails
        assert not torch.isfinite(textbook_native(scores, epsilon)).all()
    q = sinkhorn(scores, 3, epsilon)
    assert torch.isfinite(q).all() and (q >= 0).all()
    torch.testing.assert_close(q.sum(dim=1), torch.ones_like(q[:, 0]), rtol=0, atol=1e-5)
    if not extreme:  # and the codes are the exact Sinkhorn ones
        assert_matches_oracle(q, exact_fp64(scores, 3, epsilon))


@settings(max_examples=examples(30))
@given(scores=score_matrices(max_abs=2.0), iterations=st.integers(0, 5), data=st.data())
def test_equivariant_to_permutations(device, scores, iterations, data):
    batch, prototypes = scores.shape
    rows = torch.tensor(data.draw(st.permutations(range(batch))))
    cols = torch.tensor(data.draw(st.permutations(range(prototypes))))
    scores = scores.to(device)
    q = sinkhorn(scores, iterations, 0.05)
    permuted = sinkhorn(scores[rows][:, cols], iterations, 0.05)
    torch.testing.assert_close(permuted, q[rows][:, cols], rtol=1e-4, atol=1e-20)


@settings(max_examples=examples(30))
@given(
    scores=score_matrices(max_abs=2.0),
    iterations=st.integers(0, 5),
    constant=st.integers(-100, 100),
    data=st.data(),
)
def test_invariant_to_global_and_per_prototype_constants(device, scores, iterations, constant, data):
    """Adding c to every score (and, for ≥ 1 iteration, a_k to prototype k) changes nothing, bit for
    bit: the grid scores plus integers are exact in float32, and the maxima subtracted before the
    exponential cancel the shifts exactly."""
    scores = scores.to(device)
    q = sinkhorn(scores, iterations, 0.05)
    assert torch.equal(sinkhorn(scores + constant, iterations, 0.05), q)
    if iterations > 0:
        a = data.draw(st.lists(st.integers(-50, 50), min_size=scores.shape[1], max_size=scores.shape[1]))
        assert torch.equal(sinkhorn(scores + torch.tensor(a, device=device), iterations, 0.05), q)


def test_no_gradient_and_input_untouched(device):
    scores = cosine_scores(8, 5, device).requires_grad_()
    before = scores.detach().clone()
    q = sinkhorn(scores)
    assert not q.requires_grad and q.grad_fn is None
    assert torch.equal(scores.detach(), before)


def test_autocast_computes_in_float32(device):
    scores = cosine_scores(64, 30, device)
    expected = sinkhorn(scores)
    for dtype in [torch.bfloat16] + ([torch.float16] if device == "cuda" else []):
        with torch.autocast(device_type=device, dtype=dtype):
            q = sinkhorn(scores)
            q_low = sinkhorn(scores.to(dtype))
        assert q.dtype == torch.float32 and q_low.dtype == torch.float32
        torch.testing.assert_close(q, expected, rtol=1e-6, atol=1e-9)  # no matvec in low precision
        assert torch.isfinite(q_low).all()
        assert_matches_oracle(q_low, textbook_fp64(scores.to(dtype)))
