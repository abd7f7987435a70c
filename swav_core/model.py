"""fmcib's ``SwaV`` model (``fmcib.ssl.modules.SwaV``), rebuilt on swav_core's modules.

Same constructor (arguments and order), attributes and forward contract as fmcib, so that
``from swav_core import SwaV`` replaces ``from fmcib.ssl.modules import SwaV``; fmcib/lightly
checkpoints load with ``strict=True`` into ``SwaV(..., prototype_bias=True)``. The deliberate fixes
(README, "Behaviour and differences"): prototype freezing counts optimisation steps, not epochs; the
queue is used only once it holds ``queue_length`` real features from earlier steps; the queues live in
the state_dict and survive DDP's buffer broadcast.
"""
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from ._checks import _flag, _int_at_least
from .heads import SwaVProjectionHead, SwaVPrototypes
from .memory_bank import MemoryBankModule

Scores = Union[torch.Tensor, List[torch.Tensor]]  # (B, K) per crop, or one per prototype head


class SwaV(nn.Module):
    """SwAV with multi-crop and optional per-crop queues (Caron et al., 2020, §3.1 and §4).

    Each crop x goes ``backbone(x).flatten(1)`` → ``SwaVProjectionHead(num_ftrs, num_ftrs // 2,
    out_dim)`` → L2 normalisation (z on the unit sphere) → prototype scores zᵀc_k. The prototypes are
    L2-normalised at the start of every forward. With ``n_queues > 0`` each high-resolution crop has
    its own FIFO queue of past features; once the queue is full, its rows are re-scored by the current
    prototypes (no gradient) so that Sinkhorn sees more than one batch.

    Args:
        backbone: module mapping a crop batch (B, C, *spatial) to features (B, num_ftrs, ...).
        num_ftrs: D_in, the flattened backbone output size.
        out_dim: D, the projection (and prototype) dimension.
        n_prototypes: K, an int, or a list of ints for several prototype heads.
        n_queues: number of queues, which must equal the number of high-resolution crops; 0 for none.
        queue_length: rows per queue (fmcib: 3840). Default: 0
        start_queue_at_epoch: queue scores are returned only from this epoch on. Default: 0
        n_steps_frozen_prototypes: optimisation steps during which the prototypes do not train.
            Default: 0
        prototype_bias: prototypes with a bias, as lightly >= 1.2.31 and fmcib. Default: False
        group_crops_by_resolution: FAIR's multi-crop forward: the backbone runs once per run of
            consecutive same-shaped crops, the projection head once on all crops. Default: False

    Shape:
        forward(((x_1..x_V1), (x'_1..x'_V2)), epoch, step) →
        (high: V1 × (B, K), low: V2 × (B, K), queue: V1 × (queue_length, K) or None);
        with several heads every (·, K) becomes a list over heads.

    Example::

        >>> backbone = nn.Sequential(nn.Conv2d(3, 8, 3), nn.AdaptiveAvgPool2d(1))
        >>> model = SwaV(backbone, num_ftrs=8, out_dim=4, n_prototypes=10, n_queues=0)
        >>> high, low, queue = model(([torch.randn(2, 3, 16, 16)] * 2, [torch.randn(2, 3, 8, 8)]))
        >>> [s.shape for s in high + low], queue
        ([torch.Size([2, 10]), torch.Size([2, 10]), torch.Size([2, 10])], None)
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_ftrs: int,
        out_dim: int,
        n_prototypes: Union[int, Sequence[int]],
        n_queues: int,
        queue_length: int = 0,
        start_queue_at_epoch: int = 0,
        n_steps_frozen_prototypes: int = 0,
        prototype_bias: bool = False,
        group_crops_by_resolution: bool = False,
    ):
        super().__init__()
        num_ftrs = _int_at_least("num_ftrs", num_ftrs, 2)
        n_queues = _int_at_least("n_queues", n_queues, 0)
        queue_length = _int_at_least("queue_length", queue_length, 0)
        start_queue_at_epoch = _int_at_least("start_queue_at_epoch", start_queue_at_epoch, 0)
        prototype_bias = _flag("prototype_bias", prototype_bias)
        if n_queues > 0 and queue_length == 0:
            raise ValueError(f"n_queues={n_queues} needs queue_length > 0, got queue_length=0")
        self.backbone = backbone
        self.projection_head = SwaVProjectionHead(num_ftrs, num_ftrs // 2, out_dim)
        self.prototypes = SwaVPrototypes(
            out_dim, n_prototypes, n_steps_frozen_prototypes, bias=prototype_bias
        )
        self.queues: Optional[nn.ModuleList] = None
        if n_queues > 0:
            self.queues = nn.ModuleList(
                MemoryBankModule(size=(queue_length, out_dim)) for _ in range(n_queues)
            )
        self.num_ftrs = num_ftrs
        self.queue_length = queue_length
        self.start_queue_at_epoch = start_queue_at_epoch
        self.group_crops_by_resolution = _flag("group_crops_by_resolution", group_crops_by_resolution)

    def extra_repr(self) -> str:
        return (
            f"num_ftrs={self.num_ftrs}, queue_length={self.queue_length}, "
            f"start_queue_at_epoch={self.start_queue_at_epoch}, "
            f"group_crops_by_resolution={self.group_crops_by_resolution}"
        )

    def forward(
        self,
        input: Tuple[Sequence[torch.Tensor], Sequence[torch.Tensor]],
        epoch: Optional[int] = None,
        step: Optional[int] = None,
    ) -> Tuple[List[Scores], List[Scores], Optional[List[Scores]]]:
        high_crops, low_crops = self._check_input(input, epoch, step)  # before any state changes
        n_high = len(high_crops)
        self.prototypes.normalize()
        features = self._embed(high_crops + low_crops)  # V × (B, D), unit rows
        scores = self._score(features, step)  # V × (B, K)
        queue_scores = self._queue_scores(features[:n_high], epoch, step)
        return scores[:n_high], scores[n_high:], queue_scores

    def _check_input(self, input, epoch, step) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
        if not isinstance(input, (tuple, list)) or len(input) != 2:
            raise ValueError(
                "input must be a pair (high_resolution_crops, low_resolution_crops), "
                f"got {type(input).__name__} of length {len(input) if hasattr(input, '__len__') else '?'}"
            )
        for name, crops in (("high-resolution", input[0]), ("low-resolution", input[1])):
            if not isinstance(crops, (tuple, list)):
                is_tensor = isinstance(crops, torch.Tensor)
                got = f"a tensor of shape {tuple(crops.shape)}" if is_tensor else type(crops).__name__
                raise ValueError(f"the {name} crops must be a list of batch tensors (B, C, ...), got {got}")
        high, low = list(input[0]), list(input[1])
        if not high and not low:
            raise ValueError("input holds no crops: both crop lists are empty")
        for name, crops in (("high-resolution", high), ("low-resolution", low)):
            for i, x in enumerate(crops):
                if not isinstance(x, torch.Tensor) or x.ndim < 2:
                    got = f"shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
                    raise ValueError(f"{name} crop {i} must be a batch tensor (B, C, ...), got {got}")
        sizes = [x.shape[0] for x in high + low]
        if len(set(sizes)) > 1:
            raise ValueError(f"all crops of one forward must have the same batch size, got {sizes}")
        if self.queues is not None:
            if len(high) != len(self.queues):
                raise ValueError(
                    f"got {len(high)} high-resolution crops but the model has n_queues="
                    f"{len(self.queues)} (one queue per high-resolution crop)"
                )
            if self.start_queue_at_epoch > 0 and epoch is None:
                raise ValueError(
                    f"epoch is required when start_queue_at_epoch={self.start_queue_at_epoch} > 0"
                )
        if epoch is not None:
            _int_at_least("epoch", epoch, 0)
        if step is not None:
            _int_at_least("step", step, 0)
        elif self.prototypes._needs_step():
            raise ValueError(
                f"SwaV(n_steps_frozen_prototypes={self.prototypes.n_steps_frozen_prototypes}) needs "
                "forward(input, epoch, step=...) while training"
            )
        return high, low

    def _backbone(self, x: torch.Tensor) -> torch.Tensor:
        h = self.backbone(x).flatten(start_dim=1)  # (B, D_in)
        if h.shape[1] != self.num_ftrs:
            raise ValueError(
                f"backbone output flattens to {h.shape[1]} features per sample "
                f"(shape {tuple(h.shape)}) but num_ftrs={self.num_ftrs}"
            )
        return h

    def _embed(self, crops: List[torch.Tensor]) -> List[torch.Tensor]:
        """Unit-norm projections z of every crop, V × (B, D)."""
        if not self.group_crops_by_resolution:
            return [F.normalize(self.projection_head(self._backbone(x)), dim=1) for x in crops]
        batch = crops[0].shape[0]
        runs, start = [], 0  # FAIR's multi-crop: one backbone call per run of same-shaped crops
        for end in range(1, len(crops) + 1):
            if end == len(crops) or crops[end].shape != crops[start].shape:
                runs.append(self._backbone(torch.cat(crops[start:end])))  # (n_run·B, D_in)
                start = end
        z = F.normalize(self.projection_head(torch.cat(runs)), dim=1)  # (V·B, D)
        return list(z.split(batch))

    def _score(self, features: List[torch.Tensor], step: Optional[int]) -> List[Scores]:
        """Prototype scores for every crop from one matrix product over all crops."""
        batch = features[0].shape[0]
        scores = self.prototypes(torch.cat(features), step)  # (V·B, K) or H × (V·B, K_h)
        if isinstance(scores, torch.Tensor):
            return list(scores.split(batch))
        per_head = [s.split(batch) for s in scores]  # H × V × (B, K_h)
        return [list(crop) for crop in zip(*per_head)]  # V × H × (B, K_h)

    @torch.no_grad()
    def _queue_scores(
        self, high_features: List[torch.Tensor], epoch: Optional[int], step: Optional[int]
    ) -> Optional[List[Scores]]:
        """Score every full queue with the current prototypes, then push this step's features.

        The stored rows are scored in slot order, without a copy, before the push overwrites the
        oldest ones (Sinkhorn is equivariant to the order of samples).
        """
        if self.queues is None:
            return None
        use = all(q.is_full for q in self.queues) and (
            self.start_queue_at_epoch == 0 or epoch >= self.start_queue_at_epoch
        )
        scores = [self.prototypes(q.features(ordered=False), step) for q in self.queues] if use else None
        for queue, z in zip(self.queues, high_features):
            queue.push(z)
        return scores
