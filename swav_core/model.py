"""fmcib's ``SwaV`` (``fmcib.ssl.modules.SwaV``): same constructor, attributes, forward; fixes in README."""
import itertools
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .heads import SwaVProjectionHead, SwaVPrototypes, _flag, _int
from .memory_bank import MemoryBankModule

Scores = Union[torch.Tensor, List[torch.Tensor]]  # (B, K) per crop, or one per prototype head


class SwaV(nn.Module):
    """SwAV with multi-crop and optional per-crop queues (Caron et al., 2020, §3.1 and §4).

    Each crop x (B, C, *spatial): ``backbone(x).flatten(1)`` (B, num_ftrs) → ``SwaVProjectionHead(num_ftrs,
    num_ftrs // 2, out_dim)`` → L2 normalisation (z) → scores zᵀc_k (B, K) against the prototypes (normalised
    every call; ``n_prototypes`` a list: a list over heads). A full queue of a high-resolution crop's past z is
    re-scored too (no gradient), one per high-resolution crop (``n_queues``), from ``start_queue_at_epoch`` on;
    a queue of ``queue_length`` rows (fmcib: 3840) is first used ceil(queue_length / B) steps after it starts
    and, longer than the data's N samples, holds each queue_length / N times. ``n_steps_frozen_prototypes``
    counts optimisation steps; ``prototype_bias``: lightly ≥ 1.2.31's and fmcib's; ``group_crops_by_resolution``:
    one backbone call per run of same-shape crops, as FAIR. Returns (high, low, queue scores or None).

    >>> backbone = nn.Sequential(nn.Conv2d(3, 8, 3), nn.AdaptiveAvgPool2d(1))
    >>> model = SwaV(backbone, num_ftrs=8, out_dim=4, n_prototypes=10, n_queues=0)
    >>> high, low, queue = model(([torch.randn(2, 3, 16, 16)] * 2, [torch.randn(2, 3, 8, 8)]))
    >>> [s.shape for s in high + low], queue
    ([torch.Size([2, 10]), torch.Size([2, 10]), torch.Size([2, 10])], None)
    """

    def __init__(self, backbone: nn.Module, num_ftrs: int, out_dim: int,
                 n_prototypes: Union[int, Sequence[int]], n_queues: int, queue_length: int = 0,
                 start_queue_at_epoch: int = 0, n_steps_frozen_prototypes: int = 0,
                 prototype_bias: bool = False, group_crops_by_resolution: bool = False):
        super().__init__()
        self.num_ftrs, out_dim = _int("num_ftrs", num_ftrs, 2), _int("out_dim", out_dim, 1)
        n_queues, self.queue_length = _int("n_queues", n_queues, 0), _int("queue_length", queue_length, 0)
        self.start_queue_at_epoch = _int("start_queue_at_epoch", start_queue_at_epoch, 0)
        bias = _flag("prototype_bias", prototype_bias)
        self.group_crops_by_resolution = _flag("group_crops_by_resolution", group_crops_by_resolution)
        if n_queues > 0 and self.queue_length == 0:
            raise ValueError(f"n_queues={n_queues} needs queue_length > 0, got queue_length=0")
        self.backbone = backbone
        self.projection_head = SwaVProjectionHead(self.num_ftrs, self.num_ftrs // 2, out_dim)
        self.prototypes = SwaVPrototypes(out_dim, n_prototypes, n_steps_frozen_prototypes, bias=bias)
        queues = [MemoryBankModule(size=(self.queue_length, out_dim)) for _ in range(n_queues)]
        self.queues: Optional[nn.ModuleList] = nn.ModuleList(queues) if queues else None

    def __call__(self, input: Tuple[Sequence[torch.Tensor], Sequence[torch.Tensor]], epoch: Optional[int] = None,
                 step: Optional[int] = None) -> Tuple[List[Scores], List[Scores], Optional[List[Scores]]]:
        if torch.compiler.is_compiling():  # the checks and normalize eagerly (not guarded on), the forward compiled
            return torch.compiler.disable(SwaV._checked_call, recursive=False)(self, input, epoch, step)
        return self._checked_call(input, epoch, step)

    def _checked_call(self, input, epoch: Optional[int], step: Optional[int]):
        high, low, epoch = _check_input(self, input, epoch, step)  # before any state changes
        # Normalised where stored, before the hooks: FSDP2's swaps in an unsharded copy, which would lose it.
        self.prototypes.normalize()
        return super().__call__((high, low), epoch, step)

    def forward(self, input: Tuple[List[torch.Tensor], List[torch.Tensor]], epoch: Optional[int] = None,
                step: Optional[int] = None) -> Tuple[List[Scores], List[Scores], Optional[List[Scores]]]:
        """Scores (high, low, queue); call the model, not forward: the call checks and normalises the prototypes."""
        (high, low), epoch = input, epoch or 0
        n_crops, n_high = len(high) + len(low), len(high)
        z = self._embed(high + low)  # (V·B, D), unit rows, crop after crop
        scores = _per_crop(self.prototypes(z, step), n_crops)  # one product for all crops, split back
        high_z = rearrange(z, "(v b) d -> v b d", v=n_crops)[:n_high]  # (V1, B, D)
        return scores[:n_high], scores[n_high:], self._queue_scores(high_z, epoch, step)

    def _embed(self, crops: List[torch.Tensor]) -> torch.Tensor:
        """Unit-norm projections z of all V crops, crop after crop: (V·B, D)."""
        if not self.group_crops_by_resolution:  # fmcib: one backbone and head call per crop
            return F.normalize(torch.cat([self.projection_head(self._backbone(x)) for x in crops]), dim=1)
        # FAIR's multi-crop: a backbone call per run of one shape and dtype (cat would cast), one head call
        runs = [list(run) for _, run in itertools.groupby(crops, key=lambda x: (x.shape, x.dtype))]
        h = torch.cat([self._backbone(rearrange(r, "v b ... -> (v b) ...")) for r in runs])  # (V·B, D_in)
        return F.normalize(self.projection_head(h), dim=1)

    def _backbone(self, x: torch.Tensor) -> torch.Tensor:
        h = self.backbone(x).flatten(start_dim=1)  # (B, D_in)
        if h.shape[1] != self.num_ftrs:
            raise ValueError(f"backbone output flattens to {h.shape[1]} features per sample "
                             f"(shape {tuple(h.shape)}) but num_ftrs={self.num_ftrs}")
        return h

    @torch.no_grad()
    def _queue_scores(self, high_z: torch.Tensor, epoch: int, step: Optional[int]) -> Optional[List[Scores]]:
        """Full queues' rows scored (slot order: Sinkhorn is equivariant to it), then the batch (V1, B, D) pushed."""
        if torch.compiler.is_compiling():  # eagerly: the queues' Python counters would be guarded on
            return torch.compiler.disable(self._queue_scores)(high_z, epoch, step)
        if self.queues is None:
            return None
        use = all(q.is_full for q in self.queues) and epoch >= self.start_queue_at_epoch
        # Every rank calls the prototypes (0 rows while unused): under FSDP2 a collective, and ranks fill at other steps
        dtype = self.prototypes.heads[0].weight.dtype  # a mixed-precision policy's param_dtype
        scores = [self.prototypes(q.features(ordered=False)[: None if use else 0].to(dtype), step)
                  for q in self.queues]
        for queue, z in zip(self.queues, high_z):
            queue.push(z)
        return scores if use else None


def _per_crop(scores: Scores, n_crops: int) -> List[Scores]:
    """(V·B, K) scores, or a list of them over heads → V entries (B, K), or V lists over heads."""
    if torch.is_tensor(scores):
        return list(rearrange(scores, "(v b) k -> v b k", v=n_crops))
    return [list(crop) for crop in zip(*(_per_crop(s, n_crops) for s in scores))]  # V × H × (B, K_h)


# --- argument checks --------------------------------------------------------------------------------

def _check_input(model: SwaV, input, epoch, step) -> Tuple[List[torch.Tensor], List[torch.Tensor], int]:
    """The crop lists and the epoch (0 when None) of a call, every argument checked against ``model``."""
    if isinstance(epoch, (tuple, list)):  # lightly's model(high, low, ...): the crops as two arguments
        raise ValueError(f"SwaV takes the crops as one pair: model((high_resolution_crops, low_resolution_crops), "
                         f"epoch, step=step), got a {type(epoch).__name__} as epoch")
    if not isinstance(input, (tuple, list)) or len(input) != 2:
        n = len(input) if hasattr(input, "__len__") else "?"
        raise ValueError("input must be a pair (high_resolution_crops, low_resolution_crops), "
                         f"got {type(input).__name__} of length {n}: call model((high, low), epoch, step=step)")
    for name, crops in zip(("high-resolution", "low-resolution"), input):
        if not isinstance(crops, (tuple, list)):
            got = f"a tensor of shape {tuple(crops.shape)}" if torch.is_tensor(crops) else type(crops).__name__
            raise ValueError(f"the {name} crops must be a list of batch tensors (B, C, ...), got {got}: call "
                             "model((high, low), epoch, step=step) with high and low lists of crops")
        for i, x in enumerate(crops):
            if not torch.is_tensor(x) or x.ndim < 2:
                got = f"shape {tuple(x.shape)}" if torch.is_tensor(x) else type(x).__name__
                raise ValueError(f"{name} crop {i} must be a batch tensor (B, C, ...), got {got}")
    high, low = list(input[0]), list(input[1])
    if not high + low:
        raise ValueError("input holds no crops: both crop lists are empty")
    sizes = [x.shape[0] for x in high + low]
    if len(set(sizes)) > 1:
        raise ValueError(f"all crops of one forward must have the same batch size, got {sizes}")
    if model.queues is not None and len(high) != len(model.queues):
        raise ValueError(f"got {len(high)} high-resolution crops but the model has n_queues="
                         f"{len(model.queues)} (one queue per high-resolution crop)")
    if model.queues is not None and model.start_queue_at_epoch > 0 and epoch is None:
        raise ValueError(f"epoch is required when start_queue_at_epoch={model.start_queue_at_epoch} > 0")
    frozen = model.prototypes.n_steps_frozen_prototypes  # the step is needed only while training
    if step is None and frozen > 0 and model.prototypes.training and torch.is_grad_enabled():
        raise ValueError(f"SwaV(n_steps_frozen_prototypes={frozen}) needs forward(input, epoch, step=...) "
                         "while training")
    _int("step", 0 if step is None else step, 0)
    return high, low, 0 if epoch is None else _int("epoch", epoch, 0)
