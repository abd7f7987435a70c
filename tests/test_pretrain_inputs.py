"""The job's input checks: bad options, data and checkpoints end in argparse's one ``error:`` line with
exit code 2 (no traceback, nothing trained, no output folder made), and the fixes found by running it:
throughput after a resume, the global RNG seeded from ``--seed``."""
import csv
import os
import subprocess
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from swav_core.pretrain import backbone, checkpoint, main, train
from swav_core.pretrain.backbone import SmallCNN

from test_pretrain import TINY, _assert_states_equal, _ckpt, _env, _job


def _refused(capsys, *argv):
    """Run the job expecting a usage error; return its message (the text after ``error: ``)."""
    with pytest.raises(SystemExit) as exit_info:
        main(list(argv))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("python -m swav_core.pretrain: error: "), err  # no usage text
    assert err[0].endswith(" (--help lists the options)")
    return err[0].split("error: ", 1)[1][: -len(" (--help lists the options)")]


def _folder(tmp_path, files):
    folder = tmp_path / "data"
    folder.mkdir()
    for name, write in files.items():
        write(folder / name)
    return str(folder)


FOLDERS = {  # name -> (files, what the message must say besides --data and the path)
    "empty": ({"notes.txt": lambda p: p.write_text("x")}, "no .pt, .npy, .png or .jpg files"),
    "mixed": ({"a.pt": lambda p: torch.save(torch.zeros(1, 16, 16), p),
               "b.pt": lambda p: torch.save(torch.zeros(1, 20, 20), p)}, "a.pt is (1, 16, 16) but b.pt is (1, 20, 20)"),
    "corrupt pt": ({"a.pt": lambda p: p.write_text("garbage")}, "a.pt (UnpicklingError); expected one tensor"),
    "truncated pt": ({"a.pt": lambda p: (torch.save(torch.zeros(1, 8, 8), p), p.write_bytes(p.read_bytes()[:50]))},
                     "a.pt (RuntimeError); expected one tensor"),
    "corrupt npy": ({"a.npy": lambda p: p.write_text("garbage")}, "a.npy (ValueError); expected one array"),
    "not a tensor": ({"a.pt": lambda p: torch.save({"x": torch.zeros(1, 4, 4)}, p)}, "a.pt holds a dict"),
    "channels last": ({"a.pt": lambda p: torch.save(torch.zeros(32, 32, 3), p)},
                      "a.pt has shape (32, 32, 3), which looks like (H, W, C) with the channels last; expected "
                      "channels first: save x.transpose(2, 0, 1) (numpy) or x.permute(2, 0, 1) (torch)"),
    "channels last 3D": ({"a.pt": lambda p: torch.save(torch.zeros(8, 8, 8, 1), p)}, "looks like (D, H, W, C)"),
}


@pytest.mark.parametrize("case", sorted(FOLDERS))
def test_bad_data_folders_are_usage_errors(tmp_path, capsys, case):
    files, expected = FOLDERS[case]
    if case == "corrupt npy":
        pytest.importorskip("numpy")
    folder, out = _folder(tmp_path, files), tmp_path / "out"
    message = _refused(capsys, "--out", str(out), *TINY, "--data", folder, "--steps", "2")
    assert message.startswith("--data") and folder in message and expected in message, message
    assert "weights_only" not in message and not out.exists()  # checked before the output folder is made


def test_a_missing_data_folder_is_a_usage_error_and_makes_no_output_folder(tmp_path, capsys):
    out = tmp_path / "out"
    message = _refused(capsys, "--out", str(out), "--data", str(tmp_path / "nowhere"))
    assert message.startswith(f"--data '{tmp_path / 'nowhere'}': no such folder") and not out.exists()


OPTIONS = [  # bad options -> (parts of the message); each names the option and the value
    (["--batch-size", "1"], "argument --batch-size: expected an int >= 2 (BatchNorm needs 2 samples per step), got '1'"),
    (["--batch-size", "0"], "argument --batch-size: expected an int >= 2"),
    (["--steps", "abc"], "argument --steps: expected an int >= 1, got 'abc'"),
    (["--queue-length", "-1"], "argument --queue-length: expected an int >= 0, got '-1'"),
    (["--widths", "8,x"], "argument --widths: expected positive ints separated by commas (e.g. 16,32,64), got '8,x'"),
    (["--epsilon", "0"], "argument --epsilon: expected a finite number > 0, got '0'"),
    (["--epsilon", "nan"], "argument --epsilon: expected a finite number > 0, got 'nan'"),
    (["--temperature", "0"], "argument --temperature: expected a finite number > 0, got '0'"),
    (["--high-scale", "1,0.3"], "argument --high-scale: expected LO,HI with 0 < LO <= HI <= 1 (e.g. 0.3,1), got '1,0.3'"),
    (["--low-scale", "0,0.3"], "argument --low-scale: expected LO,HI with 0 < LO <= HI <= 1"),
    (["--low-scale", "0.3"], "argument --low-scale: expected LO,HI"),
    (["--steps", "10", "--stop-at", "20"], "--stop-at 20 is beyond --steps 10"),
    (["--resume"], "--resume: no checkpoint at {out}"),
    (["--knn-k", "65"], "--knn-k 65 but the k-NN bank holds only the 64 training samples (--n-train)"),
]


@pytest.mark.parametrize("bad, expected", OPTIONS, ids=lambda v: " ".join(v) if isinstance(v, list) else "")
def test_bad_options_are_usage_errors_before_anything_runs(tmp_path, capsys, bad, expected):
    out = tmp_path / "out"
    message = _refused(capsys, "--out", str(out), *TINY, *bad)
    assert expected.format(out=out) in message, message
    assert "invalid" not in message and not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the machine has CUDA")
