"""Each vendoring set of the README, copied alone into an empty folder as a package, imports and runs
every docstring example of its files with only torch and einops (swav_core itself, the test tools and
lightly are blocked from import)."""
import pathlib
import shutil
import subprocess
import sys
import textwrap

SOURCE = pathlib.Path(__file__).resolve().parents[1] / "swav_core"

# The README's "Vendoring" table: a feature and the files to copy for it.
SETS = {
    "sinkhorn": ["sinkhorn.py"],
    "loss": ["loss.py", "sinkhorn.py"],
    "memory_bank": ["memory_bank.py"],
    "heads": ["heads.py"],
    "multicrop": ["multicrop.py"],
    "model": ["model.py", "heads.py", "memory_bank.py"],
    "health": ["health.py"],
}

RUNNER = textwrap.dedent(
    """
    import doctest, importlib, importlib.abc, importlib.util, sys
    BLOCKED = {"swav_core", "hypothesis", "pytest", "lightly", "torchvision"}

    class Refuse(importlib.abc.Loader):
        def create_module(self, spec):
            return None

        def exec_module(self, module):
            raise ImportError(f"vendored code must not import {module.__name__}")

    class Block(importlib.abc.MetaPathFinder):  # torch may look for them (torch._dynamo does), not import them
        def find_spec(self, name, path, target=None):
            if name.split(".")[0] in BLOCKED:
                return importlib.util.spec_from_loader(name, Refuse())

    sys.meta_path.insert(0, Block())
    sys.path.insert(0, sys.argv[2])  # -I: no PYTHONPATH, no current folder
    import torch
    torch.set_default_device(sys.argv[1])
    for package, files in SETS.items():
        ran = 0
        try:
            for file in files:
                module = importlib.import_module(f"vendor_{package}.{file[:-3]}")
                for test in doctest.DocTestFinder().find(module):
                    globs = {**vars(module), "torch": torch, "nn": torch.nn}
                    for example in test.examples:
                        exec(compile(example.source, test.name, "exec"), globs)
                        ran += 1
        except Exception as error:
            ran = f"{type(error).__name__}: {error}"
        print(package, ran, sep="\t")
    """
)


def test_every_vendoring_set_runs_alone(tmp_path, device):
    for package, files in SETS.items():
        folder = tmp_path / f"vendor_{package}"
        folder.mkdir()
        (folder / "__init__.py").write_text("")
        for file in files:
            shutil.copy(SOURCE / file, folder / file)
    script = f"SETS = {SETS!r}\n" + RUNNER
    result = subprocess.run([sys.executable, "-I", "-c", script, device, str(tmp_path)], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ran = dict(line.split("\t") for line in result.stdout.splitlines())
    assert set(ran) == set(SETS)
    failed = {package: n for package, n in ran.items() if not n.isdigit() or int(n) == 0}
    assert not failed, failed  # every set has examples, and they all ran
