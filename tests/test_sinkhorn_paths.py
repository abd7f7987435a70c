"""sinkhorn()'s two paths: the fast path serves ordinary scores, its underflow guard is sound
(whenever it accepts, the codes are exact Sinkhorn's), and the stable path answers when it rejects."""
import importlib

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from oracles import assert_matches_oracle, cosine_scores, exact_fp64, far_pair_scores
from strategies import examples, score_matrices

sinkhorn_module = importlib.import_module("swav_core.sinkhorn")  # swav_core.sinkhorn is the function
paths_module = importlib.import_module("swav_core.sinkhorn_paths")


def fast_codes(scores, iterations=3, epsilon=0.05, rows=None):
    """The fast path alone: (codes, accepted)."""
    rows = len(scores) if rows is None else rows
    return sinkhorn_module._fast_codes([scores], iterations, epsilon, torch.float32, rows, None)


@pytest.mark.parametrize("epsilon", [0.02, 0.05, 0.1])
@pytest.mark.parametrize("batch, prototypes, rows", [(512, 300, 512), (4096, 3000, 4096), (300, 50, 64)])
def test_fast_path_accepts_ordinary_scores(device, batch, prototypes, rows, epsilon):
    scores = cosine_scores(batch, prototypes, device, seed=batch)
    q, accepted = fast_codes(scores, 3, epsilon, rows)
    assert accepted is True
    assert q.shape == (rows, prototypes)
    assert_matches_oracle(q, exact_fp64(scores, 3, epsilon)[:rows])


@pytest.mark.parametrize("case", ["far_sample", "nan", "inf", "minus_inf_row", "minus_inf_column"])
def test_fast_path_rejects_and_the_stable_path_answers(device, monkeypatch, case):
    scores = cosine_scores(32, 20, device)
    value = {"far_sample": -1.0, "nan": float("nan"), "inf": float("inf")}.get(case, float("-inf"))
    if case == "minus_inf_column":
        scores[:, 3] = value  # a prototype without a finite score
    elif case in ("far_sample", "minus_inf_row"):
        scores[5] = value  # a sample far from every prototype, or without a finite score
    else:
        scores[5, 2] = value  # one NaN or +inf score
    _, accepted = fast_codes(scores, 3, 1e-3)
    assert not accepted

    stable_calls = []
    stable = sinkhorn_module._stable_codes
    monkeypatch.setattr(sinkhorn_module, "_FAST_PATH", {"cpu": True, "cuda": True})
    monkeypatch.setattr(sinkhorn_module, "_stable_codes", lambda *a: stable_calls.append(1) or stable(*a))
    if case != "far_sample":  # the stable path validates: no NaN passed on
        with pytest.raises(ValueError, match="must be finite"):
            sinkhorn_module.sinkhorn(scores, 3, 1e-3)
    else:
        q = sinkhorn_module.sinkhorn(scores, 3, 1e-3)
        assert_matches_oracle(q, exact_fp64(scores, 3, 1e-3))
    assert stable_calls == [1]


@settings(max_examples=examples(60))
@given(
    scores=score_matrices(max_batch=40, max_prototypes=40),
    iterations=st.integers(1, 8),
    inverse_epsilon=st.integers(10, 130),
    data=st.data(),
)
@example(scores=torch.tensor([[-0.5787, 0.1172], [0.0781, 0.0391]]), iterations=1, inverse_epsilon=32,
         data=None)  # rejected: the first sample's masses underflow
@example(scores=torch.tensor([[-0.3, 0.3], [0.3, 0.3], [-0.3, -0.3]]), iterations=3, inverse_epsilon=100,
         data=None)  # accepted at |S|/ε = 30
def test_fast_path_guard_is_sound(device, scores, iterations, inverse_epsilon, data):
    """|S|/ε up to 390, where exp(S/ε) under- and overflows float32 about as often as not: whenever
    the guard accepts, the codes (also of the first ``rows`` samples only, as the loss asks for)
    are exact Sinkhorn's; and it accepts whenever |S|/ε ≤ 30 (every mass then lies in [e⁻³⁰, n·e³⁰])."""
    epsilon = 1.0 / inverse_epsilon
    rows = len(scores) if data is None else data.draw(st.integers(1, len(scores)), label="rows")
    q, accepted = fast_codes(scores.to(device), iterations, epsilon, rows)
    if scores.abs().max().item() / epsilon <= 30:
        assert accepted
    if accepted:
        assert_matches_oracle(q, exact_fp64(scores, iterations, epsilon)[:rows])


def test_fast_path_guard_decides_both_ways_across_float32s_range(device):
    """The soundness test above is not vacuous: over scores whose exponents |S|/ε run from 10 to
    390, across float32's exp range (≈ 88), the guard keeps many fast results, each equal to exact
    Sinkhorn, and rejects many."""
    accepted = 0
    for seed in range(40):
        g = torch.Generator().manual_seed(seed)
        batch, prototypes = 8 + seed, 50 - seed
        scores = torch.rand(batch, prototypes, generator=g) * 2 - 1
        scores[:, seed % prototypes] -= seed % 3  # sometimes a far prototype
        epsilon = 1.0 / (10 + 3 * seed)  # |S|/ε from 10 to 390
        q, ok = fast_codes(scores.to(device), 3, epsilon)
        if ok:
            accepted += 1
            assert_matches_oracle(q, exact_fp64(scores, 3, epsilon))
    assert 10 <= accepted <= 30  # 17 of 40


def test_stable_path_hands_over_to_log_domain_only_beyond_its_range(device, monkeypatch):
    """v spanning more than float32 can scale (a far prototype after many rounds at small ε) sends
    the stable path's codes to the exact log-domain Sinkhorn; ordinary calls never go there."""
    calls = []
    log_codes = paths_module._log_codes
    monkeypatch.setattr(paths_module, "_log_codes", lambda *a: calls.append(1) or log_codes(*a))
    monkeypatch.setattr(sinkhorn_module, "_FAST_PATH", {"cpu": False, "cuda": False})
    scores = far_pair_scores().to(device)
    for iterations, handed_over in [(10, False), (30, True)]:
        calls.clear()
        q = sinkhorn_module.sinkhorn(scores, iterations, 0.01)
        assert calls == ([1] if handed_over else [])
        assert_matches_oracle(q, exact_fp64(scores, iterations, 0.01))
    for batch in (256, 4096):  # SwAV's shapes and ε
        calls.clear()
        sinkhorn_module.sinkhorn(cosine_scores(batch, 3000, device, seed=batch), 3, 0.01)
        assert calls == []


def test_fast_scaling_with_column_sums_by_matrix_vector_product(device):
    """The capturable middle of the fast path takes the first column sums as Eᵀ1 when given the ones
    vector (the CUDA-graph candidate in benchmarks/ does): the same vectors up to their rounding."""
    scores = cosine_scores(300, 40, device)
    log_v, ranges = paths_module._fast_scaling(scores * 20.0, 3, 300)
    log_v_mv, ranges_mv = paths_module._fast_scaling(scores * 20.0, 3, 300, torch.ones(300, device=device))
    # Two summation orders of B = 300 positive terms differ by at most B·2⁻²⁴ relatively; the scaling
    # (a division) and the later steps carry that on without growing it: 4·B·2⁻²⁴ per value.
    bound = 4 * 300 * 2.0**-24
    torch.testing.assert_close(ranges_mv, ranges, rtol=bound, atol=0)
    torch.testing.assert_close(log_v_mv, log_v, rtol=0, atol=bound)  # d(log v) = dv/v
