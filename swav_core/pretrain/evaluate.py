"""The job's final evaluation: k-NN and linear-probe top-1 of the pretrained backbone and of its random
initialisation, on the same frozen features.

k-NN: the weighted vote of Wu et al. (2018) that DINO and SwAV report: cosine similarity of L2-normalised
features, each of the k nearest training samples voting for its label with weight exp(similarity / T).
Linear probe: multinomial logistic regression on the same L2-normalised features, a fixed budget (full-batch
L-BFGS, 100 iterations, L2 penalty 1e-4), as SwAV's linear evaluation does on a larger scale.
"""
from typing import Any, Dict

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from .data import Data

__all__ = ["evaluate", "embed", "knn_top1", "linear_top1"]


def evaluate(backbone: nn.Module, init_backbone: nn.Module, data: Data, device: torch.device, k: int) -> Dict[str, Any]:
    """k-NN (bank: the training samples with their labels; queries: the held-out samples).

    Both backbones run in eval mode (BatchNorm running statistics). Without labels the values are None.
    """
    if data.train_labels is None or data.test is None:
        return {"knn_top1": None, "knn_top1_random_init": None, "linear_top1": None, "linear_top1_random_init": None,
                "knn_k": k, "knn_test_samples": 0}
    scores = {}
    for suffix, net in (("", backbone), ("_random_init", init_backbone.to(device))):
        bank, queries = embed(net, data.train, device=device), embed(net, data.test, device=device)
        scores["knn_top1" + suffix] = knn_top1(bank, data.train_labels, queries, data.test_labels, k=k)
        scores["linear_top1" + suffix] = linear_top1(bank, data.train_labels, queries, data.test_labels)
    return {**scores, "knn_k": k, "knn_test_samples": len(data.test)}


@torch.no_grad()
def embed(backbone: nn.Module, x, batch_size: int = 256, device: str = "cpu") -> torch.Tensor:
    """L2-normalised ``backbone`` features of every sample, in eval mode (BatchNorm running stats).

    Shape:
        x: (N, C, *spatial), a tensor or a dataset of samples (a ``--data`` folder). Output: (N, D) float32 on the CPU.
    """
    was_training = backbone.training
    backbone.eval()
    try:
        chunks = x.split(batch_size) if torch.is_tensor(x) else DataLoader(x, batch_size=batch_size)  # a folder
        out = [backbone(chunk.to(device)).flatten(1).float().cpu() for chunk in chunks]
    finally:
        backbone.train(was_training)
    return F.normalize(torch.cat(out), dim=1)


@torch.no_grad()
def knn_top1(train_z: torch.Tensor, train_y: torch.Tensor, test_z: torch.Tensor, test_y: torch.Tensor,
             k: int = 20, temperature: float = 0.07) -> float:
    """Top-1 accuracy of a cosine-similarity k-NN classifier with votes weighted by exp(sim / T).

    Shape:
        train_z: (N, D) and test_z: (M, D), L2-normalised; train_y: (N,), test_y: (M,) int labels.
    """
    if not 1 <= k <= train_z.shape[0]:
        raise ValueError(f"k must be in [1, {train_z.shape[0]}] (the bank size), got {k}")
    n_classes = int(max(train_y.max(), test_y.max())) + 1
    correct = 0
    for z, y in zip(test_z.split(1024), test_y.split(1024)):
        sim, idx = (z @ train_z.T).topk(k, dim=1)  # (m, k)
        votes = torch.zeros(z.shape[0], n_classes).scatter_add_(1, train_y[idx], (sim / temperature).exp())
        correct += int((votes.argmax(1) == y).sum())
    return correct / test_z.shape[0]


def linear_top1(train_z: torch.Tensor, train_y: torch.Tensor, test_z: torch.Tensor, test_y: torch.Tensor,
                iterations: int = 100, weight_decay: float = 1e-4) -> float:
    """Top-1 accuracy of a logistic regression fitted on (train_z, train_y) by full-batch L-BFGS, seeded.

    Shape:
        train_z: (N, D) and test_z: (M, D); train_y: (N,), test_y: (M,) int labels.
    """
    n_classes = int(max(train_y.max(), test_y.max())) + 1
    with torch.random.fork_rng(devices=[]), torch.enable_grad():
        torch.manual_seed(0)
        probe = nn.Linear(train_z.shape[1], n_classes).double()
        x, optimizer = train_z.double(), torch.optim.LBFGS(probe.parameters(), max_iter=iterations,
                                                           line_search_fn="strong_wolfe")

        def closure():
            optimizer.zero_grad()
            loss = F.cross_entropy(probe(x), train_y) + weight_decay * probe.weight.square().sum()
            loss.backward()
            return loss

        optimizer.step(closure)
    with torch.no_grad():
        return float((probe(test_z.double()).argmax(1) == test_y).float().mean())
