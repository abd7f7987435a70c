"""The job under faults: a run is never destroyed or poisoned silently. A folder holding a run, two jobs
on one folder, non-finite state, damaged checkpoints and data, ``kill -9`` during a write, a full disk,
signals (also under a 2-process torchrun) and a stalled rank each end in one ``error:`` line, the last
good checkpoint kept and resumable."""
import contextlib
import errno
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import torch

from swav_core.pretrain import backbone, checkpoint, main
from swav_core.pretrain.errors import JobError
from swav_core.pretrain.backbone import SmallCNN

from test_pretrain import TINY, _assert_states_equal, _ckpt, _env, _free_port, _job
from test_pretrain_inputs import _refused


def _files(folder):
    """Every file of ``folder`` (but the lock) with its bytes: what a refusal must leave as it was."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.name != ".lock"}


def _failed(capsys, code, *argv):
    """Run the job expecting a :class:`JobError` or a stop at once: exit ``code``, one ``error:`` line."""
    assert main(list(argv)) == code
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("python -m swav_core.pretrain: error: "), err
    return err[0].split("error: ", 1)[1]


def _start(out, *args, **popen):
    """The job in a subprocess, its output read line by line."""
    cmd = [sys.executable, "-m", "swav_core.pretrain", "--out", str(out), *TINY, *args]
    options = dict(stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env(OMP_NUM_THREADS="1"),
                   start_new_session=True)
    return subprocess.Popen(cmd, **{**options, **popen})


def _wait_for(proc, prefix, count=1, limit_s=120):
    """The ``count``-th line of ``proc`` starting with ``prefix``; ``proc``'s process group is killed
    when that takes over ``limit_s`` seconds."""
    timer = threading.Timer(limit_s, lambda: os.killpg(proc.pid, signal.SIGKILL))
    timer.start()
    seen = []
    try:
        for line in proc.stdout:
            count -= line.startswith(prefix)
            seen.append(line)
            if count == 0:
                return line
    finally:
        timer.cancel()
    raise AssertionError(f"the job ended (code {proc.wait()}) before printing {prefix!r}; it printed:\n"
                         + "".join(seen[-80:]))


# --- the output folder ----------------------------------------------------------------------------

@pytest.mark.parametrize("second", [["--steps", "4"], ["--data", "synthetic3d", "--high-size", "8", "--low-size", "4"]])
def test_a_second_run_into_a_folder_holding_a_run_is_refused_before_touching_it(tmp_path, capsys, second):
    assert _job(tmp_path, "--steps", "4") == 0
    before = _files(tmp_path)
    message = _refused(capsys, "--out", str(tmp_path), *TINY, *second)
    assert message.startswith(f"--out '{tmp_path}' holds a run (checkpoint.pt, log.csv, metrics.json, backbone.pt)")
    assert "--resume" in message and "another --out" in message and "--overwrite" in message
    assert _files(tmp_path) == before
    assert "pass one of them" in _refused(capsys, "--out", str(tmp_path), *TINY, "--resume", "--overwrite")
    assert _job(tmp_path, "--steps", "6", "--stop-at", "2", "--overwrite") == 0  # the old run deleted
    assert sorted(_files(tmp_path)) == ["checkpoint.pt", "log.csv"] and _ckpt(tmp_path)["step"] == 2


def test_a_second_job_on_a_running_folder_is_refused_and_a_dead_jobs_lock_taken_over(tmp_path, capsys):
    proc = _start(tmp_path, "--steps", "100000", "--log-every", "2")
    try:
        _wait_for(proc, "step ")
        message = _refused(capsys, "--out", str(tmp_path), *TINY, "--steps", "4", "--overwrite")
        assert message == f"--out '{tmp_path}' is in use by another run (pid {proc.pid}); wait for it to end, or use another --out"
        assert os.path.isfile(tmp_path / "log.csv")  # not deleted by the refused --overwrite
    finally:
        proc.kill()  # kill -9: the kernel releases its lock
        proc.wait()
    assert _job(tmp_path, "--steps", "4", "--overwrite") == 0


# --- non-finite state -----------------------------------------------------------------------------

class _PoisonedCNN(SmallCNN):
    """A NaN enters the first BatchNorm's running variance at step 7 (the loss stays finite)."""

    def forward(self, x):
        self.calls = getattr(self, "calls", 0) + self.training
        if self.calls == 4 * 6 + 1:  # 4 crops per step: the first forward of step 7
            self.features[1].running_var[0] = float("nan")
        return super().forward(x)


