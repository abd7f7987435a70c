"""sinkhorn() and SwaVLoss under torch.compile and across two gloo processes (gather_distributed),
and the gather as a no-op without a process group. The spawned workers stay at module level here."""
import pytest
import torch

from distributed_utils import run_distributed
from oracles import (assert_matches_oracle, cosine_scores, exact_fp64, far_pair_scores, make_crops, per_pair_oracle,
                     textbook_fp64)
from swav_core import SwaVLoss, sinkhorn

# ---- torch.compile ------------------------------------------------------------------------------


def test_compile_fullgraph_matches_eager(device):
    """One small shape (compiling takes ~20 s on a CPU): no graph break, same codes as eager, also
    for a second ε (which recent torch traces as a symbolic float, and older torch recompiles for)."""
    torch._dynamo.reset()  # the same compilations on every device, whatever ran before in this process
    compiled = torch.compile(sinkhorn, fullgraph=True)
    scores = cosine_scores(24, 10, device)
    for epsilon in (0.05, 0.1):
        expected = sinkhorn(scores, 3, epsilon)
        torch.testing.assert_close(compiled(scores, 3, epsilon), expected, rtol=1e-5, atol=1e-9)


def test_compile_matches_eager(device):
    high, low, queue = make_crops(2, 2, 6, 8, [10, 10], 0, device)
    high = [z.requires_grad_() for z in high]
    eager = SwaVLoss()(high, low, queue)
    eager_grads = torch.autograd.grad(eager, high)
    compiled = torch.compile(SwaVLoss())(high, low, queue)
    compiled_grads = torch.autograd.grad(compiled, high)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
    for a, b in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def test_compiled_swav_training_compiles_a_bounded_number_of_times_and_matches_eager(device):
    """torch.compile(model) of a SwaV with queues and frozen prototypes: the queue bookkeeping and the
    argument checks run eagerly (graph breaks), the step becomes symbolic after one recompilation, and
    nothing compiles again over 12 steps (the queue fills at step 4, the prototypes unfreeze at step 3);
    losses, frozen prototypes and queues as in eager."""
    from torch import nn
    from torch._dynamo.utils import counters
    from swav_core import SwaV

    def trained(compile_it: bool):
        torch.manual_seed(0)
        backbone = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1))
        model = SwaV(backbone, 8, 6, 10, n_queues=2, queue_length=16, n_steps_frozen_prototypes=3).to(device)
        net = torch.compile(model) if compile_it else model
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.1)
        log = []
        for step in range(12):
            g = torch.Generator().manual_seed(step)
            crops = ([torch.randn(4, 3, 10, 10, generator=g).to(device) for _ in range(2)],
                     [torch.randn(4, 3, 6, 6, generator=g).to(device)])
            before = model.prototypes.heads[0].weight.detach().clone()
            loss = SwaVLoss()(*net(crops, epoch=0, step=step))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            moved = not torch.equal(before, model.prototypes.heads[0].weight)
            log.append((loss.detach(), moved, counters["stats"]["unique_graphs"]))
        return log, [q.features() for q in model.queues]

    torch._dynamo.reset()
    counters.clear()
    (compiled, queues), (eager, eager_queues) = trained(True), trained(False)
    graphs = [g for _, _, g in compiled]
    assert graphs[2:] == [graphs[2]] * 10 and graphs[2] <= 8, graphs  # no compilation after step 1
    assert [m for _, m, _ in compiled] == [m for _, m, _ in eager] == [True] + [False] * 2 + [True] * 9
    torch.testing.assert_close(torch.stack([l for l, _, _ in compiled]), torch.stack([l for l, _, _ in eager]),
                               rtol=1e-4, atol=1e-5)
    for a, b in zip(queues, eager_queues):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


# ---- distributed: two gloo processes ------------------------------------------------------------


SETTINGS = [(3, 0.05), (5, 0.01), (0, 0.05)]


def _gathered_codes(rank, world_size, scores, sizes):
    start = sum(sizes[:rank])
    local = scores[start : start + sizes[rank]]  # this rank's batch
    return [sinkhorn(local, t, eps, gather_distributed=True) for t, eps in SETTINGS]


