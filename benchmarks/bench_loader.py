"""The job's data path for a ``--data`` folder: lazy (files read per batch) against in memory.

    python benchmarks/bench_loader.py [--sample 1,32,32,32] [--batch-size 32] [--multiples 8,32,64]

For folders of ``multiple × batch-size`` float32 files, one child process per (folder, path) reads
one epoch of the job's batches (``swav_core.pretrain.data.batches``, the training loop's order) and
reports its peak resident memory (``resource.getrusage`` maxrss, worker processes included), its
start-up time (lazy: one pass over the files for shape, dtype and finite float values; in memory: reading
and stacking every file) and its throughput. ``import torch`` alone is the memory baseline. Files
are read from the page cache (just written); a cold disk is slower for both paths alike.
Baseline, the in-memory path: the job's behaviour before the lazy loader (``load_folder``).
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [_HERE, os.path.dirname(_HERE)]  # common.py, and swav_core from a plain checkout

PATHS = {"torch only": None, "in memory": 0, "lazy, workers 0": 0, "lazy, workers 2": 2}


def child(path: str, folder: str, batch_size: int) -> dict:
    """One epoch of ``path`` over ``folder`` in this process; the measurements as a dict."""
    import torch
    from swav_core.pretrain.data import FolderDataset, Order, batches, load_folder

    out = {}
    if path != "torch only":
        t0 = time.perf_counter()
        train = load_folder(folder) if path == "in memory" else FolderDataset(folder)
        t1 = time.perf_counter()
        steps = len(train) // batch_size
        total = sum(float(x.sum()) for x in batches(train, Order(batch_size, 0), range(steps), workers=PATHS[path]))
        t2 = time.perf_counter()
        assert torch.isfinite(torch.tensor(total))
        out = {"start s": t1 - t0, "samples/s": steps * batch_size / (t2 - t1)}
    kib = max(resource.getrusage(who).ru_maxrss for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    return {**out, "peak RSS MiB": kib / 1024}


def _write_folder(folder: str, n: int, shape) -> None:
    import torch
    g = torch.Generator().manual_seed(0)
    for i in range(n):
        torch.save(torch.rand(shape, generator=g), os.path.join(folder, f"{i:06d}.pt"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sample", default="1,32,32,32", help="one file's shape (C,H,W) or (C,D,H,W)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--multiples", default="8,32,64", help="folder sizes, in batches")
    p.add_argument("--child", nargs=2, metavar=("PATH", "FOLDER"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], args.child[1], args.batch_size)))
        return
    import torch
    from common import markdown_table

    shape = tuple(int(s) for s in args.sample.split(","))
    mib = torch.Size(shape).numel() * 4 / 2**20
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, files of {shape} float32 ({mib * 1024:.0f} KiB), "
          f"B = {args.batch_size}, one epoch per row, one process per row")
    rows = []
    for multiple in (int(m) for m in args.multiples.split(",")):
        n = multiple * args.batch_size
        with tempfile.TemporaryDirectory() as folder:
            _write_folder(folder, n, shape)
            for path in PATHS:
                cmd = [sys.executable, __file__, "--batch-size", str(args.batch_size), "--child", path, folder]
                result = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)
                rows.append({"files": n, "data MiB": n * mib, "path": path, **{k: result.get(k, "") for k in
                             ("peak RSS MiB", "start s", "samples/s")}})
                print(markdown_table(rows[-1:]).splitlines()[-1], flush=True)
    print()
    print(markdown_table(rows))


if __name__ == "__main__":
    main()
