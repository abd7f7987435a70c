"""The pretraining job's parts: synthetic data, folder loading and its errors, batch order, k-NN
against a brute-force vote, the learning-rate schedule."""
import math
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from swav_core.pretrain.data import batch_indices, load_folder
from swav_core.pretrain.errors import UsageError
from swav_core.pretrain.synthetic import CLASSES_2D, CLASSES_3D, synthetic2d, synthetic3d
from swav_core.pretrain.evaluate import knn_top1, linear_top1
from swav_core.pretrain.train import lr_at
from strategies import examples


# --- data -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("make, size, classes", [(synthetic2d, 16, CLASSES_2D), (synthetic3d, 10, CLASSES_3D)])
def test_synthetic_data_is_deterministic_labelled_and_finite(make, size, classes):
    x, y = make(64, size, seed=3)
    x2, y2 = make(64, size, seed=3)
    x3, _ = make(64, size, seed=4)
    d = 2 if make is synthetic2d else 3
    assert x.shape == (64, 1) + (size,) * d and x.dtype == torch.float32 and torch.isfinite(x).all()
    assert torch.equal(x, x2) and torch.equal(y, y2) and not torch.equal(x, x3)
    assert y.min() >= 0 and y.max() < len(classes) and len(y.unique()) == len(classes)


def test_synthetic_classes_are_separable_by_their_class_means():
    """Sanity of the class structure: a nearest-class-mean classifier on raw pixels beats chance."""
    x, y = synthetic2d(2048, 16, seed=0)
    xt, yt = synthetic2d(512, 16, seed=1)
    means = torch.stack([x[y == c].flatten(1).mean(0) for c in range(len(CLASSES_2D))])
    accuracy = (torch.cdist(xt.flatten(1), means).argmin(1) == yt).float().mean()
    assert accuracy > 2.0 / len(CLASSES_2D)


def test_folder_of_pt_and_npy_files(tmp_path):
    np = pytest.importorskip("numpy")
    samples = torch.randn(3, 2, 5, 6)
    torch.save(samples[0], tmp_path / "a.pt")
    np.save(tmp_path / "b.npy", samples[1].numpy())
    torch.save(samples[2].double(), tmp_path / "c.pt")
    (tmp_path / "notes.txt").write_text("ignored")
    assert torch.equal(load_folder(str(tmp_path)), samples)


def test_folder_errors_name_the_path_and_shapes(tmp_path):
    with pytest.raises(UsageError, match="nowhere"):
        load_folder(str(tmp_path / "nowhere"))
    with pytest.raises(UsageError, match="no .pt, .npy, .png or .jpg files"):
        load_folder(str(tmp_path))
    torch.save(torch.zeros(1, 4, 4), tmp_path / "a.pt")
    torch.save(torch.zeros(1, 4, 5), tmp_path / "b.pt")
    with pytest.raises(ValueError, match=r"a.pt is \(1, 4, 4\) but b.pt is \(1, 4, 5\)"):
        load_folder(str(tmp_path))
    os.remove(tmp_path / "b.pt")
    torch.save(torch.zeros(4, 4), tmp_path / "c.pt")
    with pytest.raises(ValueError, match=r"c.pt has shape \(4, 4\)"):
        load_folder(str(tmp_path))
    os.remove(tmp_path / "c.pt")
    torch.save({"x": torch.zeros(1, 4, 4)}, tmp_path / "d.pt")
    with pytest.raises(ValueError, match="d.pt holds a dict"):
        load_folder(str(tmp_path))


@settings(max_examples=examples(30))
@given(n=st.integers(1, 40), batch=st.integers(1, 12), world=st.integers(1, 3), seed=st.integers(0, 99))
def test_batch_order_visits_every_sample_once_per_epoch(n, batch, world, seed):
    """Concatenating the global batches (rank 0's part, then rank 1's, …) gives, epoch by epoch, a
    permutation of the dataset; the order is a pure function of (seed, step, rank)."""
    epochs = 3
    steps = math.ceil(epochs * n / (batch * world))
    stream = torch.cat([batch_indices(t, batch, n, seed, r, world) for t in range(steps) for r in range(world)])
    for e in range(epochs):
        assert sorted(stream[e * n:(e + 1) * n].tolist()) == list(range(n))
    assert torch.equal(batch_indices(steps - 1, batch, n, seed, world - 1, world), stream[-batch:])


