"""SwAV's projection head and prototypes (Caron et al., 2020, §3.1 and appendix A)."""
import operator
from typing import List, Optional, Sequence, Union

import torch
from torch import nn

__all__ = ["SwaVProjectionHead", "SwaVPrototypes"]


class SwaVProjectionHead(nn.Module):
    """Projection MLP ``z = W₂ ReLU(BN(W₁ h)) + b₂`` from backbone features h (B, input_dim) to codes
    (B, output_dim) of the code space, not normalised (SwaV does that); hidden width ``hidden_dim``.

    >>> SwaVProjectionHead(input_dim=512, hidden_dim=256, output_dim=128)(torch.randn(8, 512)).shape
    torch.Size([8, 128])
    """

    def __init__(self, input_dim: int = 2048, hidden_dim: int = 2048, output_dim: int = 128):
        super().__init__()
        self.input_dim, self.hidden_dim = _int("input_dim", input_dim, 1), _int("hidden_dim", hidden_dim, 1)
        self.output_dim = _int("output_dim", output_dim, 1)
        self.layers = nn.Sequential(  # keys layers.0.*, layers.1.*, layers.3.*: lightly's and fmcib's
            nn.Linear(self.input_dim, self.hidden_dim, bias=False), nn.BatchNorm1d(self.hidden_dim),
            nn.ReLU(), nn.Linear(self.hidden_dim, self.output_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """z = W₂ ReLU(BN(W₁ x)) + b₂: (B, input_dim) → (B, output_dim), not normalised."""
        _check_features(x, self.input_dim, "SwaVProjectionHead", self.layers[0].weight.dtype)
        return self.layers(x)  # (B, D)

    def extra_repr(self) -> str:
        return f"input_dim={self.input_dim}, hidden_dim={self.hidden_dim}, output_dim={self.output_dim}"


class SwaVPrototypes(nn.Module):
    """Prototype scores ``S = Z Cᵀ (+ b)`` of codes Z against K trainable prototypes C (§3.1).

    Z (B, ``input_dim``); ``n_prototypes`` K, or a list for several heads (a list of (B, K_h) out); ``bias`` per
    prototype (lightly ≥ 1.2.31, fmcib). With L2-normalised Z and C (call :meth:`normalize` before each step) the
    scores are cosines. Freezing (appendix A): while ``step < n_steps_frozen_prototypes`` (needed while training)
    the prototypes' ``.grad`` is set to None after backward and DDP's write-back, as in FAIR's loop, so the
    optimizer skips them (a zero gradient would not: momentum, Adam's L2); ``requires_grad`` stays, as DDP needs.

    >>> protos = SwaVPrototypes(128, 3000, n_steps_frozen_prototypes=313)
    >>> protos.normalize()
    >>> protos(torch.randn(8, 128), step=0).shape
    torch.Size([8, 3000])
    """

    def __init__(self, input_dim: int = 128, n_prototypes: Union[int, Sequence[int]] = 3000,
                 n_steps_frozen_prototypes: int = 0, bias: bool = False):
        super().__init__()
        self.input_dim = _int("input_dim", input_dim, 1)
        self.multi_head = isinstance(n_prototypes, (list, tuple))
        if self.multi_head and not n_prototypes:
            raise ValueError(f"n_prototypes must be a positive int or a non-empty list of them, got {n_prototypes!r}")
        name = "every entry of n_prototypes" if self.multi_head else "n_prototypes"
        ks = [_int(name, k, 1) for k in (n_prototypes if self.multi_head else [n_prototypes])]
        self.n_prototypes = ks if self.multi_head else ks[0]
        self.n_steps_frozen_prototypes = _int("n_steps_frozen_prototypes", n_steps_frozen_prototypes, 0)
        self.bias = _flag("bias", bias)
        self.heads = nn.ModuleList([nn.Linear(self.input_dim, k, bias=self.bias) for k in ks])

    def forward(self, x: torch.Tensor, step: Optional[int] = None) -> Union[torch.Tensor, List[torch.Tensor]]:
        """Scores x Cᵀ (+ b): (B, D) → (B, K), or a list over heads; frozen while ``step`` < n (see above)."""
        _check_features(x, self.input_dim, "SwaVPrototypes", self.heads[0].weight.dtype)
        frozen = self._frozen(step)
        scores = [head(x) for head in self.heads]  # [(B, K_h)]
        for s in scores:
            if frozen and s.requires_grad:
                s.register_hook(self._clear_grads_after_backward)
        return scores if self.multi_head else scores[0]

    def _clear_grads_after_backward(self, grad: torch.Tensor) -> None:
        """``.grad`` to None after backward, once per crop (harmless), and after DDP's write-back (see below)."""
        engine = torch.autograd.Variable._execution_engine
        clear = lambda: self.heads.zero_grad(set_to_none=True)  # noqa: E731
        engine.queue_callback(lambda: engine.queue_callback(clear))  # DDP's write-back: a callback from a hook

    @torch.no_grad()
    def normalize(self) -> None:
        """L2-normalise each prototype in place; a unit row (within eps) is untouched, so frozen ones stay bitwise."""
        for head in self.heads:
            w = head.weight  # (K, D)
            norm = torch.linalg.vector_norm(w, dim=1, keepdim=True, dtype=torch.float64)  # (K, 1)
            tol = torch.finfo(w.dtype).eps if w.dtype != torch.float64 else 1e-12
            scale = torch.where((norm - 1).abs() > tol, 1 / norm.clamp_min(1e-12), 1.0)  # (K, 1) 1 for unit rows
            w.copy_(w.double() * scale)

    def extra_repr(self) -> str:
        return (f"input_dim={self.input_dim}, n_prototypes={self.n_prototypes}, "
                f"n_steps_frozen_prototypes={self.n_steps_frozen_prototypes}, bias={self.bias}")

    def _frozen(self, step) -> bool:  # step < n with a gradient: then only is step needed (nothing else to freeze)
        n = self.n_steps_frozen_prototypes
        if n > 0 and step is None and self.training and torch.is_grad_enabled():
            raise ValueError(f"SwaVPrototypes(n_steps_frozen_prototypes={n}) needs forward(x, step=...) "
                             "while training")
        return n > 0 and step is not None and torch.is_grad_enabled() and _int("step", step, 0) < n


# --- argument checks --------------------------------------------------------------------------------

def _int(name: str, value, low: int) -> int:
    """``value`` as an int >= ``low``: an int, NumPy integer or 0-dim integer tensor, not a bool."""
    try:
        if not isinstance(value, bool) and operator.index(value) >= low:
            return operator.index(value)
    except TypeError:
        pass
    kind = {0: "a non-negative int", 1: "a positive int"}.get(low, f"an int >= {low}")
    raise ValueError(f"{name} must be {kind}, got {value!r}")


def _flag(name: str, value) -> bool:
    """True / False or 1 / 0 (also NumPy's, or a 0-dim tensor); a truthy "no" is refused."""
    try:  # NumPy's bool (class bool_, or bool in NumPy 2) has no __index__
        if type(value).__name__ in ("bool", "bool_") or operator.index(value) in (0, 1):
            return bool(value)
    except TypeError:
        pass
    raise ValueError(f"{name} must be a bool, got {value!r}")


def _check_features(x, dim: int, what: str, dtype: torch.dtype) -> None:
    if not isinstance(x, torch.Tensor) or x.ndim != 2 or x.shape[1] != dim:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{what} expects features of shape (B, {dim}), got {shape}")
    autocast = torch.is_autocast_enabled(x.device.type) and x.is_floating_point()  # it casts all but float64
    if x.dtype != dtype and not (autocast and torch.float64 not in (x.dtype, dtype)):
        raise ValueError(f"{what} expects {dtype} features (under autocast: not float64), got {x.dtype}")
