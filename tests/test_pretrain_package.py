"""The package as distributed: the sdist carries its license, the job's console command and every file
its tests need, so pytest collects them in the unpacked sdist."""
import glob
import os
import shutil
import subprocess
import sys
import tarfile

import pytest

from test_pretrain import ROOT

SOURCES = ["setup.cfg", "pyproject.toml", "MANIFEST.in", "LICENSE", "README.md", "swav_core", "tests"]


def _build_sdist(tmp_path) -> str:
    """Build the sdist with setuptools' PEP 517 hook from a copy of the sources (the repo's own
    egg-info stays untouched); return the path of the unpacked sdist."""
    src = tmp_path / "src"
    src.mkdir()
    for name in SOURCES:
        path = os.path.join(ROOT, name)
        if os.path.isdir(path):
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__", ".hypothesis"))
        else:
            shutil.copy(path, src / name)
    build = "import sys; from setuptools import build_meta; print(build_meta.build_sdist(sys.argv[1]))"
    done = subprocess.run([sys.executable, "-c", build, str(tmp_path / "dist")], cwd=src, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    with tarfile.open(tmp_path / "dist" / done.stdout.split()[-1]) as tar:
        tar.extractall(tmp_path / "unpacked", filter="data")
    (unpacked,) = glob.glob(str(tmp_path / "unpacked" / "*"))
    return unpacked


def test_sdist_ships_license_console_command_and_collects_its_tests(tmp_path):
    pytest.importorskip("setuptools", minversion="61")  # the build backend pyproject.toml names
    unpacked = _build_sdist(tmp_path)
    license_text = open(os.path.join(unpacked, "LICENSE")).read()
    assert license_text.startswith("MIT License") and "Copyright (c) 2026 the swav_core authors" in license_text
    entry_points = open(glob.glob(os.path.join(unpacked, "*.egg-info", "entry_points.txt"))[0]).read()
    assert "swav-pretrain = swav_core.pretrain.cli:main" in entry_points
    for helper in ("conftest.py", "strategies.py", "oracles.py", "models.py", "distributed_utils.py"):
        assert os.path.isfile(os.path.join(unpacked, "tests", helper)), helper
    env = {**os.environ, "PYTHONPATH": unpacked}
    where = subprocess.run([sys.executable, "-c", "import swav_core; print(swav_core.__file__)"], cwd=unpacked,
                           env=env, capture_output=True, text=True, timeout=120)
    assert where.stdout.startswith(unpacked), where.stdout  # the sdist's own copy, not this checkout
    done = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider"],
                          cwd=unpacked, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    collected = {line.split("::")[0] for line in done.stdout.splitlines() if "::" in line}
    shipped = {os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "tests", "test_*.py"))}
    assert collected == shipped
