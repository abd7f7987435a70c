"""Cost of one queue step: MemoryBankModule's ring buffer against two textbook FIFO queues.

Baselines, written here and timed in the same run:
  * shift register (FAIR's swav): move the first ``length - B`` rows down by B, write the batch on top;
  * clone-per-step ring (lightly's bank): clone the whole bank (the copy its forward returns), then
    write the batch in place at the pointer.
Both copy O(length) rows per step; the ring buffer writes O(B). The second table compares reading the
stored rows for scoring: ``features(ordered=False)`` (a view) against a clone of the bank.

    python benchmarks/bench_memory_bank.py [--device cuda] [--min-run-time 0.5]
"""
import argparse
import os
import sys

import torch
from torch.utils.benchmark import Timer

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # a plain checkout
from swav_core import MemoryBankModule  # noqa: E402

B, D = 256, 128
LENGTHS = (3840, 65536)


class ShiftRegister:
    def __init__(self, length, device):
        self.bank = torch.zeros(length, D, device=device)

    def push(self, x):
        b = x.shape[0]
        self.bank[b:] = self.bank[:-b].clone()  # every stored row moves down by B
        self.bank[:b] = x


class ClonePerStepRing:
    def __init__(self, length, device):
        self.bank = torch.zeros(length, D, device=device)
        self.ptr = 0

    def push(self, x):
        returned = self.bank.clone()  # the detached copy handed to the caller each step
        b = x.shape[0]
        self.bank[self.ptr : self.ptr + b] = x
        self.ptr = (self.ptr + b) % self.bank.shape[0]
        return returned


def median_ms(stmt, env, min_run_time):
    return Timer(stmt, globals=env).blocked_autorange(min_run_time=min_run_time).median * 1e3


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--min-run-time", type=float, default=0.5)
    args = parser.parse_args()
    x = torch.randn(B, D, device=args.device)

    print(f"push of a ({B}, {D}) batch, device={args.device}, median ms per push\n")
    print("| length | baseline | baseline ms | ours ms | ratio |")
    print("| --- | --- | --- | --- | --- |")
    ours_by_length = {}
    for length in LENGTHS:
        queue = MemoryBankModule(size=(length, D)).to(args.device)
        ours = median_ms("queue.push(x)", dict(queue=queue, x=x), args.min_run_time)
        ours_by_length[length] = ours
        baselines = (
            ("shift register (FAIR)", ShiftRegister),
            ("clone-per-step ring (lightly)", ClonePerStepRing),
        )
        for name, cls in baselines:
            base = median_ms("q.push(x)", dict(q=cls(length, args.device), x=x), args.min_run_time)
            print(f"| {length} | {name} | {base:.4f} | {ours:.4f} | {base / ours:.1f}× |")
    lo, hi = LENGTHS
    print(f"\nours at {hi} / ours at {lo}: {ours_by_length[hi] / ours_by_length[lo]:.2f}×")

    print("\nreading the stored rows for scoring, median ms\n")
    print("| length | baseline | baseline ms | ours ms | ratio |")
    print("| --- | --- | --- | --- | --- |")
    for length in LENGTHS:
        queue = MemoryBankModule(size=(length, D)).to(args.device)
        queue.push(torch.randn(length, D, device=args.device))
        ours = median_ms("queue.features(ordered=False)", dict(queue=queue), args.min_run_time)
        base = median_ms("bank.clone()", dict(bank=queue.features(ordered=False)), args.min_run_time)
        name = "clone of the bank (lightly forward)"
        print(f"| {length} | {name} | {base:.4f} | {ours:.4f} | {base / ours:.1f}× |")


if __name__ == "__main__":
    main()