@pytest.mark.distributed
@pytest.mark.parametrize("sizes", [(7, 7), (3, 11)], ids=["equal", "unequal"])
def test_gathered_equals_single_process_on_concatenation(sizes):
    scores = cosine_scores(sum(sizes), 13, "cpu", seed=sum(sizes))
    scores[:, 4] -= 1.5  # a prototype far from every sample, on both ranks
    per_rank = run_distributed(_gathered_codes, 2, scores, sizes)
    for j, (iterations, epsilon) in enumerate(SETTINGS):
        gathered = torch.cat([codes[j] for codes in per_rank])
        torch.testing.assert_close(gathered, sinkhorn(scores, iterations, epsilon), rtol=1e-5, atol=1e-12)
        if iterations:
            assert_matches_oracle(gathered, textbook_fp64(scores, iterations, epsilon))


def _gathered_far_pair_codes(rank, world_size, scores, sizes):
    start = sum(sizes[:rank])
    return sinkhorn(scores[start : start + sizes[rank]], 30, 0.01, gather_distributed=True)


@pytest.mark.distributed
def test_gathered_log_domain_fallback_equals_single_process():
    """When v spans beyond float32 (30 rounds at ε = 0.01, a far prototype), every rank hands over
    to the log-domain Sinkhorn together and still gets its rows of the concatenation's codes."""
    sizes = (2, 4)
    scores = far_pair_scores(batch=sum(sizes), prototypes=64)  # hands over from ~15 rounds
    gathered = torch.cat(run_distributed(_gathered_far_pair_codes, 2, scores, sizes))
    assert_matches_oracle(gathered, exact_fp64(scores, 30, 0.01))
    torch.testing.assert_close(gathered, sinkhorn(scores, 30, 0.01), rtol=1e-5, atol=1e-12)


def _codes_with_nan_on_rank_one(rank, world_size, scores):
    local = scores[rank * 4 : rank * 4 + 4].clone()
    if rank == 1:
        local[1, 2] = float("nan")
    try:
        sinkhorn(local, 3, 0.05, gather_distributed=True)
    except ValueError as error:
        return str(error)
    return None


@pytest.mark.distributed
def test_non_finite_scores_on_one_rank_raise_on_every_rank():
    """No rank hangs in a collective and none goes on with codes: each raises, and says whose scores."""
    messages = run_distributed(_codes_with_nan_on_rank_one, 2, cosine_scores(8, 5, "cpu"))
    assert messages[0].startswith("sinkhorn: another rank's scores are not finite")
    assert messages[1].startswith("sinkhorn: out must be finite: got NaN or +inf scores")


def test_gather_without_process_group_is_single_process(device):
    scores = cosine_scores(9, 5, device)
    assert torch.equal(sinkhorn(scores, gather_distributed=True), sinkhorn(scores))


def _rank_loss(rank, world_size, high, low, queue, sizes):
    rows = slice(sum(sizes[:rank]), sum(sizes[: rank + 1]))
    local_queue = [x[rank * 4 : rank * 4 + 4] for x in queue]  # each rank has its own queue rows
    loss_fn = SwaVLoss(sinkhorn_gather_distributed=True)
    return loss_fn([z[rows] for z in high], [z[rows] for z in low], local_queue)


@pytest.mark.distributed
@pytest.mark.parametrize("sizes", [(5, 5), (2, 7)], ids=["equal", "unequal"])
def test_gathered_codes_equal_single_process_codes(sizes):
    """Each rank's loss uses its rows of the codes of all ranks' batches and queues concatenated."""
    batch = sum(sizes)
    high, low, queue = make_crops(2, 3, batch, 11, [8, 8], batch, "cpu")
    losses = run_distributed(_rank_loss, 2, high, low, queue, sizes)
    for rank, loss in enumerate(losses):
        rows = slice(sum(sizes[:rank]), sum(sizes[: rank + 1]))

        def codes(i):  # single process: the textbook on every rank's (batch, queue) concatenated
            parts = [high[i][:sizes[0]], queue[i][:4], high[i][sizes[0]:], queue[i][4:]]
            q = textbook_fp64(torch.cat(parts))
            return torch.cat([q[: sizes[0]], q[sizes[0] + 4 : batch + 4]])[rows]

        expected = per_pair_oracle([z[rows] for z in high], [z[rows] for z in low], codes=codes)
        torch.testing.assert_close(loss.double(), expected.double(), rtol=1e-5, atol=1e-6)