def test_a_non_finite_state_is_never_saved_and_the_last_good_checkpoint_is_kept(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(backbone, "SmallCNN", _PoisonedCNN)
    message = _failed(capsys, 1, "--out", str(tmp_path), *TINY, "--steps", "20")  # checkpoints every 5 steps
    assert message.startswith("after step 10: model.backbone.features.1.running_var holds NaN or inf; "
                              f"{tmp_path / 'checkpoint.pt'} not written, the last good one is kept")
    assert checkpoint.load(str(tmp_path / "checkpoint.pt"))["step"] == 5
    assert not list(tmp_path.glob("*.tmp")) and not (tmp_path / "metrics.json").exists()


def test_a_non_finite_optimizer_state_is_refused_naming_it(tmp_path):
    path = str(tmp_path / "checkpoint.pt")
    checkpoint.save(path, {"step": 1, "optimizer": {"state": {0: {"exp_avg": torch.zeros(3)}}}})
    good = (tmp_path / "checkpoint.pt").read_bytes()
    state = {"step": 2, "optimizer": {"state": {0: {"exp_avg": torch.tensor([0.0, float("nan"), 1.0])}}}}
    with pytest.raises(JobError, match=r"^after step 2: optimizer.state.0.exp_avg holds NaN or inf"):
        checkpoint.save(path, state)
    assert (tmp_path / "checkpoint.pt").read_bytes() == good and sorted(os.listdir(tmp_path)) == ["checkpoint.pt"]


def test_a_diverging_loss_stops_with_one_line_and_keeps_the_last_checkpoint(tmp_path, capsys):
    """lr 1e30 (the largest accepted): step 1's update is finite but huge, step 2's scores are NaN (which
    the loss refuses)."""
    message = _failed(capsys, 1, "--out", str(tmp_path), *TINY, "--steps", "20", "--lr", "1e30", "--warmup-steps", "0",
                      "--ckpt-every", "1")
    assert message == "the scores are not finite at step 2: stopped, the last checkpoint is kept (lower --lr or " \
                      "raise --epsilon, then --resume)"
    assert checkpoint.load(str(tmp_path / "checkpoint.pt"))["step"] == 1


# --- damaged checkpoints --------------------------------------------------------------------------

def _nan_bn(c):  # "model" is rank 0's state, the same tensors
    c["model_per_rank"][0]["backbone.features.1.running_mean"][0] = float("nan")


def _nan_adam(c):
    c["optimizer"]["state"][0]["exp_avg"].view(-1)[0] = float("inf")


DAMAGE = {  # edit of the checkpoint -> the message after "--resume: <path> "
    "queue pointer 1e6": (lambda c: c["model_per_rank"][0].update({"queues.0.bank_ptr": torch.tensor(10**6)}),
                          "does not fit this run: Error(s) in loading state_dict for SwaV:"),
    "queue pointer -1": (lambda c: c["model_per_rank"][0].update({"queues.0.bank_ptr": torch.tensor(-1)}),
                         "does not fit this run: Error(s) in loading state_dict for SwaV:"),
    "bad RNG state": (lambda c: c["rng"][0].update({"torch": torch.zeros(7, dtype=torch.uint8)}),
                      "is damaged: rng.0.torch is not a torch generator state"),
    "missing key": (lambda c: c.pop("optimizer"), "is not a checkpoint of this job"),
    "step -3": (lambda c: c.update({"step": -3}), "is damaged: step = -3, expected an int >= 0"),
    "NaN BatchNorm statistic": (_nan_bn, "is damaged: model.backbone.features.1.running_mean holds NaN or inf"),
    "inf in the optimizer state": (_nan_adam, "is damaged: optimizer.state.0.exp_avg holds NaN or inf"),
    "optimizer state of another shape": (lambda c: c["optimizer"]["state"][0].update({"exp_avg": torch.zeros(2)}),
                                         "does not fit this run: optimizer state exp_avg is (2,)"),
}


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_a_damaged_checkpoint_is_refused_before_anything_is_touched(tmp_path, capsys, case):
    damage, expected = DAMAGE[case]
    assert _job(tmp_path, "--steps", "12", "--stop-at", "8") == 0  # log.csv holds steps 4 and 8
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    damage(ckpt)
    torch.save(ckpt, tmp_path / "checkpoint.pt")
    before = _files(tmp_path)
    message = _refused(capsys, "--out", str(tmp_path), "--resume")
    assert message.startswith(f"--resume: {tmp_path / 'checkpoint.pt'} {expected}"), message
    assert _files(tmp_path) == before


# --- kill -9 and a full disk ------------------------------------------------------------------------

KILLED_IN_SAVE = textwrap.dedent("""
    import io, sys, time
    from swav_core.pretrain import checkpoint, main
    real, calls = checkpoint.write_atomic, []
    def half_then_hang(path, write):  # the second checkpoint: half written when the kill comes
        calls.extend([1] if path.endswith("checkpoint.pt") else [])
        if len(calls) < 2 or not path.endswith("checkpoint.pt"):
            return real(path, write)
        def half(f):
            buf = io.BytesIO()
            write(buf)
            f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
            f.flush()
            print("HALF WRITTEN", flush=True)
            time.sleep(120)
        return real(path, half)
    checkpoint.write_atomic = half_then_hang
    sys.exit(main(sys.argv[1:]))
""")


def test_kill_9_during_a_save_keeps_the_previous_checkpoint_and_the_next_start_cleans_up(tmp_path):
    """A real ``kill -9`` of a job halfway through writing its second checkpoint (step 10): checkpoint.pt
    still holds step 5 whole, the orphan is removed by the next start, which takes over the dead job's
    lock and resumes bitwise equal to an uninterrupted run."""
    killed, straight = tmp_path / "killed", tmp_path / "straight"
    cmd = [sys.executable, "-c", KILLED_IN_SAVE, "--out", str(killed), *TINY, "--steps", "12"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            env=_env(OMP_NUM_THREADS=str(torch.get_num_threads())))  # bitwise: same threads
    try:
        _wait_for(proc, "HALF WRITTEN")
    finally:
        proc.kill()
        proc.wait()
    assert (killed / "checkpoint.pt.tmp").exists() and checkpoint.load(str(killed / "checkpoint.pt"))["step"] == 5
    assert _job(killed, "--steps", "12", "--resume") == 0
    assert not list(killed.glob("*.tmp"))
    assert _job(straight, "--steps", "12") == 0
    _assert_states_equal(_ckpt(straight)["model"], _ckpt(killed)["model"])
    assert (straight / "log.csv").read_text() .count("\n") == (killed / "log.csv").read_text().count("\n")


KILLED_IN_LOG_REWRITE = textwrap.dedent("""
    import sys, time
    from swav_core.pretrain import checkpoint
    def half_then_hang(f):
        f.write(b"step,loss\\n4,")
        f.flush()
        print("HALF WRITTEN", flush=True)
        time.sleep(120)
    checkpoint.write_atomic(sys.argv[1], half_then_hang)
""")


def test_kill_9_while_log_csv_is_rewritten_loses_no_row(tmp_path):
    """log.csv is rewritten on resume through a temporary file and a rename: a ``kill -9`` in the middle
    of the write leaves it whole, and the resumed run logs the rows of an uninterrupted one."""
    assert _job(tmp_path / "run", "--steps", "12", "--stop-at", "9") == 0
    log = tmp_path / "run" / "log.csv"
    rows = log.read_text()
    proc = subprocess.Popen([sys.executable, "-c", KILLED_IN_LOG_REWRITE, str(log)], stdout=subprocess.PIPE,
                            text=True, env=_env(), start_new_session=True)
    try:
        _wait_for(proc, "HALF WRITTEN")
    finally:
        proc.kill()
        proc.wait()
    assert log.read_text() == rows and (tmp_path / "run" / "log.csv.tmp").exists()
    assert _job(tmp_path / "run", "--steps", "12", "--resume") == 0
    assert _job(tmp_path / "straight", "--steps", "12") == 0
    assert not list((tmp_path / "run").glob("*.tmp"))
    assert log.read_text().splitlines()[:3] == rows.splitlines()  # header, steps 4 and 8 kept
    assert [r.split(",")[:3] for r in log.read_text().splitlines()] == \
           [r.split(",")[:3] for r in (tmp_path / "straight" / "log.csv").read_text().splitlines()]


@contextlib.contextmanager
def _tmpfs(path, size: str, *options: str):
    """A real tmpfs of ``size`` mounted at ``path`` (root only, as CI runs: skipped elsewhere)."""
    path.mkdir()
    mount = ["mount", "-t", "tmpfs", "-o", ",".join([f"size={size}", *options]), "tmpfs", str(path)]
    done = subprocess.run(mount, capture_output=True, text=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


def test_a_real_full_disk_is_one_line_and_keeps_the_last_checkpoint_without_an_orphan(tmp_path, capsys):
    """--out on a 48 KiB tmpfs: the step-5 checkpoint (32 KiB) fits, the step-10 one (beside it) does not."""
    with _tmpfs(tmp_path / "small", "48k") as out:
        message = _failed(capsys, 1, "--out", str(out), *TINY, "--steps", "12")
        assert message == f"cannot write {out / 'checkpoint.pt'}: No space left on device; the file there is unchanged"
        assert checkpoint.load(str(out / "checkpoint.pt"))["step"] == 5 and not list(out.glob("*.tmp"))
        subprocess.run(["mount", "-o", "remount,size=1m", str(out)], check=True)  # space freed
        assert _job(out, "--steps", "12", "--resume") == 0 and _ckpt(out)["step"] == 12


def test_no_space_at_all_or_a_read_only_folder_is_one_line(tmp_path, capsys):
    with _tmpfs(tmp_path / "full", "16k") as out:
        (out / "mine.bin").write_bytes(b"\0" * 16384)  # the user's file fills it; the job must leave it
        message = _failed(capsys, 1, "--out", str(out), *TINY, "--steps", "12")
        assert message.startswith(f"cannot write {out / 'log.csv'}: No space left on device")
        assert sorted(p.name for p in out.iterdir()) == ["mine.bin"]  # no lock, no temporary file left
    with _tmpfs(tmp_path / "read-only", "16k", "ro") as out:
        message = _failed(capsys, 1, "--out", str(out), *TINY, "--steps", "12")
        assert message == f"cannot create {out / '.lock'}: Read-only file system"


# --- signals --------------------------------------------------------------------------------------

class _SignalledCNN(SmallCNN):
    """Sends ``SIGNALS`` to its own process in its forward at step 3 (training) or in the evaluation (not in
    the dry run on 2 samples that finds the feature size)."""

    SIGNALS, IN_TRAINING = (), True

    def forward(self, x):
        self.calls = getattr(self, "calls", 0) + (len(x) > 2)
        if self.training == self.IN_TRAINING and self.calls == (4 * 2 + 1 if self.IN_TRAINING else 1):
            for sig in self.SIGNALS:
                os.kill(os.getpid(), sig)  # the handler runs before os.kill returns to this line
        return super().forward(x)


def test_a_second_ctrl_c_stops_at_once_with_one_line_naming_the_last_saved_step(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(backbone, "SmallCNN", _SignalledCNN)
    monkeypatch.setattr(_SignalledCNN, "SIGNALS", (signal.SIGINT, signal.SIGINT))
    message = _failed(capsys, 130, "--out", str(tmp_path), *TINY, "--steps", "12", "--ckpt-every", "2")
    assert message == f"SIGINT again: stopped at once; the last checkpoint is {tmp_path / 'checkpoint.pt'} at step 2"
    assert _ckpt(tmp_path)["step"] == 2 and not list(tmp_path.glob("*.tmp"))


def test_sigterm_during_the_final_evaluation_says_what_happens(tmp_path, capsys, monkeypatch):
    """The checkpoint of the last step is on disk when the evaluation runs: SIGTERM there stops the job
    at once, saying so, and --resume runs only the evaluation."""
    monkeypatch.setattr(backbone, "SmallCNN", _SignalledCNN)
    monkeypatch.setattr(_SignalledCNN, "SIGNALS", (signal.SIGTERM,))
    monkeypatch.setattr(_SignalledCNN, "IN_TRAINING", False)
    message = _failed(capsys, 130, "--out", str(tmp_path), *TINY, "--steps", "6")
    assert message == (f"SIGTERM during the final evaluation: stopped; {tmp_path / 'checkpoint.pt'} holds all 6 steps, "
                       f"--resume runs the evaluation")
    assert _ckpt(tmp_path)["step"] == 6 and not (tmp_path / "metrics.json").exists()
    monkeypatch.setattr(_SignalledCNN, "SIGNALS", ())
    assert _job(tmp_path, "--resume") == 0 and (tmp_path / "metrics.json").exists()


# --- data and options -----------------------------------------------------------------------------

@pytest.mark.parametrize("bad, dtype", [(float("nan"), torch.float32), (float("inf"), torch.float32),
                                        (-float("inf"), torch.float16), (1e30, torch.float32), (1e300, torch.float64),
                                        (-2e6, torch.bfloat16)])
def test_non_finite_or_huge_values_in_a_data_file_are_refused_at_load_naming_it(tmp_path, capsys, bad, dtype):
    folder = tmp_path / "data"
    folder.mkdir()
    for i in range(12):
        x = torch.rand(1, 12, 12, dtype=torch.float64)
        if i == 7:
            x[0, 3, 4] = bad
        torch.save(x.to(dtype), folder / f"{i:02d}.pt")
    message = _refused(capsys, "--out", str(tmp_path / "out"), *TINY, "--data", str(folder), "--steps", "2",
                       "--high-size", "12", "--low-size", "6")
    assert message.startswith(f"--data: {folder / '07.pt'} holds 1 value(s) that are NaN, ±inf or beyond ±1e+06")
    assert not (tmp_path / "out").exists()


OPTIONS = [  # bad options -> the message; each names the option and the value
    (["--lr", "nan"], "argument --lr: expected a finite number in (0, 1e30], got 'nan'"),
    (["--lr", "inf"], "argument --lr: expected a finite number in (0, 1e30], got 'inf'"),
    (["--lr", "-0.002"], "argument --lr: expected a finite number in (0, 1e30], got '-0.002'"),
    (["--lr", "1e38"], "argument --lr: expected a finite number in (0, 1e30], got '1e38'"),  # AdamW overflowed
    (["--weight-decay", "nan"], "argument --weight-decay: expected a finite number >= 0, got 'nan'"),
    (["--intensity", "5"], "argument --intensity: expected a finite number in [0, 1), got '5'"),
    (["--prototypes", "1"], "argument --prototypes: expected an int >= 2 (one prototype makes the loss 0), got '1'"),
    (["--dist-timeout", "0"], "argument --dist-timeout: expected a finite number > 0, got '0'"),
]


@pytest.mark.parametrize("bad, expected", OPTIONS, ids=lambda v: " ".join(v) if isinstance(v, list) else "")
def test_bad_numbers_are_refused_by_option_parsing(tmp_path, capsys, bad, expected):
    assert _refused(capsys, "--out", str(tmp_path / "out"), *TINY, *bad) == expected
    assert not (tmp_path / "out").exists()


# --- torchrun -------------------------------------------------------------------------------------

def _torchrun(out, *args):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "-m", "swav_core.pretrain", "--out", str(out), *TINY, *args]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=_env(OMP_NUM_THREADS="1"), start_new_session=True)


@pytest.mark.distributed
def test_ctrl_c_under_torchrun_always_saves_a_checkpoint_that_resumes(tmp_path):
    """SIGINT to torchrun's process group (a terminal's Ctrl-C: the agent and both ranks), then the
    agent's own SIGINT to the ranks: every rank saves after the same step, and the run resumes."""
    proc = _torchrun(tmp_path, "--steps", "100000", "--log-every", "2", "--ckpt-every", "100000")
    try:
        _wait_for(proc, "step ")
        os.killpg(proc.pid, signal.SIGINT)
        rest = proc.communicate(timeout=60)[0]
    finally:
        os.killpg(proc.pid, signal.SIGKILL) if proc.poll() is None else None
    assert "interrupted after step" in rest, rest
    k = _ckpt(tmp_path)["step"]
    assert _ckpt(tmp_path)["world_size"] == 2 and k >= 2
    proc = _torchrun(tmp_path, "--resume", "--stop-at", str(k + 1))
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0 and f"resumed {tmp_path / 'checkpoint.pt'} at step {k}" in out, out
    assert _ckpt(tmp_path)["step"] == k + 1


@pytest.mark.distributed
def test_a_stalled_rank_ends_the_run_after_dist_timeout_with_a_clear_message(tmp_path):
    """SIGSTOP on rank 1: rank 0's next collective fails after --dist-timeout 5 s with one line."""
    proc = _torchrun(tmp_path, "--steps", "100000", "--log-every", "2", "--ckpt-every", "4", "--dist-timeout", "5")
    try:
        _wait_for(proc, "step ", count=3)  # step 6: step 4's checkpoint is saved
        children = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
        rank1 = [int(p) for p in children if b"\0RANK=1\0" in b"\0" + open(f"/proc/{p}/environ", "rb").read()]
        os.kill(rank1[0], signal.SIGSTOP)
        stopped = time.monotonic()
        line = _wait_for(proc, "python -m swav_core.pretrain: error: ")
        waited = time.monotonic() - stopped
        os.kill(rank1[0], signal.SIGKILL)  # else torchrun waits 30 s for it to end
        proc.communicate(timeout=60)
    finally:
        os.killpg(proc.pid, signal.SIGKILL) if proc.poll() is None else None
    assert 5 <= waited < 30, waited
    assert line.startswith("python -m swav_core.pretrain: error: rank 0: "), line  # gloo's words vary:
    assert "Timed out waiting 5000ms" in line or "timeout caused pair closure" in line, line  # both seen
    assert "(--dist-timeout 5 s): rank 1 stalled or died; the last checkpoint is " in line
    assert checkpoint.load(str(tmp_path / "checkpoint.pt"))["step"] >= 4


def _rank_pid(proc, rank: int) -> int:
    children = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    return [int(p) for p in children if f"\0RANK={rank}\0".encode() in b"\0" + open(f"/proc/{p}/environ", "rb").read()][0]


@pytest.mark.distributed
def test_kill_9_of_one_rank_leaves_the_survivors_line_on_the_terminal(tmp_path):
    """A real kill -9 of rank 1: torchrun sends SIGTERM to rank 0 at once, which must still print its line."""
    proc = _torchrun(tmp_path, "--steps", "100000", "--log-every", "2", "--ckpt-every", "4")
    try:
        _wait_for(proc, "step ", count=3)  # step 6: step 4's checkpoint is saved
        os.kill(_rank_pid(proc, 1), signal.SIGKILL)
        rest = proc.communicate(timeout=60)[0]
    finally:
        os.killpg(proc.pid, signal.SIGKILL) if proc.poll() is None else None
    lines = [line for line in rest.splitlines() if line.startswith("python -m swav_core.pretrain: error: ")]
    assert len(lines) == 1 and lines[0].startswith("python -m swav_core.pretrain: error: rank 0: "), rest
    step = checkpoint.load(str(tmp_path / "checkpoint.pt"))["step"]
    assert lines[0].endswith(f"rank 1 stalled or died; the last checkpoint is {tmp_path / 'checkpoint.pt'} at step "
                             f"{step}") and step >= 4, lines


# --- round two: real faults (issue 18) --------------------------------------------------------------

def test_a_fresh_run_removes_only_its_own_temporary_files(tmp_path):
    out = tmp_path / "n"
    out.mkdir()
    (out / "draft.tmp").write_text("x")  # the user's
    (out / "x.tmp").mkdir()
    (out / "checkpoint.pt.tmp").write_bytes(b"half")  # what a killed job of ours left
    assert _job(out, "--steps", "4") == 0
    assert (out / "draft.tmp").read_text() == "x" and (out / "x.tmp").is_dir()
    assert not (out / "checkpoint.pt.tmp").exists()


def test_flipped_bytes_in_the_checkpoint_are_refused_naming_the_file(tmp_path, capsys):
    import zipfile
    assert _job(tmp_path, "--steps", "12", "--stop-at", "5") == 0
    path = tmp_path / "checkpoint.pt"
    with zipfile.ZipFile(path) as records:  # the largest tensor record: the queue banks' storage
        info = max(records.infolist(), key=lambda i: i.file_size)
        start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    data = bytearray(path.read_bytes())
    data[start + info.file_size // 2] ^= 0x40  # one bit of one float
    path.write_bytes(bytes(data))
    message = _refused(capsys, "--out", str(tmp_path), "--resume")
    assert message.startswith(f"--resume: {path} is damaged: its record {info.filename} fails its CRC-32 check")


@pytest.mark.parametrize("damage", ["garbage", "no header", "binary"])
def test_a_damaged_log_csv_is_one_line_and_the_run_resumes(tmp_path, capsys, damage):
    assert _job(tmp_path, "--steps", "12", "--stop-at", "8") == 0  # rows for steps 4 and 8
    log = tmp_path / "log.csv"
    header, *rows = log.read_text().splitlines()
    damaged = {"garbage": f"{header}\n{rows[0]}\nnot,a,row\n{rows[1]}\n",
               "no header": f"{rows[0]}\n{rows[1]}\n",
               "binary": None}[damage]
    log.write_bytes(bytes((i * 37) % 256 for i in range(600)) if damaged is None else damaged.encode())
    original = log.read_bytes()
    capsys.readouterr()
    assert _job(tmp_path, "--steps", "12", "--resume") == 0
    printed = capsys.readouterr().out
    kept = [] if damage == "binary" else rows
    assert log.read_text().splitlines()[: 1 + len(kept)] == [header, *kept]
    assert [int(r.split(",")[0]) for r in log.read_text().splitlines()[1:]] == [s for s in (4, 8, 12) if
                                                                                  damage != "binary" or s > 8]
    if damage != "no header":  # a lost header alone damages nothing that can be read
        assert f"{log}: " in printed and "damaged line(s) dropped" in printed
        assert (tmp_path / "log.csv.damaged").read_bytes() == original


def test_a_row_cut_short_is_dropped_on_resume(tmp_path):
    assert _job(tmp_path, "--steps", "12", "--stop-at", "8") == 0
    log = tmp_path / "log.csv"
    text = log.read_text()
    log.write_text(text + text.splitlines()[-1][:7])  # a row cut by a full disk or a kill: no line end
    assert _job(tmp_path, "--steps", "12", "--resume") == 0
    assert [r.split(",")[0] for r in log.read_text().splitlines()] == ["step", "4", "8", "12"]
    assert not (tmp_path / "log.csv.damaged").exists()


def test_a_full_disk_while_appending_to_log_csv_says_what_is_on_disk(tmp_path, capsys):
    """A real 32 KiB tmpfs that the user's own file fills but for the lock's and log.csv's pages: log.csv
    fills its page row by row, and the row that needs a second page finds none."""
    with _tmpfs(tmp_path / "small", "32k") as out:
        (out / "mine.bin").write_bytes(b"\0" * 24576)
        message = _failed(capsys, 1, "--out", str(out), *TINY, "--steps", "400", "--log-every", "1",
                          "--ckpt-every", "1000")
        assert message == f"cannot write {out / 'log.csv'}: No space left on device; no checkpoint saved"
        assert (out / "mine.bin").stat().st_size == 24576 and not (out / ".lock").exists()


EDITED = [("lr", -1.0, "expected"), ("log_every", 0, "expected an int >= 1"), ("epsilon", 0.0, "expected"),
          ("seed", "a", "invalid literal"), ("optimizer", "lamb", "expected one of"), ("amp", "yes", "True or False"),
          ("high_scale", (0.5, 0.1), ""), ("widths", "x", ""), ("batch_size", 1, "BatchNorm needs 2 samples")]


@pytest.mark.parametrize("key, value, says", EDITED, ids=[k for k, _, _ in EDITED])
def test_an_edited_checkpoint_config_is_checked_as_the_command_line(tmp_path, capsys, key, value, says):
    assert _job(tmp_path, "--steps", "12", "--stop-at", "5") == 0
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    ckpt["config"][key] = value
    torch.save(ckpt, tmp_path / "checkpoint.pt")
    message = _refused(capsys, "--out", str(tmp_path), "--resume")
    option = "--" + key.replace("_", "-")
    assert message.startswith(f"--resume: {tmp_path / 'checkpoint.pt'} holds an invalid option {option} {value!r}: ")
    assert says in message


def _nan_crops_at(monkeypatch, steps):
    """A low-resolution crop of NaN at the given 0-based steps (as an fp16 overflow or a bad sample would give)."""
    from swav_core import MultiCrop
    real, calls = MultiCrop.__call__, []

    def call(self, x, generator=None):
        high, low = real(self, x, generator=generator)
        calls.append(1)
        if len(calls) - 1 in steps:
            low[0] = torch.full_like(low[0], float("nan"))
        return high, low

    monkeypatch.setattr(MultiCrop, "__call__", call)


def test_a_non_finite_batch_is_skipped_with_one_line_and_counted(tmp_path, capsys, monkeypatch):
    _nan_crops_at(monkeypatch, {2})
    assert _job(tmp_path, "--steps", "8") == 0  # checkpoints at 5 and 8: finite BatchNorm statistics
    printed = capsys.readouterr().out
    assert printed.count("step 3: the crops are not finite (a bad batch): step skipped before the forward "
                         "(1 skipped so far") == 1
    rows = [r.split(",") for r in (tmp_path / "log.csv").read_text().splitlines()]
    column = rows[0].index("skipped")
    assert [r[column] for r in rows[1:]] == ["1", "1"]
    assert _ckpt(tmp_path)["skipped"] == 1


def test_several_bad_batches_in_a_row_stop_the_run(tmp_path, capsys, monkeypatch):
    _nan_crops_at(monkeypatch, {2, 3, 4, 5})
    message = _failed(capsys, 1, "--out", str(tmp_path), *TINY, "--steps", "12")
    assert message.startswith("the crops are not finite at steps 3-6 (NaN or inf in the data")


def _pt_folder(folder, n=64):
    folder.mkdir()
    g = torch.Generator().manual_seed(0)
    for i in range(n):
        torch.save(torch.rand(1, 16, 16, generator=g), folder / f"{i:03d}.pt")
    return folder


def test_a_data_folder_changed_between_sessions_is_refused_and_a_moved_one_accepted(tmp_path, capsys):
    data, out = _pt_folder(tmp_path / "data"), tmp_path / "run"
    assert _job(out, "--data", str(data), "--steps", "8", "--stop-at", "4") == 0
    (data / "010.pt").rename(tmp_path / "010.pt")  # one file gone: 63 samples
    message = _refused(capsys, "--out", str(out), "--resume")
    assert message == f"--resume: --data {str(data)!r} changed since the checkpoint: 010.pt removed; restore it, " \
                      f"or start a new run with --overwrite"
    (tmp_path / "010.pt").rename(data / "010.pt")
    torch.save(torch.rand(1, 16, 16), data / "999.pt")
    assert "999.pt added" in _refused(capsys, "--out", str(out), "--resume")
    (data / "999.pt").unlink()
    moved = data.rename(tmp_path / "moved")
    assert "the --data folder" in _refused(capsys, "--out", str(out), "--resume")  # gone: give its new place
    assert _job(out, "--resume", "--data", str(moved)) == 0
    assert _job(tmp_path / "straight", "--data", str(moved), "--steps", "8") == 0
    _assert_states_equal(_ckpt(tmp_path / "straight")["model"], _ckpt(out)["model"])


@pytest.mark.parametrize("fault", ["deleted", "made NaN", "worker killed"])
def test_a_data_fault_mid_run_is_one_line_after_saving_the_last_good_state(tmp_path, fault):
    """Real faults on a running job: a --data file deleted or overwritten with NaN, or kill -9 of one of its
    DataLoader worker processes; the job saves the state after its last complete step and ends in one line."""
    data, out = _pt_folder(tmp_path / "data"), tmp_path / "run"
    workers = "2" if fault == "worker killed" else "0"
    proc = _start(out, "--data", str(data), "--steps", "2000", "--workers", workers, "--ckpt-every", "1000",
                  stderr=subprocess.PIPE)
    _wait_for(proc, "step    4/2000")
    if fault == "deleted":
        (data / "033.pt").unlink()
    elif fault == "made NaN":
        torch.save(torch.full((1, 16, 16), float("nan")), data / "033.pt")
    else:
        children = open(f"/proc/{proc.pid}/task/{proc.pid}/children").read().split()
        os.kill(int(children[0]), signal.SIGKILL)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, err
    errors = err.strip().splitlines()
    assert len(errors) == 1 and errors[0].startswith("python -m swav_core.pretrain: error: "), err
    expected = {"deleted": f"cannot read {data / '033.pt'}", "made NaN": f"{data / '033.pt'} holds 256 value(s)",
                "worker killed": "a process reading --data died"}[fault]
    assert expected in errors[0], errors[0]
    if "died during a step" in errors[0]:  # the DataLoader noticed the death in the middle of a step
        assert errors[0].endswith("no checkpoint saved")  # (--ckpt-every 1000: none yet)
    else:  # before the step: the state after the last one is saved
        step = int(errors[0].split(" at step ")[1].split(":")[0])
        assert step >= 4 and checkpoint.load(str(out / "checkpoint.pt"))["step"] == step


def test_samples_too_large_for_memory_are_one_line_naming_the_sizes_and_options(tmp_path):
    """A real allocator failure: 512² RGB samples at the default batch of 64 in a process limited to 3 GiB of
    address space (RLIMIT_AS), which the first convolution of the first step exceeds."""
    resource = pytest.importorskip("resource")
    data = tmp_path / "big"
    data.mkdir()
    for i in range(4):
        torch.save(torch.rand(3, 512, 512), data / f"{i}.pt")
    limit = lambda: resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))  # noqa: E731
    done = subprocess.run([sys.executable, "-m", "swav_core.pretrain", "--out", str(tmp_path / "run"), "--data",
                           str(data), "--steps", "3"], preexec_fn=limit, capture_output=True, text=True,
                          env=_env(OMP_NUM_THREADS="1"), timeout=300)
    assert done.returncode == 1 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert done.stderr.startswith("python -m swav_core.pretrain: error: out of memory (one allocation of ")
    assert "GiB failed): samples (3, 512, 512), --batch-size 64 per process, --high-size 512: lower them " \
           "(and --low-size); no checkpoint saved" in done.stderr


@pytest.mark.distributed
def test_a_second_torchrun_job_on_a_locked_folder_is_one_line_and_the_lock_leaves_with_the_run(tmp_path):
    first = _torchrun(tmp_path, "--steps", "100000", "--log-every", "2", "--ckpt-every", "100000")
    try:
        _wait_for(first, "step ")
        second = _torchrun(tmp_path, "--overwrite", "--steps", "100000")
        out = second.communicate(timeout=120)[0]
        lines = [line for line in out.splitlines() if line.startswith("python -m swav_core.pretrain: error: ")]
        assert second.returncode != 0 and len(lines) == 1, out
        assert f"--out {str(tmp_path)!r} is in use by another run (pid " in lines[0]
        os.killpg(first.pid, signal.SIGINT)  # Ctrl-C: the first run saves and ends
        first.communicate(timeout=60)
    finally:
        os.killpg(first.pid, signal.SIGKILL) if first.poll() is None else None
    assert not (tmp_path / ".lock").exists()
