"""Hypothesis builders shared by the test files. Every bound is keyword-only; append new builders below."""
from hypothesis import strategies as st

__all__ = ["push_sequences", "optimizer_configs", "prototype_configs"]


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
