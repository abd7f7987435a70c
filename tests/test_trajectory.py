"""Trajectory oracle: ``SwaV(group_crops_by_resolution=True)`` + ``SwaVLoss`` trained for 30 steps follow,
step for step, a textbook SwAV loop written here from the paper (Caron et al. 2020, §3.1 and appendix A)
and FAIR's original training script, which does not call swav_core.

Compared after every step: the loss, every parameter and BatchNorm buffer, prototype ``.grad`` (None)
and bit-identical prototypes while frozen, the step at which the queue is first used, and the queue
contents as a set of rows. float64 runs agree to 1e-9 (only summation order differs); float32 runs are
held to a multiple of the textbook's own float32-vs-float64 drift (see ``FLOAT32_FACTOR``).
"""
import copy

import torch
import torch.nn.functional as F
from torch import nn

from oracles import textbook_native
from swav_core import SwaV, SwaVLoss

BATCH, N_HIGH, N_LOW, HIGH, LOW = 8, 2, 2, 12, 6  # 2 × 12² + 2 × 6² crops of 8 samples
NUM_FTRS, OUT_DIM, K = 16, 8, 12  # backbone width, D, prototypes
TAU, EPSILON, ITERATIONS = 0.1, 0.05, 3
# A multiple of B, as FAIR's script makes it (with a remainder, FAIR's shift register would keep the
# first rows of the oldest batch, our row FIFO its last rows): full after 3 pushes, used from step 3.
QUEUE_LENGTH = 3 * BATCH
N_FROZEN = 5
STEPS, STEPS_PER_EPOCH = 30, 5
START_EPOCH = 2  # start_queue_at_epoch of the second test
SGD = dict(lr=0.1, momentum=0.9, weight_decay=1e-3)
FLOAT64_TOL = 1e-9
# float32: at every step our run may be off the exact (float64 textbook) trajectory by at most
# FLOAT32_FACTOR times the largest error of the textbook's own float32 run so far (loss and state
# apart). Both are float32 evaluations of the same arithmetic in different orders, so their rounding
# errors are of one size and are amplified alike along the trajectory (from ~1e-6 at step 0 to ~1e-4
# at step 30 on the CPU, where ours stays within 1.6x of the textbook's). A factor 4 leaves room for
# that and still rejects a systematic error: a 1% temperature error moves the loss by ~5e-2.
FLOAT32_FACTOR = 4.0


# ---- the textbook loop -----------------------------------------------------------------------------


def textbook_run(backbone, head, prototypes, crops, *, queue_born=0, queue_used_from=0):
    """FAIR's ``train()`` loop, step by step; yields ``(loss, queue_used, queues)`` after every step.

    ``head`` is Linear(no bias) → BatchNorm1d → ReLU → Linear, ``prototypes`` a Linear(D, K, bias=False).
    The queue (one per high-resolution crop, a shift register newest-first, zero rows empty) is created
    at step ``queue_born``; it is used once full and from step ``queue_used_from`` on.
    """
    params = [*backbone.parameters(), *head.parameters(), *prototypes.parameters()]
    optimizer = torch.optim.SGD(params, **SGD)
    queue = None
    for step, (high, low) in enumerate(crops):
        with torch.no_grad():  # prototypes on the unit sphere at the start of every iteration
            prototypes.weight.copy_(F.normalize(prototypes.weight, dim=1))
        views = high + low
        cuts = [0] + [v for v in range(1, len(views)) if views[v].shape != views[v - 1].shape]
        cuts.append(len(views))  # one backbone call per run of same-resolution crops
        h = torch.cat([backbone(torch.cat(views[a:e])).flatten(1) for a, e in zip(cuts, cuts[1:])])
        z = F.normalize(head(h), dim=1)  # (V·B, D), one head call on all crops
        scores = prototypes(z)  # (V·B, K)
        if queue is None and step >= queue_born:
            queue = torch.zeros(len(high), QUEUE_LENGTH, z.shape[1], dtype=z.dtype, device=z.device)
        loss, used, n_crops, b = 0.0, False, len(views), high[0].shape[0]
        for i in range(len(high)):
            with torch.no_grad():
                s = scores[i * b : (i + 1) * b]  # (B, K)
                if queue is not None and step >= queue_used_from and queue[i, -1].any():
                    s, used = torch.cat([s, prototypes(queue[i])]), True  # (B + L, K)
                q = textbook_native(s, EPSILON, ITERATIONS)[:b]  # codes of this batch only
                if queue is not None:  # shift in the new features, dropping the oldest batch
                    queue[i, b:] = queue[i, :-b].clone()
                    queue[i, :b] = z[i * b : (i + 1) * b]
            subloss = 0.0
            for v in range(n_crops):
                if v != i:
                    log_p = F.log_softmax(scores[v * b : (v + 1) * b] / TAU, dim=1)
                    subloss = subloss - (q * log_p).sum(dim=1).mean()
            loss = loss + subloss / (n_crops - 1)
        loss = loss / len(high)
        optimizer.zero_grad()
        loss.backward()
        if step < N_FROZEN:
            prototypes.weight.grad = None  # FAIR: "cancel gradients for the prototypes"
        optimizer.step()
        yield loss.item(), used, None if queue is None else [x[x.any(dim=1)] for x in queue]


