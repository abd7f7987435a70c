"""The training-health figures against fp64 formulas written here, on hand-built cases."""
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from swav_core import embedding_std, pred_entropy, prototype_usage, training_health


def _entropy_fp64(scores, temperature):
    p = torch.softmax(scores.double() / temperature, dim=1)
    return float(-(p * torch.log(p.clamp_min(1e-300))).sum(dim=1).mean() / math.log(scores.shape[1]))


def _std_fp64(z):
    unit = z.double() / z.double().norm(dim=1, keepdim=True)
    return float(unit.std(dim=0).mean() * math.sqrt(z.shape[1]))


def test_uniform_scores_give_entropy_one_and_one_hot_give_zero(device):
    assert float(pred_entropy(torch.zeros(8, 30, device=device))) == pytest.approx(1.0, abs=1e-6)
    one_hot = torch.full((8, 30), -1e4, device=device)
    one_hot[torch.arange(8), torch.arange(8) % 30] = 1e4
    assert float(pred_entropy(one_hot)) == pytest.approx(0.0, abs=1e-6)
    assert float(pred_entropy(torch.randn(8, 30, device=device) / 1e3, temperature=100)) > 0.999999  # τ = 100


@settings(deadline=None)
@given(b=st.integers(1, 40), k=st.integers(2, 60), temperature=st.sampled_from([0.05, 0.1, 1.0, 10.0]),
       seed=st.integers(0, 2**16))
def test_entropy_matches_fp64_formula(b, k, temperature, seed):
    scores = torch.rand(b, k, generator=torch.Generator().manual_seed(seed)) * 2 - 1  # cosine-like
    assert float(pred_entropy(scores, temperature)) == pytest.approx(_entropy_fp64(scores, temperature), abs=1e-5)


def test_every_sample_on_one_prototype_gives_usage_one_over_k(device):
    scores = torch.zeros(16, 40, device=device)
    scores[:, 7] = 1.0
    assert float(prototype_usage(scores)) == pytest.approx(1 / 40)
    scores = torch.eye(40, device=device)[:16] + 0.01 * torch.rand(16, 40, device=device)  # 16 distinct tops
    assert float(prototype_usage(scores)) == pytest.approx(16 / 40)


def test_equal_embeddings_give_std_zero_and_random_unit_vectors_about_one(device):
    same = torch.randn(1, 64, device=device).expand(32, 64) * 3
    assert float(embedding_std(same)) == pytest.approx(0.0, abs=1e-6)
    z = torch.randn(4096, 64, generator=torch.Generator().manual_seed(0)).to(device)
    assert float(embedding_std(z)) == pytest.approx(_std_fp64(z), rel=1e-5)
    assert float(embedding_std(z)) == pytest.approx(1.0, abs=0.02)  # each coordinate's variance is 1/D


def test_training_health_returns_the_three_as_tensors_without_gradient(device):
    z = F.normalize(torch.randn(16, 8, device=device, requires_grad=True), dim=1)
    scores = z @ F.normalize(torch.randn(10, 8, device=device), dim=1).T
    figures = training_health(z, scores, temperature=0.1)
    assert sorted(figures) == ["embedding_std", "pred_entropy", "prototype_usage"]
    assert all(f.ndim == 0 and not f.requires_grad and f.device == scores.device for f in figures.values())
    assert float(figures["pred_entropy"]) == pytest.approx(_entropy_fp64(scores.detach(), 0.1), abs=1e-5)


@pytest.mark.parametrize("call, match", [
    (lambda: pred_entropy(torch.zeros(4, 1)), r"scores must be a floating-point tensor \(B, K\) with B >= 1 and K >= 2"),
    (lambda: pred_entropy(torch.zeros(4, 3), temperature=0), "temperature must be a finite number > 0"),
    (lambda: prototype_usage(torch.zeros(4, dtype=torch.long)), "scores must be a floating-point tensor"),
    (lambda: embedding_std(torch.zeros(1, 3)), "needs at least 2 samples"),
])
def test_bad_input_raises(call, match):
    with pytest.raises(ValueError, match=match):
        call()
