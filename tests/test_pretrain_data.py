"""The job's own data: a folder read lazily gives the batches of the in-memory path, in the same
order; integer samples are scaled to [0, 1] by their type's range or refused; resume stays bitwise."""
import json

import pytest
import torch

from swav_core.pretrain import build_parser, main
from swav_core.pretrain.data import FolderDataset, Order, batch_indices, batches, load_folder
from swav_core.pretrain.errors import UsageError

from test_pretrain import TINY, _assert_states_equal, _ckpt, _job
from test_pretrain_inputs import _refused


def _write_folder(path, samples, suffix=".pt"):
    path.mkdir()
    for i, x in enumerate(samples):
        torch.save(x.clone(), path / f"{i:04d}{suffix}")
    return str(path)


@pytest.mark.parametrize("workers", [0, 2])
def test_lazy_loader_gives_the_in_memory_batches_in_the_same_order(device, tmp_path, workers):
    """23 files (not a multiple of B·W), 2 ranks, 9 steps from step 3 (a resume): the DataLoader over
    the files yields, step by step, exactly ``stacked[batch_indices(step, ...)]``."""
    samples = torch.randn(23, 2, 5, 6)
    lazy = FolderDataset(_write_folder(tmp_path / "data", samples))
    stacked = load_folder(str(tmp_path / "data"))
    assert lazy.shape == (23, 2, 5, 6) and len(lazy) == 23 and torch.equal(stacked, samples)
    for rank in (0, 1):
        got = list(batches(lazy, Order(4, 7, rank, 2), range(3, 12), workers=workers, pin_memory=device == "cuda"))
        memory = list(batches(stacked, Order(4, 7, rank, 2), range(3, 12)))
        assert len(got) == len(memory) == 9
        for step, a, b in zip(range(3, 12), got, memory):
            assert torch.equal(a.to(device).cpu(), b)
            assert torch.equal(b, samples[batch_indices(step, 4, 23, 7, rank, 2)])


def test_integer_samples_are_scaled_to_unit_range_by_their_type(tmp_path):
    """uint8 / 255, uint16 / 65535, bool as 0/1: every value maps into [0, 1], the type's extremes to
    exactly 0 and 1, and the stored integers come back by multiplying (no value lost or clipped)."""
    u8 = torch.arange(256, dtype=torch.uint8).reshape(1, 16, 16)
    u16 = torch.tensor([0, 1, 1000, 32768, 65534, 65535] * 6, dtype=torch.uint16).reshape(1, 6, 6)
    flags = torch.rand(1, 4, 4) > 0.5
    for name, x, top in (("u8", u8, 255), ("u16", u16, 65535), ("bool", flags, 1)):
        y = FolderDataset(_write_folder(tmp_path / name, [x]))[0]
        assert y.dtype == torch.float32 and y.min() >= 0 and y.max() <= 1
        assert torch.equal((y.double() * top).round().long(), x.long())
    assert FolderDataset(str(tmp_path / "u8"))[0].flatten()[[0, 255]].tolist() == [0.0, 1.0]
    half = torch.randn(1, 3, 3, dtype=torch.float16)
    assert torch.equal(FolderDataset(_write_folder(tmp_path / "f16", [half]))[0], half.float())  # floats as they are


@pytest.mark.parametrize("dtype", [torch.int16, torch.int32, torch.int8])
def test_signed_integer_samples_are_refused_before_anything_runs(tmp_path, capsys, dtype):
    """CT in HU (int16) has no fixed unit range: the job says so, naming the file, before training."""
    folder = _write_folder(tmp_path / "data", [torch.zeros(1, 8, 8)] * 3 + [torch.full((1, 8, 8), -100, dtype=dtype)])
    message = _refused(capsys, "--out", str(tmp_path / "out"), *TINY, "--data", folder, "--steps", "2")
    assert message.startswith(f"--data: {folder}/0003.pt holds {str(dtype)[6:]} values; expected float, uint8")
    assert "CT in HU" in message and not (tmp_path / "out").exists()
    with pytest.raises(UsageError, match="0003.pt holds"):
        FolderDataset(folder)


def test_npy_folders_are_read_lazily_and_scaled_too(tmp_path):
    np = pytest.importorskip("numpy")
    (tmp_path / "data").mkdir()
    samples = (torch.rand(5, 1, 4, 4) * 255).to(torch.uint8)
    for i, x in enumerate(samples):
        np.save(tmp_path / "data" / f"{i}.npy", x.numpy())
    dataset = FolderDataset(str(tmp_path / "data"))
    assert dataset.shape == (5, 1, 4, 4) and torch.equal(load_folder(str(tmp_path / "data")), samples.float() / 255)


def test_folder_run_with_workers_resumes_bitwise(tmp_path):
    """uint8 files read by 2 worker processes, 12 steps straight == 5 steps in the main process, then a
    one-flag resume with 2 workers: the batches do not depend on who reads them."""
    samples = (torch.rand(40, 1, 12, 12) * 255).to(torch.uint8)
    folder = _write_folder(tmp_path / "data", samples)
    args = ["--data", folder, "--steps", "12", "--high-size", "12", "--low-size", "6"]
    assert _job(tmp_path / "straight", *args, "--workers", "2") == 0
    assert _job(tmp_path / "resumed", *args, "--stop-at", "5") == 0
    assert main(["--out", str(tmp_path / "resumed"), "--resume", "--workers", "2"]) == 0
    a, b = _ckpt(tmp_path / "straight"), _ckpt(tmp_path / "resumed")
    _assert_states_equal(a["model"], b["model"])
    metrics = json.loads((tmp_path / "resumed" / "metrics.json").read_text())
    assert metrics["config"]["data"] == folder and metrics["n_train"] == 40


def test_help_says_what_input_range_the_augmentations_assume():
    text = " ".join(build_parser().format_help().split())
    assert "Input range: the crops' intensity jitter assumes values on a unit scale, about [0, 1]" in text
    assert "uint8/uint16 files and PNG/JPEG images are divided by 255/65535" in text and "signed integers (CT in HU)" in text
