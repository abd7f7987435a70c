"""Training-step throughput, and the cost of everything SwAV adds on top of the backbone.

    python benchmarks/bench_step.py [--device cuda] [--min-run-time 1.0]

Table 1: one whole training step of the job (MultiCrop, backbone, head, prototypes, queues, loss,
backward, AdamW) in crops/s, with one backbone call per crop (fmcib) against
``group_crops_by_resolution=True`` (FAIR: one call per resolution).

Table 2: the SwAV-specific part of a step (forward + backward from backbone features: projection
head, prototypes, queues, Sinkhorn, loss) at fmcib's shapes — 4096 features → 2048 → 128,
K = 3000, two queues of 3840, batch 32, 2 + 6 crops — against a textbook version written below:
head and prototypes called per crop, prototypes normalised through ``.data``, FAIR's shift-register
queue (a full copy each step), FAIR's in-place Sinkhorn, and log_softmax recomputed for every pair.
"""
import argparse
import os
import sys

import torch
import torch.nn.functional as F
from torch import nn

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [_HERE, os.path.dirname(_HERE)]  # common.py, and swav_core from a plain checkout
from common import markdown_table, median_ms  # noqa: E402

from swav_core import MultiCrop, SwaV, SwaVLoss, SwaVProjectionHead  # noqa: E402
from swav_core.pretrain.backbone import SmallCNN  # noqa: E402


# --- the textbook SwAV-specific step ----------------------------------------------------------------

@torch.no_grad()
def textbook_sinkhorn(scores, iterations=3, epsilon=0.05):
    """FAIR's ``distributed_sinkhorn`` on one process: rewrite the K × B matrix every half-iteration."""
    Q = torch.exp(scores / epsilon).t()  # (K, B)
    K, B = Q.shape
    Q /= Q.sum()
    for _ in range(iterations):
        Q /= Q.sum(dim=1, keepdim=True)  # total weight per prototype must be 1/K
        Q /= K
        Q /= Q.sum(dim=0, keepdim=True)  # total weight per sample must be 1/B
        Q /= B
    Q *= B  # columns sum to 1: an assignment per sample
    return Q.t()


class TextbookSwaV(nn.Module):
    """Head and prototypes per crop, FAIR's shift-register queues, per-pair loss."""

    def __init__(self, num_ftrs, out_dim, n_prototypes, queue_length, n_high):
        super().__init__()
        self.projection_head = SwaVProjectionHead(num_ftrs, num_ftrs // 2, out_dim)
        self.prototypes = nn.Linear(out_dim, n_prototypes, bias=False)
        self.register_buffer("queue", torch.randn(n_high, queue_length, out_dim))

    def loss(self, high, low, temperature=0.1):
        with torch.no_grad():  # FAIR normalises the prototypes through .data
            self.prototypes.weight.data = F.normalize(self.prototypes.weight.data, dim=1)
        z = [F.normalize(self.projection_head(x), dim=1) for x in high + low]
        scores = [self.prototypes(zi) for zi in z]  # V × (B, K)
        n_crops, batch, total = len(z), z[0].shape[0], 0.0
        for i in range(len(high)):
            with torch.no_grad():
                queue_scores = self.prototypes(self.queue[i])
                q = textbook_sinkhorn(torch.cat((scores[i].detach(), queue_scores)))[:batch]
                self.queue[i, batch:] = self.queue[i, :-batch].clone()  # shift register: a full copy
                self.queue[i, :batch] = z[i].detach()
            sub = 0.0
            for v in range(n_crops):
                if v != i:
                    sub = sub - torch.mean(torch.sum(q * F.log_softmax(scores[v] / temperature, dim=1), dim=1))
            total = total + sub / (n_crops - 1)
        return total / len(high)


# --- the two tables ----------------------------------------------------------------------------------

def swav_cost_rows(device, min_run_time):
    num_ftrs, out_dim, K, queue_length, batch, n_high, n_low = 4096, 128, 3000, 3840, 32, 2, 6
    torch.manual_seed(0)
    high = [torch.randn(batch, num_ftrs, device=device, requires_grad=True) for _ in range(n_high)]
    low = [torch.randn(batch, num_ftrs, device=device, requires_grad=True) for _ in range(n_low)]
    ours = SwaV(nn.Identity(), num_ftrs, out_dim, K, n_high, queue_length).to(device)
    loss_fn = SwaVLoss()
    base = TextbookSwaV(num_ftrs, out_dim, K, queue_length, n_high).to(device)

    def ours_step():
        h, l, q = ours((high, low), epoch=0, step=0)
        loss_fn(h, l, q).backward()

    def base_step():
        base.loss(high, low).backward()

    for _ in range(queue_length // batch + 1):  # fill our queues: the queued path is the one timed
        with torch.no_grad():
            ours((high, low), epoch=0, step=0)
    if not all(q.is_full for q in ours.queues):
        raise RuntimeError("the queues should be full before timing")
    b, o = median_ms(base_step, device, min_run_time), median_ms(ours_step, device, min_run_time)
    shape = f"B={batch}, {n_high}+{n_low} crops, {num_ftrs}→{num_ftrs // 2}→{out_dim}, K={K}, queues 2×{queue_length}"
    return [{"shape": shape, "textbook ms": b, "swav_core ms": o, "ratio": b / o}]


def throughput_rows(device, min_run_time):
    setups = [  # (name, input shape, crops, backbone widths)
        ("2D job: B=64, 2×32² + 4×16²", (64, 1, 32, 32), MultiCrop(32, 16, 2, 4, (0.3, 1), (0.08, 0.3)), (16, 32, 64, 128)),
        ("3D job: B=32, 2×24³ + 4×12³", (32, 1, 24, 24, 24), MultiCrop(24, 12, 2, 4, (0.3, 1), (0.08, 0.3)), (8, 16, 32, 64)),
        ("3D fmcib crops: B=4, 2×50³ + 6×25³", (4, 1, 50, 50, 50), MultiCrop.fmcib_3d(), (8, 16, 32, 64)),
    ]
    rows = []
    for name, shape, crops, widths in setups:
        x = torch.randn(shape, device=device)
        n_crops = crops.n_high + crops.n_low
        result = {}
        for grouped in (False, True):
            torch.manual_seed(0)
            backbone = SmallCNN(1, len(shape) - 2, widths)
            model = SwaV(backbone, backbone.num_ftrs, 32, 48, 2, 256, group_crops_by_resolution=grouped).to(device)
            opt, loss_fn = torch.optim.AdamW(model.parameters(), 1e-3), SwaVLoss()
            gen = torch.Generator().manual_seed(0)

            def step():
                high, low = crops(x, generator=gen)
                h, l, q = model((high, low), epoch=0, step=0)
                opt.zero_grad(set_to_none=True)
                loss_fn(h, l, q).backward()
                opt.step()

            result[grouped] = shape[0] * n_crops / (median_ms(step, device, min_run_time) / 1e3)
        rows.append({"setup": name, "per-crop crops/s": round(result[False]), "grouped crops/s": round(result[True]),
                     "grouped / per-crop": result[True] / result[False]})
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--min-run-time", type=float, default=1.0, help="seconds per blocked_autorange")
    args = parser.parse_args()
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {name}, torch {torch.__version__}\n")
    print("Training step, one backbone call per crop vs grouped by resolution:\n")
    print(markdown_table(throughput_rows(args.device, args.min_run_time)))
    print("\nSwAV-specific cost (everything but the backbone), forward + backward:\n")
    print(markdown_table(swav_cost_rows(args.device, args.min_run_time)))


if __name__ == "__main__":
    main()
