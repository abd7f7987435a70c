"""What a run leaves behind and how it continues: backbone.pt (and the README's lines that load it),
loss.png or the line saying how to get it, the same loss in the summary and log.csv, the version,
an ETA from the session's throughput, and --resume with one flag."""
import csv
import json
import os
import pathlib
import re
import subprocess
import sys
import types

import pytest
import torch

import swav_core
from swav_core.pretrain import SmallCNN, main, train

from test_pretrain import ROOT, TINY, _assert_states_equal, _ckpt, _env, _job
from test_pretrain_inputs import _refused

README = pathlib.Path(ROOT) / "README.md"


def _rows(out):
    return list(csv.DictReader(open(out / "log.csv")))


def test_a_run_leaves_backbone_weights_that_load_strictly_and_reports_log_csv_losses(device, tmp_path, capsys):
    assert _job(tmp_path, "--steps", "10", "--device", device) == 0
    printed = capsys.readouterr().out
    state = torch.load(tmp_path / "backbone.pt", weights_only=True)
    assert state and not any(k.startswith("backbone.") for k in state)
    net = SmallCNN(in_channels=1, dims=2, widths=(4, 8))
    net.load_state_dict(state, strict=True)
    model = _ckpt(tmp_path)["model"]
    _assert_states_equal(state, {k[len("backbone."):]: v for k, v in model.items() if k.startswith("backbone.")})
    # The summary and metrics.json report log.csv's kind of loss: the first and last rows' window means.
    rows, metrics = _rows(tmp_path), json.loads((tmp_path / "metrics.json").read_text())
    assert (f"{metrics['loss_first']:.6f}", f"{metrics['loss_last']:.6f}") == (rows[0]["loss"], rows[-1]["loss"])
    assert f"loss {float(rows[0]['loss']):.4f} -> {float(rows[-1]['loss']):.4f}" in printed
    assert metrics["swav_core"] == _ckpt(tmp_path)["swav_core"] == swav_core.__version__


