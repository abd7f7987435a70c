"""sinkhorn(): invalid hyper-parameters and scores raise; -inf scores handled as never-assigned."""
import pytest
import torch

from oracles import assert_matches_oracle, cosine_scores, textbook_fp64
from swav_core import sinkhorn



@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(iterations=-1), "iterations"),
        (dict(iterations=1.5), "iterations"),
        (dict(iterations=True), "iterations"),
        (dict(epsilon=0.0), "epsilon"),
        (dict(epsilon=-0.05), "epsilon"),
        (dict(epsilon=float("nan")), "epsilon"),
        (dict(epsilon=float("inf")), "epsilon"),
        (dict(epsilon="0.05"), "epsilon"),
        (dict(epsilon=1e-300), r"epsilon=1e-300 is too small for torch.float32"),  # 2/ε overflows
    ],
)
def test_bad_hyper_parameters_raise(device, kwargs, match):
    with pytest.raises(ValueError, match=match):
        sinkhorn(torch.randn(4, 3, device=device), **kwargs)


@pytest.mark.parametrize(
    "scores",
    [[[1.0, 2.0]], torch.randn(5), torch.randn(2, 3, 4), torch.empty(0, 3), torch.empty(3, 0),
     torch.ones(3, 2, dtype=torch.long)],
    ids=["list", "1d", "3d", "no-samples", "no-prototypes", "int"],
)
def test_bad_scores_raise(device, scores):
    with pytest.raises(ValueError, match="out must be"):
        sinkhorn(scores.to(device) if isinstance(scores, torch.Tensor) else scores)


@pytest.mark.parametrize("iterations", [0, 3])
@pytest.mark.parametrize("where", ["nan", "+inf", "-inf row", "-inf column"])
def test_non_finite_scores_raise(device, iterations, where):
    scores = cosine_scores(6, 4, device)
    if where == "nan":
        scores[2, 1] = float("nan")
    elif where == "+inf":
        scores[2, 1] = float("inf")
    elif where == "-inf row":
        scores[2] = float("-inf")
    else:
        scores[:, 1] = float("-inf")
    if where == "-inf column" and iterations == 0:  # a softmax per sample: the prototype gets 0
        q = sinkhorn(scores, iterations)
        assert torch.isfinite(q).all() and (q[:, 1] == 0).all()
        return
    with pytest.raises(ValueError, match="out must be finite"):
        sinkhorn(scores, iterations)


def test_isolated_minus_inf_means_never_assigned(device):
    scores = cosine_scores(6, 4, device)
    scores[2, 1] = float("-inf")
    q = sinkhorn(scores)
    assert q[2, 1] == 0 and torch.isfinite(q).all()
    assert_matches_oracle(q, textbook_fp64(scores))
