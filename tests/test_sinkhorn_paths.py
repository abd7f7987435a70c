"""sinkhorn()'s two paths: the fast path serves ordinary scores, its underflow guard is sound
(whenever it accepts, the codes are exact Sinkhorn's), and the stable path answers when it rejects."""
import importlib

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from oracles import assert_matches_oracle, cosine_scores, exact_fp64
from strategies import score_matrices

sinkhorn_module = importlib.import_module("swav_core.sinkhorn")  # swav_core.sinkhorn is the function


def fast_codes(scores, iterations=3, epsilon=0.05, rows=None):
    """The fast path alone: (codes, accepted)."""
    rows = len(scores) if rows is None else rows
    return sinkhorn_module._fast_codes([scores], iterations, epsilon, torch.float32, rows, None)


def exponent_rtol(scores, epsilon):
    """Per element, the fp32 rounding of the exponent, |x|·2⁻²⁴ with |x| ≤ 2·max|S|/ε, bounds the
    relative error of either path (as in test_sinkhorn's exact-Sinkhorn test)."""
    return 1e-5 + 8 * scores.abs().max().item() / epsilon * 2.0**-24


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
        assert_matches_oracle(q, exact_fp64(scores, 3, 1e-3), rtol=exponent_rtol(scores, 1e-3), fro=1e-4)
    assert stable_calls == [1]


@settings(max_examples=60)
@given(
    scores=score_matrices(max_abs=32.0),
    iterations=st.integers(1, 6),
    epsilon=st.sampled_from([1e-3, 0.01, 0.05, 0.3]),
)
@example(scores=torch.tensor([[-18.5195, 3.0], [2.0, 1.0]]), iterations=1, epsilon=0.01)  # rejected
@example(scores=torch.tensor([[-9.0, 9.0], [9.0, 9.0], [-9.0, -9.0]]), iterations=3, epsilon=0.3)
def test_fast_path_guard_is_sound(device, scores, iterations, epsilon):
    """Under- or overflow in E = exp(S/ε) can only cost precision where the guard rejects; and it
    accepts whenever |S|/ε ≤ 30 (then every mass lies in [e⁻³⁰, n·e³⁰], within its bounds)."""
    q, accepted = fast_codes(scores.to(device), iterations, epsilon)
    if scores.abs().max().item() / epsilon <= 30:
        assert accepted
    if accepted:
        rtol = exponent_rtol(scores, epsilon)
        assert_matches_oracle(q, exact_fp64(scores, iterations, epsilon), rtol=rtol, fro=rtol)
