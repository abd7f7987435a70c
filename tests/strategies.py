"""Hypothesis builders shared by the test files. Every bound is keyword-only; append new builders below."""
from hypothesis import settings
from hypothesis import strategies as st

__all__ = [
    "examples", "push_sequences", "optimizer_configs", "prototype_configs",
    "multicrop_configs", "score_matrices", "swav_crop_configs",
]


def examples(n: int) -> int:
    """The example budget ``n`` of one test, sized for conftest.py's "ci" profile, scaled by the loaded
    profile's default budget over ci's (×1 in "ci" and "dev", ×13 in "deep"); call it in ``@settings``."""
    return max(1, round(n * settings.default.max_examples / settings.get_profile("ci").max_examples))


@st.composite
def push_sequences(draw, *, max_length=12, max_dim=4, max_pushes=8, min_batch=0, max_batch=None):
    """``(length, D, batch_sizes)`` for a queue of ``length`` rows of dim D.

    Batch sizes range up to ``max_batch`` (default ``2 * length + 1``), so they include sizes larger
    than the queue and sizes that do not divide its length.
    """
    length = draw(st.integers(1, max_length))
    dim = draw(st.integers(1, max_dim))
    top = 2 * length + 1 if max_batch is None else max_batch
    sizes = draw(st.lists(st.integers(min_batch, top), min_size=1, max_size=max_pushes))
    return length, dim, sizes


@st.composite
def optimizer_configs(draw, *, names=("sgd", "adam", "adamw", "lars"), min_weight_decay=1e-3):
    """``(name, hyper-parameters)`` for one of SGD (momentum), Adam (L2), AdamW or a LARS-style step.

    Weight decay is at least ``min_weight_decay`` so a prototype the optimizer sees always moves.
    """
    name = draw(st.sampled_from(names))
    lr = draw(st.floats(1e-3, 0.5))
    wd = draw(st.floats(min_weight_decay, 0.1))
    if name == "sgd":
        return name, dict(lr=lr, momentum=draw(st.floats(0.0, 0.95)), weight_decay=wd)
    if name in ("adam", "adamw"):
        betas = (draw(st.floats(0.5, 0.95)), draw(st.floats(0.9, 0.999)))
        return name, dict(lr=lr, betas=betas, weight_decay=wd)
    return name, dict(lr=lr, weight_decay=wd, trust=draw(st.floats(1e-3, 0.1)))


@st.composite
def prototype_configs(draw, *, max_dim=8, max_prototypes=10, max_heads=3, max_frozen=4):
    """``(D, n_prototypes, n_steps_frozen_prototypes, bias)``; ``n_prototypes`` an int or a list."""
    dim = draw(st.integers(1, max_dim))
    ks = st.integers(1, max_prototypes)
    n_prototypes = draw(ks | st.lists(ks, min_size=1, max_size=max_heads))
    return dim, n_prototypes, draw(st.integers(0, max_frozen)), draw(st.booleans())


@st.composite
def multicrop_configs(draw, *, dims=(2, 3), max_batch=3, max_channels=3, max_size_2d=20, max_size_3d=10):
    """``(input shape (B, C, *spatial), MultiCrop kwargs)``: sizes as ints or tuples, random crop
    counts (at least 2 crops), scale ranges ``0 < lo <= hi <= 1``, flips and intensity jitter."""
    d = draw(st.sampled_from(dims))
    top = max_size_2d if d == 2 else max_size_3d
    spatial = tuple(draw(st.integers(2, top)) for _ in range(d))
    size = st.integers(1, top) | st.tuples(*[st.integers(1, top)] * d)
    n_high = draw(st.integers(1, 3))

    def scale():
        lo = draw(st.floats(0.01, 1.0))
        return lo, draw(st.floats(lo, 1.0))

    cfg = dict(high_size=draw(size), low_size=draw(size), n_high=n_high,
               n_low=draw(st.integers(1 if n_high == 1 else 0, 3)), high_scale=scale(), low_scale=scale(),
               flip=draw(st.booleans()), intensity=draw(st.sampled_from([0.0, 0.1, 0.5])))
    return (draw(st.integers(1, max_batch)), draw(st.integers(1, max_channels))) + spatial, cfg


@st.composite
def score_matrices(draw, *, max_batch=24, max_prototypes=24, max_abs=1.0, outliers=True):
    """A (B, K) float32 CPU score matrix in [-max_abs, max_abs] on a grid of max_abs / 1024.

    With ``max_abs`` a power of two every score, and every score plus a small integer, is exact in
    float32. With ``outliers`` one prototype and/or one sample may be pushed below the rest by up to
    2 * max_abs (a prototype or a sample far from everything: the underflow cases).
    """
    import torch  # local import: this module stays importable without torch for other builders

    batch, prototypes = draw(st.integers(1, max_batch)), draw(st.integers(1, max_prototypes))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**32 - 1)))
    steps = 1024
    scores = torch.randint(-steps, steps + 1, (batch, prototypes), generator=g).float() * (max_abs / steps)
    if outliers and draw(st.booleans()):
        scores[:, draw(st.integers(0, prototypes - 1))] -= draw(st.sampled_from([0.5, 1.0, 2.0])) * max_abs
    if outliers and draw(st.booleans()):
        scores[draw(st.integers(0, batch - 1))] -= draw(st.sampled_from([0.5, 1.0, 2.0])) * max_abs
    return scores


@st.composite
def swav_crop_configs(draw, *, max_high=3, max_low=4, max_batch=8, max_prototypes=16, max_queue=24):
    """``(n_high, n_low, B, K, queue_sizes, seed)`` for SwaVLoss: at least 2 crops and 1 high-res;
    ``queue_sizes`` is None or one queue length (0 allowed) per high-resolution crop."""
    n_high = draw(st.integers(1, max_high))
    n_low = draw(st.integers(1 if n_high == 1 else 0, max_low))
    queue = draw(st.none() | st.lists(st.integers(0, max_queue), min_size=n_high, max_size=n_high))
    return (n_high, n_low, draw(st.integers(1, max_batch)), draw(st.integers(1, max_prototypes)), queue,
            draw(st.integers(0, 2**32 - 1)))
