"""The README's examples and commands run as written."""
import os
import pathlib
import re
import shlex
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def test_readme_python_examples_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)
    assert blocks, "README.md has no Python example"
    for block in blocks:
        exec(compile(block, str(README), "exec"), {"__name__": "readme_example"})


def _commands():
    """Every command of the README's ```bash blocks, in order, without comments; `a && b` as two."""
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S):
        for line in block.splitlines():
            line = line.split(" #")[0].strip()
            lines += [part.strip() for part in line.split("&&") if part.strip()]
    return lines


def _free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.distributed
def test_readme_commands_run_in_order_on_a_fresh_clone(tmp_path):
    """The install and test lines are the ones .ci/run runs (this test is part of them); every job command
    then runs in that order in a fresh copy of the package with no runs/ folder, as written plus
    `--stop-at 2` (a real option: the run stops after 2 steps and saves, as the full one would at its end),
    so that two commands sharing an --out collide here as they would for a reader."""
    commands = _commands()
    ci = [line.split(" #")[0].replace("python -m pip", "pip").replace(" --quiet", "").strip()
          for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    setup = [c for c in commands if c.startswith(("pip ", "python -m pytest"))]
    assert setup == ["pip install torch==2.13.0", 'pip install -e ".[test]"', "python -m pytest -q"]
    assert [line for line in ci if line.startswith(("pip ", "python -m pytest"))] == setup
    jobs = [c for c in commands if c not in setup]
    assert jobs and all(c.startswith(("python -m swav_core.pretrain", "torchrun ")) for c in jobs), jobs
    shutil.copytree(ROOT / "swav_core", tmp_path / "swav_core", ignore=shutil.ignore_patterns("__pycache__"))
    env = {**os.environ, "PET_MASTER_PORT": str(_free_port()), "PYTHONPATH": str(tmp_path)}
    for command in jobs:
        argv = shlex.split(command)
        argv[0] = sys.executable if argv[0] == "python" else shutil.which(argv[0]) or argv[0]
        done = subprocess.run(argv + ["--stop-at", "2"], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, (command, done.stderr[-2000:])
        assert "stopped after step 2 (--stop-at)" in done.stdout, (command, done.stdout)
