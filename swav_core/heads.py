"""SwAV's projection head and prototypes (Caron et al., 2020, §3.1 and appendix A)."""
from typing import List, Optional, Sequence, Union

import torch
from torch import nn

from ._checks import _flag, _int_at_least, _positive_int

__all__ = ["SwaVProjectionHead", "SwaVPrototypes"]

_NORM_EPS = 1e-12


def _check_features(x: torch.Tensor, dim: int, what: str) -> None:
    if not isinstance(x, torch.Tensor) or x.ndim != 2 or x.shape[1] != dim:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{what} expects features of shape (B, {dim}), got {shape}")


class SwaVProjectionHead(nn.Module):
    """Projection MLP ``z = W₂ ReLU(BN(W₁ h)) + b₂`` from backbone features h to the code space.

    Linear (no bias) → BatchNorm1d → ReLU → Linear (with bias), as in the paper's ResNet-50 set-up.
    The output is not normalised; SwaV L2-normalises it before scoring against the prototypes.
    The layers sit in ``self.layers`` so the state_dict keys (``layers.0.weight``, ``layers.1.*``,
    ``layers.3.*``) are those of lightly / fmcib checkpoints.

    Args:
        input_dim: backbone feature dim. Default: 2048
        hidden_dim: hidden width. Default: 2048
        output_dim: code dim D. Default: 128

    Shape:
        x: (B, input_dim) → (B, output_dim)

    Example:
        >>> head = SwaVProjectionHead(512, 256, 128)
        >>> head(torch.randn(8, 512)).shape
        torch.Size([8, 128])
    """

    def __init__(self, input_dim: int = 2048, hidden_dim: int = 2048, output_dim: int = 128):
        super().__init__()
        self.input_dim = _positive_int("input_dim", input_dim)
        self.hidden_dim = _positive_int("hidden_dim", hidden_dim)
        self.output_dim = _positive_int("output_dim", output_dim)
        self.layers = nn.Sequential(
            nn.Linear(input_dim, hidden_dim, bias=False),
            nn.BatchNorm1d(hidden_dim),
            nn.ReLU(),
            nn.Linear(hidden_dim, output_dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_features(x, self.input_dim, "SwaVProjectionHead")
        return self.layers(x)  # (B, D)

    def extra_repr(self) -> str:
        return f"input_dim={self.input_dim}, hidden_dim={self.hidden_dim}, output_dim={self.output_dim}"


class SwaVPrototypes(nn.Module):
    """Prototype scores ``S = Z Cᵀ (+ b)`` of codes Z against K trainable prototypes C (§3.1).

    With L2-normalised Z and C (call :meth:`normalize` before each step) the scores are cosine
    similarities. ``n_prototypes`` may be a list: one head per entry, and ``forward`` returns a list.

    Freezing (appendix A, "freeze the prototypes during the first epoch"): with gradients enabled
    and ``step < n_steps_frozen_prototypes`` (in train or eval mode; in train mode ``step`` is
    required, in eval mode a forward without it freezes nothing), the forward computes as usual, so
    gradients reach the input features and every prototype receives a gradient (DistributedDataParallel
    with ``find_unused_parameters=False`` needs that), and a hook on the scores queues an autograd
    final callback that sets the prototypes' ``.grad`` to None once backward, DDP's gradient
    all-reduce included, has finished. The optimizer then skips them: no update, no momentum, no weight
    decay (a zero gradient would not do: Adam's L2 term and SGD's momentum still move them). This is
    what FAIR's training loop does (it clears the prototype grads after ``backward``); fmcib passed the
    epoch where lightly expected a step. ``requires_grad`` is never toggled, so a module frozen from
    outside stays frozen.

    Args:
        input_dim: code dim D. Default: 128
        n_prototypes: K, or a list of K's for several heads. Default: 3000
        n_steps_frozen_prototypes: optimizer steps during which the prototypes stay fixed. Default: 0
        bias: add a per-prototype bias (lightly ≥ 1.2.31 and fmcib use one; the paper does not).
            Default: False

    Shape:
        x: (B, D) → (B, K), or a list of (B, K_h) when ``n_prototypes`` is a list.

    Example:
        >>> protos = SwaVPrototypes(128, 3000, n_steps_frozen_prototypes=313)
        >>> protos.normalize()
        >>> protos(torch.randn(8, 128), step=0).shape
        torch.Size([8, 3000])
    """

    def __init__(
        self,
        input_dim: int = 128,
        n_prototypes: Union[int, Sequence[int]] = 3000,
        n_steps_frozen_prototypes: int = 0,
        bias: bool = False,
    ):
        super().__init__()
        self.input_dim = _positive_int("input_dim", input_dim)
        self.multi_head = isinstance(n_prototypes, (list, tuple))
        if self.multi_head:
            if len(n_prototypes) == 0:
                raise ValueError(
                    f"n_prototypes must be a positive int or a non-empty list of them, got {n_prototypes!r}"
                )
            ks = [_positive_int("every entry of n_prototypes", k) for k in n_prototypes]
        else:
            ks = [_positive_int("n_prototypes", n_prototypes)]
        self.n_prototypes = list(ks) if self.multi_head else ks[0]
        self.n_steps_frozen_prototypes = _int_at_least(
            "n_steps_frozen_prototypes", n_steps_frozen_prototypes, 0
        )
        self.bias = _flag("bias", bias)
        self.heads = nn.ModuleList([nn.Linear(self.input_dim, k, bias=self.bias) for k in ks])
        self._clear_pending = False  # a grad-clearing callback is queued for the running backward

    def forward(
        self, x: torch.Tensor, step: Optional[int] = None
    ) -> Union[torch.Tensor, List[torch.Tensor]]:
        _check_features(x, self.input_dim, "SwaVPrototypes")
        frozen = self._frozen(step)
        scores = [head(x) for head in self.heads]  # [(B, K_h)]
        if frozen:
            # A forward while a callback is pending means the previous backward was aborted (or this
            # is a recomputation inside backward): queue afresh; clearing twice is harmless.
            self._clear_pending = False
            for s in scores:
                if s.requires_grad:
                    s.register_hook(self._queue_grad_clearing)
        return scores if self.multi_head else scores[0]

    def _frozen(self, step) -> bool:
        n = self.n_steps_frozen_prototypes
        if n == 0 or not torch.is_grad_enabled():
            return False
        if step is None:
            if self._needs_step():
                raise ValueError(
                    f"SwaVPrototypes(n_steps_frozen_prototypes={n}) needs forward(x, step=...) while training"
                )
            return False
        return _int_at_least("step", step, 0) < n

    def _needs_step(self) -> bool:
        """Whether a forward now must be told the step: freezing is on, training, gradients enabled."""
        return self.n_steps_frozen_prototypes > 0 and self.training and torch.is_grad_enabled()

    def _queue_grad_clearing(self, grad: torch.Tensor) -> None:
        if not self._clear_pending:
            self._clear_pending = True
            engine = torch.autograd.Variable._execution_engine
            # DDP's reducer queues the callback that writes the all-reduced grads into ``.grad`` only
            # when its last bucket is ready, after this hook; the engine runs callbacks queued by
            # callbacks, so queueing from a callback puts the clearing after DDP's write-back.
            engine.queue_callback(lambda: engine.queue_callback(self._clear_grads))

    def _clear_grads(self) -> None:
        self._clear_pending = False
        for p in self.heads.parameters():
            p.grad = None

    @torch.no_grad()
    def normalize(self) -> None:
        """L2-normalise every prototype (each row of each head's weight) in place.

        Norms are taken in float64; rows already at unit norm within the weight dtype's rounding
        are left untouched, which makes the call exactly idempotent (frozen prototypes stay
        bit-identical although SwaV normalises them every step). A zero row stays zero.
        """
        for head in self.heads:
            w = head.weight  # (K, D)
            norm = torch.linalg.vector_norm(w, dim=1, keepdim=True, dtype=torch.float64)  # (K, 1)
            tol = torch.finfo(w.dtype).eps if w.dtype != torch.float64 else 1e-12
            scale = torch.where((norm - 1).abs() > tol, 1 / norm.clamp_min(_NORM_EPS), 1.0)  # (K, 1)
            w.copy_(w.double() * scale)

    def extra_repr(self) -> str:
        return (
            f"input_dim={self.input_dim}, n_prototypes={self.n_prototypes}, "
            f"n_steps_frozen_prototypes={self.n_steps_frozen_prototypes}, bias={self.bias}"
        )