@pytest.mark.parametrize("channels", [1, 3])
def test_the_readme_lines_load_the_jobs_backbone(tmp_path, monkeypatch, channels):
    """The README's ```py block that names backbone.pt runs as written in a folder holding a run, also of
    3-channel data and other widths: metrics.json records what rebuilds the network."""
    blocks = [b for b in re.findall(r"```py\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S) if "backbone.pt" in b]
    assert len(blocks) == 1 and len(blocks[0].strip().splitlines()) == 3, blocks
    data = []
    if channels == 3:
        (tmp_path / "rgb").mkdir()
        for i in range(16):
            torch.save(torch.rand(3, 16, 16), tmp_path / "rgb" / f"{i:02d}.pt")
        data = ["--data", str(tmp_path / "rgb")]
    assert _job(tmp_path / "runs" / "pretrain", "--steps", "2", *data) == 0  # TINY widths 4,8
    monkeypatch.chdir(tmp_path)
    scope = {}
    exec(compile(blocks[0], str(README), "exec"), scope)
    assert isinstance(scope["net"], SmallCNN) and scope["net"](torch.rand(2, channels, 16, 16)).shape == (2, 8)


def test_loss_png_is_drawn_at_the_end_and_on_demand(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    assert _job(tmp_path, "--steps", "8") == 0
    png = tmp_path / "loss.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "loss.png to" in capsys.readouterr().out
    png.unlink()
    assert main(["--plot", str(tmp_path)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and capsys.readouterr().out == f"wrote {png}\n"


def test_without_matplotlib_one_line_says_how_to_get_the_picture(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    assert _job(tmp_path, "--steps", "4") == 0
    hint = f'loss.png needs matplotlib: pip install -e ".[plot]" (or pip install matplotlib), then ' \
           f"python -m swav_core.pretrain --plot {tmp_path}"
    assert capsys.readouterr().out.splitlines()[-1] == hint and not (tmp_path / "loss.png").exists()
    assert _refused(capsys, "--plot", str(tmp_path)) == hint
    assert _refused(capsys, "--plot", str(tmp_path / "nowhere")).startswith("--plot ")


def test_version_option(tmp_path):
    done = subprocess.run([sys.executable, "-m", "swav_core.pretrain", "--version"], capture_output=True, text=True,
                          env=_env(), timeout=120)
    assert done.returncode == 0 and done.stdout == f"swav-core {swav_core.__version__}\n"


def test_a_clean_start_prints_no_warning():
    """``--help`` on the README's install (numpy optional, absent in CI) writes nothing to stderr: torch's
    "Failed to initialize NumPy" warning is silenced where swav_core imports torch."""
    done = subprocess.run([sys.executable, "-m", "swav_core.pretrain", "--help"], capture_output=True, text=True,
                          env=_env(), timeout=120)
    assert done.returncode == 0 and "--data" in done.stdout
    assert done.stderr == "", done.stderr


def test_eta_uses_the_throughput_of_the_whole_session(tmp_path, monkeypatch, capsys):
    """Steps 1-4 take 1 s each, steps 5-8 5 s each (a fake clock): at step 8 the ETA for the 8 steps
    left is 8 x (24 s / 8 steps) = 24 s, not the last window's 8 x 5 s."""
    clock = types.SimpleNamespace(t=0.0)
    step = train._train_step

    def timed_step(*args):
        clock.t += 1.0 if args[1] < 4 else 5.0
        step(*args)

    monkeypatch.setattr(train, "time", types.SimpleNamespace(perf_counter=lambda: clock.t))
    monkeypatch.setattr(train, "_train_step", timed_step)
    assert _job(tmp_path, "--steps", "16") == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("step ")]
    assert lines[0].endswith("| 32 crops/s | ETA 0m12s") and lines[1].endswith("| 6 crops/s | ETA 0m24s"), lines


def test_one_flag_resume_continues_bitwise(tmp_path):
    """--stop-at 10 with the TINY options, then ``--out DIR --resume`` alone: the checkpoint's options
    (schedule, sizes, logging) are used, and the run ends bitwise equal to an uninterrupted one."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert _job(straight, "--steps", "24") == 0
    assert _job(resumed, "--steps", "24", "--stop-at", "10") == 0
    assert main(["--out", str(resumed), "--resume"]) == 0
    a, b = _ckpt(straight), _ckpt(resumed)
    _assert_states_equal(a["model"], b["model"])
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        _assert_states_equal(sa, sb)
    assert [(r["step"], r["loss"], r["lr"]) for r in _rows(straight)] == [(r["step"], r["loss"], r["lr"]) for r in _rows(resumed)]
    ma, mb = (json.loads((p / "metrics.json").read_text()) for p in (straight, resumed))
    assert (ma["knn_top1"], ma["loss_first"], ma["loss_last"]) == (mb["knn_top1"], mb["loss_first"], mb["loss_last"])


def test_resume_compares_given_options_after_normalisation(tmp_path, monkeypatch, capsys):
    """``../data/`` and the absolute path of the same folder are the same data; the same value written
    again is no change; a real change is refused naming the option, the old and the new value."""
    (tmp_path / "work").mkdir()
    folder = tmp_path / "data"
    folder.mkdir()
    for i in range(24):
        torch.save(torch.rand(1, 12, 12), folder / f"{i:03d}.pt")
    sizes = ["--high-size", "12", "--low-size", "6"]
    monkeypatch.chdir(tmp_path / "work")
    assert _job(tmp_path / "out", "--data", "../data/", "--steps", "6", "--stop-at", "2", *sizes) == 0
    out = str(tmp_path / "out")
    message = _refused(capsys, "--out", out, "--resume", "--data", str(tmp_path / "work"))  # another folder
    assert message.startswith(f"--resume: --data '{tmp_path / 'work'}' changed since the checkpoint: 000.pt "
                              f"removed, 001.pt removed, 002.pt removed and 21 more")
    assert "--prototypes was 10, now 12" in _refused(capsys, "--out", out, "--resume", "--prototypes", "12")
    assert main(["--out", out, "--resume", "--stop-at", "4", "--data", str(folder), "--prototypes", "10"]) == 0
    assert main(["--out", out, "--resume", "--data", "../data", "--high-scale", "0.3,1"]) == 0
    assert _ckpt(tmp_path / "out")["step"] == 6 and os.path.isfile(tmp_path / "out" / "metrics.json")


# --- training health (issue 20) ----------------------------------------------------------------------

def test_log_csv_holds_the_health_figures_and_a_stuck_run_says_so_once(tmp_path, capsys):
    """--temperature 100 makes the predictions uniform by construction: after the frozen and warm-up steps,
    three logged rows with pred_entropy ~1 give one line naming it and the knobs; the run goes on."""
    assert _job(tmp_path, "--steps", "24", "--temperature", "100") == 0  # TINY: rows every 4 steps, 5 frozen
    printed = capsys.readouterr().out
    warnings = [line for line in printed.splitlines() if "the run looks collapsed" in line]
    assert warnings == ["step 16: the run looks collapsed for 3 logged rows: pred_entropy 1.000: the predictions "
                        "are near uniform (the loss sits at ln K); lower --temperature, raise --lr or lower "
                        "--freeze-prototypes-steps (going on; --stop-on-collapse stops instead)"], printed
    header, *rows = [r.split(",") for r in (tmp_path / "log.csv").read_text().splitlines()]
    assert header[-3:] == ["pred_entropy", "prototype_usage", "embedding_std"]
    assert all(float(r[-3]) > 0.999 and 0 < float(r[-2]) <= 1 and 0 < float(r[-1]) < 2 for r in rows)
    assert "| entropy 1.00 usage " in printed


def test_stop_on_collapse_stops_with_a_checkpoint(tmp_path, capsys):
    assert main(["--out", str(tmp_path), *TINY, "--steps", "40", "--temperature", "100", "--stop-on-collapse"]) == 1
    error = capsys.readouterr().err.strip()
    assert error.startswith("python -m swav_core.pretrain: error: step 16: the run looks collapsed")
    assert error.endswith(f"stopped (--stop-on-collapse); saved {tmp_path / 'checkpoint.pt'} at step 16")
    assert _ckpt(tmp_path)["step"] == 16


def test_a_healthy_default_run_prints_no_collapse_line(tmp_path, capsys):
    assert main(["--out", str(tmp_path), "--steps", "100", "--log-every", "10", "--n-test", "64"]) == 0
    printed = capsys.readouterr().out
    assert "collapsed" not in printed
    rows = [r.split(",") for r in (tmp_path / "log.csv").read_text().splitlines()[1:]]
    assert max(float(r[-3]) for r in rows) < 0.97 and min(float(r[-1]) for r in rows) > 0.3


def test_loss_png_has_a_health_panel(tmp_path, monkeypatch):
    matplotlib = pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure
    from swav_core.pretrain import plot
    assert _job(tmp_path, "--steps", "8") == 0
    drawn = []
    monkeypatch.setattr(Figure, "savefig", lambda fig, f, **kw: drawn.append(fig))
    plot.write(str(tmp_path))
    panel = [ax for ax in drawn[0].axes if ax.get_ylabel() == "training health"]
    assert len(panel) == 1 and [line.get_label() for line in panel[0].get_lines()][:3] == [
        "pred_entropy", "prototype_usage", "embedding_std"]
    assert matplotlib


def test_the_job_says_when_the_queue_is_first_used_and_what_it_holds(tmp_path, capsys):
    assert _job(tmp_path / "a", "--steps", "4") == 0  # TINY: 64 samples, B = 8, queues of 16
    assert "queues: 2 x 16 rows per process, used from step 3; each holds 25.0% of the 64 training samples" in \
        capsys.readouterr().out
    assert _job(tmp_path / "b", "--steps", "4", "--queue-length", "1000") == 0
    assert ("queues: 2 x 1000 rows per process, never used in this run (full after step 125, --steps 4); each holds "
            "each of this process's samples about 15.6 times (more than an epoch: lower --queue-length)") in \
        capsys.readouterr().out
