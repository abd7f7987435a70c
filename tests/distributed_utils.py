"""Run a function in two real processes joined by a gloo process group on the CPU.

``run_distributed(fn, world_size, *args)`` spawns ``world_size`` processes; each initialises the
default group, calls ``fn(rank, world_size, *args)`` and returns a picklable result (tensors are
fine). The results come back as a list indexed by rank; an exception on any rank fails the caller
with that rank's traceback. ``fn`` must be defined at module level so the spawned child can import it.
"""
import gc
import os
import socket
import tempfile
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

TIMEOUT_S = 180


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world_size, port, out_dir, fn, args):
    torch.set_num_threads(1)
    try:
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size
        )
        result = fn(rank, world_size, *args)
        torch.save({"ok": True, "result": result}, os.path.join(out_dir, f"{rank}.pt"))
    except BaseException:  # report every failure, including assertion errors, to the parent
        torch.save({"ok": False, "error": traceback.format_exc()}, os.path.join(out_dir, f"{rank}.pt"))
    finally:
        if dist.is_initialized():
            gc.collect()  # DDP's reducer and its gloo work freed before the group, not at exit (SIGABRT)
            dist.destroy_process_group()


def run_distributed(fn, world_size=2, *args):
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as out_dir:
        port = _free_port()
        procs = [
            ctx.Process(target=_worker, args=(r, world_size, port, out_dir, fn, args))
            for r in range(world_size)
        ]
        for p in procs:
            p.start()
        for p in procs:
            p.join(TIMEOUT_S)
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
        payloads = []
        for r in range(world_size):
            path = os.path.join(out_dir, f"{r}.pt")
            if not os.path.exists(path):
                raise RuntimeError(f"rank {r} produced no result (timed out or crashed)")
            payloads.append(torch.load(path, weights_only=False))
        failed = [(r, p["error"]) for r, p in enumerate(payloads) if not p["ok"]]
        if failed:  # the cause first: a rank that failed on its own, not because its peer was gone
            r, error = min(failed, key=lambda f: "closed by peer" in f[1])
            raise AssertionError(f"rank {r} failed:\n{error}")
        return [p["result"] for p in payloads]