# --- k-NN and schedule ----------------------------------------------------------------------------

def _knn_oracle(train_z, train_y, test_z, test_y, k, t):
    correct = 0
    for z, y in zip(test_z.double(), test_y.tolist()):
        sims = [(float(z @ b), int(c)) for b, c in zip(train_z.double(), train_y)]
        votes = {}
        for s, c in sorted(sims, reverse=True)[:k]:
            votes[c] = votes.get(c, 0.0) + math.exp(s / t)
        correct += max(votes, key=votes.get) == y
    return correct / len(test_y)


@settings(max_examples=examples(15))
@given(n=st.integers(5, 40), m=st.integers(1, 20), k=st.integers(1, 5), seed=st.integers(0, 99))
def test_knn_matches_a_brute_force_weighted_vote(n, m, k, seed):
    g = torch.Generator().manual_seed(seed)
    bank = torch.nn.functional.normalize(torch.randn(n, 6, generator=g), dim=1)
    queries = torch.nn.functional.normalize(torch.randn(m, 6, generator=g), dim=1)
    yb, yq = torch.randint(3, (n,), generator=g), torch.randint(3, (m,), generator=g)
    assert knn_top1(bank, yb, queries, yq, k=k) == pytest.approx(_knn_oracle(bank, yb, queries, yq, k, 0.07))
    with pytest.raises(ValueError, match="k must be in"):
        knn_top1(bank, yb, queries, yq, k=n + 1)


def _lr_uncapped(step, steps, base, warmup):  # the schedule before warm-up was capped at steps // 2
    if step < warmup:
        return base * (step + 1) / warmup
    return base * 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def test_learning_rate_warms_up_linearly_then_decays_by_cosine():
    lrs = [lr_at(s, 100, 0.5, 10) for s in range(100)]
    assert lrs[:10] == pytest.approx([0.05 * (s + 1) for s in range(10)])
    assert lrs[10] == 0.5 and all(a > b for a, b in zip(lrs[10:], lrs[11:])) and 0 < lrs[-1] < 1e-3
    assert lr_at(55, 100, 0.5, 10) == pytest.approx(0.25)


@given(steps=st.integers(1, 200), warmup=st.integers(0, 60))
def test_warm_up_is_capped_at_half_the_schedule(steps, warmup):
    """Runs of at least 2 × warm-up steps keep the exact schedule (the default 1000/20 included);
    shorter ones warm up for steps // 2 and still decay: the lr peaks once, then never rises."""
    lrs = [lr_at(s, steps, 1.0, warmup) for s in range(steps)]
    if steps >= 2 * warmup:
        assert lrs == [_lr_uncapped(s, steps, 1.0, warmup) for s in range(steps)]
    peak = lrs.index(max(lrs))
    assert peak <= steps // 2 and max(lrs) == 1.0
    assert all(a <= b for a, b in zip(lrs[:peak], lrs[1:peak + 1]))
    assert all(a >= b for a, b in zip(lrs[peak:], lrs[peak + 1:]))
    if steps >= 3 and warmup >= 1:
        assert lrs[-1] < 1.0


def test_a_run_shorter_than_its_warm_up_ends_decayed():
    """The README's torchrun example: --steps 20 with the default 20 warm-up steps used to end at the peak."""
    lrs = [lr_at(s, 20, 2e-3, 20) for s in range(20)]
    assert lrs[9] == 2e-3 and lrs[-1] < 0.05 * 2e-3


def test_linear_probe_separates_separable_classes_and_is_chance_on_noise():
    """Two Gaussian blobs far apart: the probe classifies every held-out sample; labels drawn independently
    of the features: about chance (the fit cannot see the held-out labels)."""
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 2, (200,), generator=g)
    z = torch.randn(200, 8, generator=g) * 0.3 + (y[:, None] * 2.0 - 1.0)
    assert linear_top1(z[:100], y[:100], z[100:], y[100:]) == 1.0
    noise = torch.randint(0, 2, (200,), generator=g)
    assert 0.3 <= linear_top1(z[:100], noise[:100], z[100:], noise[100:]) <= 0.7