def test_cuda_without_cuda_is_a_usage_error(tmp_path, capsys):
    message = _refused(capsys, "--out", str(tmp_path / "out"), "--device", "cuda")
    assert message.startswith("--device cuda but torch.cuda.is_available() is False")


def test_out_must_be_a_folder(tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert _refused(capsys, "--out", str(afile)) == f"--out '{afile}' is a file, expected a folder (or a path to create one)"
    message = _refused(capsys, "--out", str(afile / "sub"), *TINY, "--steps", "2")
    assert message.startswith(f"--out '{afile / 'sub'}': cannot create the folder")


def test_resume_refuses_a_corrupt_checkpoint_and_reads_old_ones(tmp_path, capsys):
    assert _job(tmp_path, "--steps", "4", "--stop-at", "2") == 0
    path = tmp_path / "checkpoint.pt"
    good = path.read_bytes()
    path.write_bytes(good[: len(good) // 2])
    message = _refused(capsys, "--out", str(tmp_path), *TINY, "--steps", "4", "--resume")
    assert message.startswith(f"--resume: cannot read the checkpoint {path} (") and "torch.load" not in message
    assert message.endswith("); expected a checkpoint.pt written by this job")
    torch.save({"step": 2}, path)
    assert "is not a checkpoint of this job" in _refused(capsys, "--out", str(tmp_path), *TINY, "--steps", "4", "--resume")
    path.write_bytes(good)
    old = {**torch.load(path, weights_only=True), "torch": torch.__version__}  # a TorchVersion, as before
    torch.save(old, path)
    assert checkpoint.load(str(path))["step"] == 2
    assert _job(tmp_path, "--steps", "4", "--resume") == 0


def test_usage_errors_exit_2_without_a_traceback_from_the_command_line(tmp_path):
    for argv in (["--batch-size", "1"], ["--data", str(tmp_path / "nowhere")]):
        cmd = [sys.executable, "-m", "swav_core.pretrain", "--out", str(tmp_path / "out"), *argv]
        done = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=120)
        assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
        last = done.stderr.splitlines()[-1]
        assert last.startswith("python -m swav_core.pretrain: error: ") and argv[0] in last, last


# --- behaviour fixes -------------------------------------------------------------------------------

def test_throughput_after_a_resume_counts_only_the_steps_run_since(tmp_path, monkeypatch, capsys):
    """With every step taking exactly 1 s of a fake clock, a stopped and resumed run prints and logs
    the same crops/s and ETA as a straight one, though its first window holds losses from before."""
    clock = types.SimpleNamespace(t=0.0)
    step = train._train_step

    def timed_step(*args):
        clock.t += 1.0
        step(*args)

    monkeypatch.setattr(train, "time", types.SimpleNamespace(perf_counter=lambda: clock.t))
    monkeypatch.setattr(train, "_train_step", timed_step)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert _job(straight, "--steps", "16") == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("step ")]
    assert _job(resumed, "--steps", "16", "--stop-at", "10") == 0
    assert _job(resumed, "--steps", "16", "--resume") == 0
    resumed_lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("step ")]
    # From step 12 on (the stopped run's ETAs count to --stop-at): 8 samples x 4 crops per 1 s step.
    assert lines[2] == resumed_lines[2] and "| 32 crops/s | ETA 0m04s" in lines[2]
    assert lines[2:] == resumed_lines[2:]
    rows = [list(csv.reader(open(p / "log.csv"))) for p in (straight, resumed)]
    assert rows[0] == rows[1]


class _DropoutCNN(SmallCNN):
    """A user backbone drawing from torch's global RNG in every training forward."""

    def forward(self, x):
        return F.dropout(super().forward(x), 0.3, self.training)


def test_seed_makes_a_backbone_with_dropout_reproducible_through_stop_and_resume(tmp_path, monkeypatch):
    monkeypatch.setattr(backbone, "SmallCNN", _DropoutCNN)
    runs = {}
    for name, caller_seed, schedule in (("a", 1, [[]]), ("b", 2, [[]]), ("c", 3, [["--stop-at", "5"], ["--resume"]])):
        for extra in schedule:
            torch.manual_seed(caller_seed)  # the caller's global RNG must not matter
            assert _job(tmp_path / name, "--steps", "9", *extra) == 0
        runs[name] = _ckpt(tmp_path / name)
    for other in ("b", "c"):
        _assert_states_equal(runs["a"]["model"], runs[other]["model"])
        assert torch.equal(runs["a"]["rng"][0]["torch"], runs[other]["rng"][0]["torch"])
    torch.manual_seed(1)
    caller = torch.get_rng_state()
    assert _job(tmp_path / "d", "--steps", "9", "--seed", "1") == 0
    assert torch.equal(torch.get_rng_state(), caller)  # the job seeds its own RNG, not its caller's
    assert not torch.equal(runs["a"]["rng"][0]["torch"], _ckpt(tmp_path / "d")["rng"][0]["torch"])
    assert os.path.isfile(tmp_path / "c" / "metrics.json")


def test_crops_smaller_than_two_pixels_are_refused(tmp_path, capsys):
    folder = tmp_path / "tiny"
    folder.mkdir()
    for i in range(8):
        torch.save(torch.rand(1, 3, 3), folder / f"{i}.pt")
    message = _refused(capsys, "--out", str(tmp_path / "out"), "--data", str(folder), "--batch-size", "4",
                       "--steps", "2")
    assert message == "crops of 1 pixel per side (--high-size 3, --low-size 1; the data is (3, 3), the " \
                      "low-resolution size defaults to half the high one): expected >= 2"
