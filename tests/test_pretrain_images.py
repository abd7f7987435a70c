"""A researcher's own data and network: PNG/JPEG folders (flat or one subfolder per class, read lazily, labels
for the evaluation only, a stratified reproducible held-out split) and ``--backbone MODULE:CALLABLE``."""
import json
import sys

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import backbones
from swav_core.pretrain.data import HELD_OUT, FolderDataset, held_out_split, load_data

from test_pretrain import TINY, _assert_states_equal, _ckpt, _job
from test_pretrain_inputs import _refused

Image = pytest.importorskip("PIL.Image")  # the test extra installs Pillow: CI runs these


def _image(path, array, mode=None):
    """Save (H, W) or (H, W, C) uint8 ``array`` as an image at ``path`` (the suffix picks PNG or JPEG)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array.numpy(), mode).save(path)


def _classes(root, n_per_class=(7, 5, 4), size=16):
    """One subfolder per class: dark discs, bright squares, colour noise; PNG and JPEG mixed."""
    g = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    for c, n in enumerate(n_per_class):
        for i in range(n):
            if c == 2:
                pixels = torch.randint(0, 256, (size, size, 3), generator=g, dtype=torch.uint8)
            else:
                r = int(torch.randint(3, 6, (1,), generator=g))
                inside = ((xx - 8) ** 2 + (yy - 8) ** 2 < r * r) if c == 0 else ((xx - 8).abs().maximum((yy - 8).abs()) < r)
                pixels = (inside * (90 if c == 0 else 230) + torch.randint(0, 20, (size, size), generator=g)).to(torch.uint8)
            _image(root / f"class{c}" / f"{i:02d}.{'png' if i % 2 else 'jpg'}", pixels)
    return root


def test_png_images_read_exactly_as_unit_floats_gray_colour_and_alpha(tmp_path, device):
    """8-bit PNGs come back as value / 255 exactly: grayscale as C = 1, RGB as C = 3, RGBA without its alpha;
    a folder mixing grayscale and colour reads all as colour (the gray value in each channel)."""
    g = torch.Generator().manual_seed(1)
    gray = torch.randint(0, 256, (9, 11), generator=g, dtype=torch.uint8)
    rgba = torch.randint(0, 256, (9, 11, 4), generator=g, dtype=torch.uint8)
    _image(tmp_path / "gray" / "a.png", gray)
    assert torch.equal(FolderDataset(str(tmp_path / "gray"))[0].to(device), (gray.float() / 255)[None].to(device))
    _image(tmp_path / "rgba" / "a.png", rgba, "RGBA")
    expected = rgba[..., :3].permute(2, 0, 1).float() / 255
    assert torch.equal(FolderDataset(str(tmp_path / "rgba"))[0].to(device), expected.to(device))
    _image(tmp_path / "mixed" / "a.png", gray)
    _image(tmp_path / "mixed" / "b.png", rgba, "RGBA")
    mixed = FolderDataset(str(tmp_path / "mixed"))
    assert mixed.shape == (2, 3, 9, 11) and torch.equal(mixed[0], (gray.float() / 255).expand(3, 9, 11))
    assert torch.equal(mixed[1], expected)
    _image(tmp_path / "jpeg" / "a.JPG", gray)  # lossy: close to the values, and on the unit scale
    x = FolderDataset(str(tmp_path / "jpeg"))[0]
    assert x.shape == (1, 9, 11) and (x - gray.float() / 255).abs().mean() < 0.05 and 0 <= x.min() <= x.max() <= 1


@given(st.lists(st.integers(1, 40), min_size=1, max_size=6))
def test_held_out_split_is_stratified_disjoint_and_reproducible(device, counts):
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate(counts)])[torch.randperm(sum(counts))].to(device)
    train, test = held_out_split(labels)
    assert train.device == test.device == labels.device
    assert sorted(train.tolist() + test.tolist()) == list(range(len(labels)))  # disjoint, every sample once
    for c, n in enumerate(counts):
        assert int((labels[test] == c).sum()) == min(max(round(HELD_OUT * n), 1), n - 1)
    torch.manual_seed(123)  # the global RNG plays no part
    again = held_out_split(labels)
    assert torch.equal(again[0], train) and torch.equal(again[1], test)


def test_class_subfolders_give_labels_and_a_held_out_set_pretraining_never_sees(tmp_path, device, capsys):
    root = _classes(tmp_path / "train")
    data = load_data(str(root), seed=0)
    assert data.train.shape == (13, 3, 16, 16) and data.test.shape == (3, 3, 16, 16)  # colour: one class is
    assert data.train.classes == ["class0", "class1", "class2"] and data.test_labels.tolist() == [0, 1, 2]
    assert data.train_labels.bincount().tolist() == [6, 4, 3]  # 7, 5, 4 files: one of each class held out
    assert not set(data.train.files) & set(data.test.files)
    other = load_data(str(root), seed=5)  # the split does not move with --seed
    assert other.test.files == data.test.files and torch.equal(other.train_labels, data.train_labels)
    assert _job(tmp_path / "run", "--data", str(root), "--steps", "6", "--device", device, "--knn-k", "3") == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["knn_test_samples"] == 3 and metrics["n_train"] == 13
    for key in ("knn_top1", "knn_top1_random_init", "linear_top1", "linear_top1_random_init"):
        assert 0 <= metrics[key] <= 1, key
    assert "k-NN top-1 (k=3, 3 held-out samples)" in capsys.readouterr().out
    flat = tmp_path / "flat"  # the same images in one folder: no labels, no evaluation
    for i, f in enumerate(sorted(root.rglob("*.*"))):
        (flat / f"{i:02d}{f.suffix}").parent.mkdir(exist_ok=True)
        (flat / f"{i:02d}{f.suffix}").write_bytes(f.read_bytes())
    assert _job(tmp_path / "flat_run", "--data", str(flat), "--steps", "4", "--device", device) == 0
    assert json.loads((tmp_path / "flat_run" / "metrics.json").read_text())["knn_top1"] is None


def test_image_folders_that_cannot_be_read_as_one_are_refused_in_one_line(tmp_path, capsys, monkeypatch):
    gray = torch.zeros(16, 16, dtype=torch.uint8)
    _image(tmp_path / "sizes" / "a.png", gray)
    _image(tmp_path / "sizes" / "b.png", torch.zeros(16, 20, dtype=torch.uint8))
    run = ["--out", str(tmp_path / "out"), *TINY, "--steps", "2", "--data"]
    assert _refused(capsys, *run, str(tmp_path / "sizes")) == (
        f"--data {str(tmp_path / 'sizes')!r}: files have different shapes: a.png is (1, 16, 16) but b.png is "
        f"(1, 16, 20); expected one shape (resize images to one size first)")
    _image(tmp_path / "both" / "a.png", gray)
    _image(tmp_path / "both" / "cat" / "b.png", gray)
    _image(tmp_path / "both" / "dog" / "c.png", gray)
    assert "holds sample files both at its top (1, e.g. a.png) and in subfolders (e.g. cat/b.png)" in _refused(
        capsys, *run, str(tmp_path / "both"))
    _image(tmp_path / "deep" / "a.png", torch.zeros(16, 16, dtype=torch.uint16))  # 16-bit: not 8-bit
    assert _refused(capsys, *run, str(tmp_path / "deep")) == (
        f"--data: {tmp_path / 'deep' / 'a.png'} is a I;16 image; expected an 8-bit grayscale or colour PNG/JPEG "
        f"(save other images as .npy or .pt)")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "a.png").write_bytes(b"\x89PNG not really")
    assert "cannot read" in _refused(capsys, *run, str(tmp_path / "broken"))
    monkeypatch.setitem(sys.modules, "PIL.Image", None)  # Pillow not installed
    monkeypatch.setitem(sys.modules, "PIL", None)
    assert _refused(capsys, *run, str(tmp_path / "sizes")) == (
        f"--data: reading {tmp_path / 'sizes' / 'a.png'} needs Pillow: pip install -e \".[images]\"")


def _without_widths():
    i = TINY.index("--widths")
    return TINY[:i] + TINY[i + 2:]


def test_a_user_backbone_trains_saves_strictly_and_resumes_bitwise(tmp_path, device):
    """``--backbone backbones:tiny`` (tests/backbones.py): F = 12 found by the dry run; backbone.pt loads with
    strict=True into the user's own module; a run stopped and resumed without repeating --backbone (the
    checkpoint names it) ends bitwise equal to a straight one."""
    args = ["--backbone", "backbones:tiny", "--steps", "8", "--device", device]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    main = __import__("swav_core.pretrain", fromlist=["main"]).main
    assert main(["--out", str(straight), *_without_widths(), *args]) == 0
    assert main(["--out", str(resumed), *_without_widths(), *args, "--stop-at", "5"]) == 0
    assert main(["--out", str(resumed), "--resume"]) == 0
    _assert_states_equal(_ckpt(straight)["model"], _ckpt(resumed)["model"])
    net = backbones.tiny(in_channels=1)
    net.load_state_dict(torch.load(straight / "backbone.pt", weights_only=True), strict=True)
    assert _ckpt(straight)["model"]["projection_head.layers.0.weight"].shape[1] == 12
    assert json.loads((straight / "metrics.json").read_text())["backbone"] == {"callable": "backbones:tiny",
                                                                              "in_channels": 1}
    gray = tmp_path / "gray"  # a class without in_channels is called with no argument
    assert main(["--out", str(gray), *_without_widths(), "--backbone", "backbones:Gray", "--steps", "2"]) == 0


@pytest.mark.parametrize("spec, message", [
    ("backbones", "--backbone 'backbones': expected MODULE:CALLABLE, e.g. mynets:resnet18"),
    ("no_such_module:net", "--backbone no_such_module:net: cannot import no_such_module (ModuleNotFoundError: No "
                           "module named 'no_such_module'); run from the folder holding no_such_module.py"),
    ("backbones:nope", "--backbone backbones:nope: backbones has no nope"),
    ("backbones:NUMBER", "--backbone backbones:NUMBER: NUMBER is a int, expected a function or class"),
    ("backbones:raises", "--backbone backbones:raises: calling it raised RuntimeError: no weights file found"),
    ("backbones:not_a_module", "--backbone backbones:not_a_module returned a Tensor; expected a torch.nn.Module"),
    ("backbones:unpooled", "--backbone backbones:unpooled maps a batch (2, 1, 16, 16) to (2, 4, 14, 14); expected "
                           "float features (2, F): pool and flatten them in the network"),
    ("backbones:by_size", "--backbone backbones:by_size gives features of sizes [64, 256] for the crop sizes "
                          "[(1, 16, 16), (1, 8, 8)]; expected one F for all"),
])
def test_a_bad_backbone_is_one_error_line(tmp_path, capsys, spec, message):
    assert _refused(capsys, "--out", str(tmp_path), *_without_widths(), "--steps", "2",
                    "--backbone", spec).startswith(message)


def test_widths_with_a_user_backbone_is_refused(tmp_path, capsys):
    assert _refused(capsys, "--out", str(tmp_path), *TINY, "--backbone", "backbones:tiny") == (
        "--widths sets the built-in SmallCNN's stages; with --backbone backbones:tiny, set them in your own function")
