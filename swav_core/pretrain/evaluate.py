"""The job's final evaluation: k-NN top-1 of the pretrained backbone and of its random initialisation."""
from typing import Any, Dict

import torch
from torch import nn

from .data import Data
from .knn import embed, knn_top1

__all__ = ["evaluate"]


def evaluate(model: nn.Module, init_backbone: nn.Module, data: Data, device: torch.device, k: int) -> Dict[str, Any]:
    """k-NN (bank: the training samples with their labels; queries: the held-out samples).

    Both backbones run in eval mode (BatchNorm running statistics). Without labels the values are None.
    """
    if data.train_labels is None or data.test is None:
        return {"knn_top1": None, "knn_top1_random_init": None, "knn_k": k, "knn_test_samples": 0}
    scores = {}
    for name, backbone in (("knn_top1", model.backbone), ("knn_top1_random_init", init_backbone.to(device))):
        bank, queries = embed(backbone, data.train, device=device), embed(backbone, data.test, device=device)
        scores[name] = knn_top1(bank, data.train_labels, queries, data.test_labels, k=k)
    return {**scores, "knn_k": k, "knn_test_samples": len(data.test)}