# ---- the same run with swav_core ----------------------------------------------------------------


def swav_core_run(model, crops, epoch_of):
    """Yields ``(loss, queue_used, queues, prototype_grad_is_none)`` after every step."""
    criterion = SwaVLoss(temperature=TAU, sinkhorn_iterations=ITERATIONS, sinkhorn_epsilon=EPSILON)
    optimizer = torch.optim.SGD(model.parameters(), **SGD)
    weight = model.prototypes.heads[0].weight
    for step, (high, low) in enumerate(crops):
        high_scores, low_scores, queue_scores = model((high, low), epoch=epoch_of(step), step=step)
        loss = criterion(high_scores, low_scores, queue_scores)
        optimizer.zero_grad()
        loss.backward()
        grad_is_none = weight.grad is None
        optimizer.step()
        yield loss.item(), queue_scores is not None, [q.features() for q in model.queues], grad_is_none


# ---- set-up and comparison --------------------------------------------------------------------


def make_crops(device, dtype, steps):
    g = torch.Generator().manual_seed(1)

    def crop(size):
        return torch.randn(BATCH, 3, size, size, generator=g).to(device, dtype)

    return [([crop(HIGH) for _ in range(N_HIGH)], [crop(LOW) for _ in range(N_LOW)]) for _ in range(steps)]


def initial_model(start_queue_at_epoch=0):
    torch.manual_seed(0)
    backbone = nn.Sequential(
        nn.Conv2d(3, NUM_FTRS, 3), nn.BatchNorm2d(NUM_FTRS), nn.ReLU(), nn.AdaptiveAvgPool2d(1)
    )
    return SwaV(
        backbone, NUM_FTRS, OUT_DIM, K, n_queues=N_HIGH, queue_length=QUEUE_LENGTH,
        start_queue_at_epoch=start_queue_at_epoch, n_steps_frozen_prototypes=N_FROZEN,
        group_crops_by_resolution=True,
    )


def textbook_modules(model):
    """The textbook's backbone, head and prototypes, holding ``model``'s weights."""
    head = nn.Sequential(
        nn.Linear(NUM_FTRS, NUM_FTRS // 2, bias=False), nn.BatchNorm1d(NUM_FTRS // 2), nn.ReLU(),
        nn.Linear(NUM_FTRS // 2, OUT_DIM),
    )
    head_state = {k.removeprefix("layers."): v for k, v in model.projection_head.state_dict().items()}
    head.load_state_dict(head_state)
    prototypes = nn.Linear(OUT_DIM, K, bias=False)
    prototypes.weight.data.copy_(model.prototypes.heads[0].weight.data)
    return copy.deepcopy(model.backbone), head, prototypes


def textbook_state(backbone, head, prototypes):
    return {
        **{f"backbone.{k}": v for k, v in backbone.state_dict().items()},
        **{f"head.{k}": v for k, v in head.state_dict().items()},
        "prototypes": prototypes.weight,
    }


def model_state(model):
    head_state = model.projection_head.state_dict()  # keys layers.* (SPEC §2)
    return {
        **{f"backbone.{k}": v for k, v in model.backbone.state_dict().items()},
        **{f"head.{k.removeprefix('layers.')}": v for k, v in head_state.items()},
        "prototypes": model.prototypes.heads[0].weight,
    }


def row_set_gap(x, y):
    """Distance between two sets of rows: the farthest any row of one is from every row of the other
    (max-abs per pair); infinite when they hold different numbers of rows."""
    if x.shape != y.shape:
        return float("inf")
    if len(x) == 0:
        return 0.0
    d = (x.double().cpu()[:, None] - y.double().cpu()[None]).abs().amax(dim=2)  # (n, n) pairwise
    return max(d.amin(dim=0).max().item(), d.amin(dim=1).max().item())


def max_gap(a, b):
    """Largest absolute difference between two ``{name: tensor}`` snapshots (queues compared as sets
    of rows), or between two losses."""
    if isinstance(a, float):
        return abs(a - b)
    assert a.keys() == b.keys(), (sorted(a), sorted(b))
    return max(
        row_set_gap(a[k], b[k]) if k.startswith("queue")
        else (a[k].double().cpu() - b[k].double().cpu()).abs().max().item()
        for k in a
    )


def run_pair(device, dtype, steps=STEPS, start_queue_at_epoch=0, **textbook_queue):
    """Ours and the textbook from the same float32 initial weights on the same crops: per step, a dict
    with the loss, whether the queue was used, and a snapshot of every parameter, buffer and queue."""
    model = initial_model(start_queue_at_epoch)
    backbone, head, prototypes = (m.to(device, dtype) for m in textbook_modules(model))
    model = model.to(device, dtype)
    crops = make_crops(device, dtype, steps)
    ours_run = swav_core_run(model, crops, epoch_of=lambda step: step // STEPS_PER_EPOCH)
    textbook = textbook_run(backbone, head, prototypes, crops, **textbook_queue)
    ours, theirs = [], []
    for (loss, used, queues, grad_is_none), (t_loss, t_used, t_queues) in zip(ours_run, textbook):
        state = {k: v.detach().clone() for k, v in model_state(model).items()}
        t_state = {k: v.detach().clone() for k, v in textbook_state(backbone, head, prototypes).items()}
        if textbook_queue.get("queue_born", 0) == 0:  # else the textbook's queue holds fewer rows
            state.update({f"queue.{i}": q.clone() for i, q in enumerate(queues)})
            t_state.update({f"queue.{i}": q.clone() for i, q in enumerate(t_queues)})
        ours.append(dict(loss=loss, used=used, state=state, grad_is_none=grad_is_none))
        theirs.append(dict(loss=t_loss, used=t_used, state=t_state))
    return ours, theirs


def first_use(run):
    return [r["used"] for r in run].index(True)


def check_freezing(ours):
    """Prototype .grad None and prototypes bit-identical while step < N_FROZEN; they train after."""
    frozen = ours[0]["state"]["prototypes"]
    for step, r in enumerate(ours):
        if step < N_FROZEN:
            assert r["grad_is_none"], f"prototype .grad is not None at frozen step {step}"
            assert torch.equal(r["state"]["prototypes"], frozen), f"prototypes moved at frozen step {step}"
        else:
            assert not r["grad_is_none"], f"prototype .grad is None at step {step} >= {N_FROZEN}"
            assert not torch.equal(r["state"]["prototypes"], ours[step - 1]["state"]["prototypes"])


def test_training_follows_the_textbook_loop(device):
    """30 steps from the same weights on the same crops, in float64 and float32, against the textbook."""
    ours64, textbook64 = run_pair(device, torch.float64)
    ours32, textbook32 = run_pair(device, torch.float32)
    first = first_use(ours64), first_use(textbook64)
    assert first == (QUEUE_LENGTH // BATCH,) * 2, f"queue first used at steps {first} (ours, textbook)"
    assert [r["used"] for r in ours32] == [r["used"] for r in textbook64] == [r["used"] for r in ours64]
    check_freezing(ours64)
    check_freezing(ours32)
    worst = {"float64": 0.0, "float32": 0.0, "float32 drift": 0.0}
    drift = {"loss": 0.0, "state": 0.0}  # the textbook's own float32 error so far
    for step in range(STEPS):
        exact = textbook64[step]
        for what in ("loss", "state"):
            gap64 = max_gap(ours64[step][what], exact[what])
            assert gap64 <= FLOAT64_TOL, f"step {step}: float64 {what} off the textbook by {gap64:.2e}"
            drift[what] = max(drift[what], max_gap(textbook32[step][what], exact[what]))
            gap32 = max_gap(ours32[step][what], exact[what])
            assert gap32 <= FLOAT32_FACTOR * drift[what], (
                f"step {step}: float32 {what} off the float64 textbook by {gap32:.2e}, "
                f"{gap32 / drift[what]:.1f} x the textbook's own float32 drift {drift[what]:.2e}"
            )
            worst["float64"] = max(worst["float64"], gap64)
            worst["float32"] = max(worst["float32"], gap32)
            worst["float32 drift"] = max(worst["float32 drift"], drift[what])
    print(f"\n{device}: largest gaps over {STEPS} steps:", {k: f"{v:.2e}" for k, v in worst.items()})


def test_queue_from_an_epoch_fills_from_step_zero(device):
    """With ``start_queue_at_epoch = 2`` (epoch = step // 5) our queues fill from step 0 and are used at
    step 10, the first step of epoch 2 (fmcib's semantics). The textbook loop with its queue filled from
    step 0 and used from step 10 on is the same run; FAIR's loop, which creates its queue only at epoch
    2, uses it QUEUE_LENGTH // BATCH = 3 steps later (step 13), and the two runs part at step 10."""
    start = START_EPOCH * STEPS_PER_EPOCH
    steps = start + QUEUE_LENGTH // BATCH + 1
    ours, filled_early = run_pair(device, torch.float64, steps, START_EPOCH, queue_used_from=start)
    _, created_late = run_pair(
        device, torch.float64, steps, START_EPOCH, queue_born=start, queue_used_from=start
    )
    first = first_use(ours), first_use(filled_early), first_use(created_late)
    assert first == (start, start, start + QUEUE_LENGTH // BATCH), f"queue first used at steps {first}"
    for step in range(steps):
        for what in ("loss", "state"):
            gap = max_gap(ours[step][what], filled_early[step][what])
            assert gap <= FLOAT64_TOL, f"step {step}: {what} off the textbook by {gap:.2e}"
        late_gap = abs(ours[step]["loss"] - created_late[step]["loss"])
        assert (late_gap <= FLOAT64_TOL) == (step < start), (step, late_gap)
