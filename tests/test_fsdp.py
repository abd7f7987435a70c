"""SwaV under FSDP2 (``fully_shard``) and torch.distributed.checkpoint, against DDP (2 gloo processes).

The oracle is DDP with default arguments on the same data: for every wrapping a user can write (the root
alone; backbone, head and prototype units under the root; ``reshard_after_forward`` either way) the loss,
the parameters and each rank's queue must match it at every step, frozen prototypes must stay
bit-identical, and the stored prototypes (the sharded parameters the optimizer updates) must be unit-norm
after every forward. Ranks hold batches of 4 and 6, so their queues fill at different steps.
"""
import os
import tempfile

import pytest
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from distributed_utils import run_distributed
from oracles import assert_matches_oracle, textbook_fp64
from swav_core import SwaV, SwaVLoss, sinkhorn

fsdp = pytest.importorskip("torch.distributed.fsdp", reason="this torch has no FSDP2")
if not hasattr(fsdp, "fully_shard"):
    pytest.skip("this torch has no FSDP2 (torch.distributed.fsdp.fully_shard)", allow_module_level=True)

FROZEN, STEPS, QUEUE, K = 3, 9, 16, 10
BATCH = (4, 6)  # per rank: rank 1's queues are full after 3 steps, rank 0's after 4
WRAPPINGS = ["root", "root-keep", "units", "units-keep", "prototypes+root"]


def _model() -> SwaV:
    torch.manual_seed(0)  # the same initialisation on every rank and in every wrapping
    backbone = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1))
    return SwaV(backbone, 8, 6, K, n_queues=2, queue_length=QUEUE, n_steps_frozen_prototypes=FROZEN)


def _wrap(model: SwaV, wrapping: str, **policy):
    from torch.distributed.fsdp import fully_shard
    if wrapping == "ddp":
        return DistributedDataParallel(model)
    if policy:  # BatchNorm keeps float32 parameters (its running statistics are float32): own units
        for bn in [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]:
            fully_shard(bn)
    keep = {"reshard_after_forward": False} if wrapping.endswith("-keep") else {}
    if wrapping.startswith("units"):
        for unit in (model.backbone, model.projection_head, model.prototypes):
            fully_shard(unit, **keep, **policy)
    if wrapping == "prototypes+root":
        fully_shard(model.prototypes, **policy)
    return fully_shard(model, **keep, **policy)


def _full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if type(t).__name__ == "DTensor" else t).detach().clone()


def _crops(rank: int, step: int):
    g = torch.Generator().manual_seed(1000 * rank + step)  # each rank its own data
    b = BATCH[rank]
    return [torch.randn(b, 3, 10, 10, generator=g) for _ in range(2)], [torch.randn(b, 3, 6, 6, generator=g)]


def _train(rank, world_size, wrapping, policy=None):
    """Train ``STEPS`` steps; per step: loss, parameters (gathered), queues, prototype facts."""
    model = _model()
    net = _wrap(model, wrapping, **({"mp_policy": policy} if policy else {}))
    optimizer = torch.optim.AdamW(net.parameters(), lr=0.05, weight_decay=0.1)  # decay would turn zero grads
    loss_fn = SwaVLoss(sinkhorn_gather_distributed=True)
    weight = lambda: model.prototypes.heads[0].weight  # noqa: E731 (the stored parameter, sharded or not)
    log = []
    for step in range(STEPS):
        high, low = _crops(rank, step)
        before = _full(weight())
        h, l, q = net((high, low), epoch=0, step=step)
        loss = loss_fn(h, l, q)
        optimizer.zero_grad()
        loss.backward()
        stored = _full(weight())  # resharded: normalised where the optimizer updates it
        grad_none = weight().grad is None
        optimizer.step()
        log.append({
            "loss": loss.detach(), "queue_used": q is not None, "scores_dtype": h[0].dtype,
            "codes_dtype": sinkhorn(h[0].detach(), gather_distributed=True).dtype,
            "norms": torch.linalg.vector_norm(stored, dim=1), "stored_dtype": weight().dtype,
            "before": before, "after": _full(weight()), "grad_none": grad_none,
            "params": {k: _full(v) for k, v in model.named_parameters()},
            "queues": [queue.features() for queue in model.queues],
        })
    return log


def _gap(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def _check_frozen_and_unit_norm(log) -> None:
    for step, row in enumerate(log):
        assert (row["norms"] - 1).abs().max() < 1e-6, f"step {step}: stored prototypes not unit-norm"
        if step < FROZEN:
            assert row["grad_none"], f"step {step}: frozen prototypes got a gradient"
            if step > 0:  # step 0 normalises the initial prototypes
                assert torch.equal(row["after"], row["before"]), f"step {step}: frozen prototypes moved"
        else:
            assert not row["grad_none"] and not torch.equal(row["after"], row["before"])


def _all_wrappings(rank, world_size):
    return {w: _train(rank, world_size, w) for w in ["ddp"] + WRAPPINGS}


@pytest.mark.distributed
def test_every_fsdp2_wrapping_trains_as_ddp():
    """Loss, parameters and queues equal DDP's at every step (float rounding), no hang for ranks of
    unequal batch sizes whose queues fill at different steps, prototypes frozen and unit-norm."""
    results = run_distributed(_all_wrappings, 2)
    gaps = {}
    for rank, runs in enumerate(results):
        ddp = runs["ddp"]
        first = next(step for step, row in enumerate(ddp) if row["queue_used"])
        assert first == (4 if BATCH[rank] == 4 else 3)  # the queues fill at different steps per rank
        for wrapping in WRAPPINGS:
            log = runs[wrapping]
            _check_frozen_and_unit_norm(log)
            assert [r["queue_used"] for r in log] == [r["queue_used"] for r in ddp]
            loss = max(_gap(r["loss"], d["loss"]) for r, d in zip(log, ddp))
            params = max(_gap(r["params"][k], d["params"][k]) for r, d in zip(log, ddp) for k in d["params"])
            queues = max(_gap(a, b) for r, d in zip(log, ddp) for a, b in zip(r["queues"], d["queues"]))
            gaps[wrapping, rank] = (loss, params, queues)
            assert loss < 1e-5 and params < 1e-5 and queues < 1e-5, (wrapping, rank, loss, params, queues)
    print("largest gaps to DDP (loss, parameters, queues):", gaps)


def _bf16(rank, world_size):
    from torch.distributed.fsdp import MixedPrecisionPolicy
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return {w: _train(rank, world_size, w, policy) for w in ("root", "prototypes+root")}


@pytest.mark.distributed
def test_bf16_policy_keeps_prototypes_normalised_and_frozen_in_float32():
    for runs in run_distributed(_bf16, 2):
        for wrapping, log in runs.items():
            _check_frozen_and_unit_norm(log)
            assert all(r["stored_dtype"] == torch.float32 for r in log)
            assert all(r["scores_dtype"] == torch.bfloat16 for r in log)  # computed in the policy's dtype
            assert all(r["codes_dtype"] == torch.float32 for r in log)  # Sinkhorn in float32
            assert all(r["loss"].dtype == torch.float32 and torch.isfinite(r["loss"]) for r in log)
            assert any(r["queue_used"] for r in log)


# ---- torch.distributed.checkpoint ----------------------------------------------------------------
def _trained(rank: int, wrapping: str, steps: int = 5):
    """A SwaV trained ``steps`` steps (frozen for the first 3) under ``wrapping``: its own queues per rank."""
    model = _model()
    net = model if wrapping == "none" else _wrap(model, wrapping)
    optimizer = torch.optim.AdamW(net.parameters(), lr=0.05, weight_decay=0.1)
    loss_fn = SwaVLoss(sinkhorn_gather_distributed=True)
    for step in range(steps):
        optimizer.zero_grad()
        loss_fn(*net(_crops(rank, step), epoch=0, step=step)).backward()
        optimizer.step()
    return model, net, optimizer, loss_fn


def _state(model: SwaV):
    return {k: _full(v) for k, v in model.named_parameters()}, [q.features() for q in model.queues]


def _equal_state(a, b) -> bool:
    return a[0].keys() == b[0].keys() and all(torch.equal(a[0][k], b[0][k]) for k in a[0]) and all(
        torch.equal(x, y) for x, y in zip(a[1], b[1]))


def _dcp_round_trips(rank, world_size, folder):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         set_model_state_dict)
    out = {}
    for wrapping in ("none", "ddp", "root", "prototypes+root"):
        model, net, _, _ = _trained(rank, wrapping)
        saved = _state(model)
        assert all(len(q) == QUEUE for q in saved[1])  # full, and each rank's own rows
        # get/set_model_state_dict, each rank its own dict; set into DDP's module (its "module." prefix is
        # put back on parameters and buffers only: DDP itself refuses the queue keys, with strict=True)
        for options in (StateDictOptions(), StateDictOptions(full_state_dict=True)):
            state = get_model_state_dict(net, options=options)  # full: gathered; the queues of all ranks
            fresh = _model()
            fresh_net = fresh if wrapping == "none" else _wrap(fresh, wrapping)
            if wrapping == "ddp":
                with pytest.raises(RuntimeError, match=r'Unexpected key\(s\) in state_dict: "queues.0.bank"'):
                    set_model_state_dict(fresh_net, dict(state), options=options)
                fresh_net = fresh_net.module
            set_model_state_dict(fresh_net, state, options=options)
            out[wrapping, "full" if options.full_state_dict else "get/set"] = _equal_state(_state(fresh), saved)
        # DCP, sharded or not: each rank's queue state is its row of a (W, ...) tensor, and comes back to it
        # ("none" trains other parameters on each rank, which DCP takes for replicated: not a use of it)
        if wrapping == "none":
            continue
        path = os.path.join(folder, wrapping)
        dcp.save({"model": get_model_state_dict(net)}, checkpoint_id=path)
        fresh = _model()
        fresh_net = fresh if wrapping == "none" else _wrap(fresh, wrapping)
        state = {"model": get_model_state_dict(fresh_net)}
        dcp.load(state, checkpoint_id=path)
        set_model_state_dict(fresh_net.module if wrapping == "ddp" else fresh_net, state["model"])
        out[wrapping, "dcp"] = _equal_state(_state(fresh), saved)
        if wrapping == "ddp":  # a template of plain tensors (one rank's kind of state) is refused, not swapped
            plain = {k: v.as_subclass(torch.Tensor) for k, v in get_model_state_dict(fresh_net).items()}
            with pytest.raises(dcp.api.CheckpointException, match=r"Size mismatch between saved torch.Size\(\[2, "):
                dcp.load({"model": plain}, checkpoint_id=path)
    return out


@pytest.mark.distributed
def test_distributed_checkpoint_gives_each_rank_its_own_queues():
    with tempfile.TemporaryDirectory() as folder:
        for rank, out in enumerate(run_distributed(_dcp_round_trips, 2, folder)):
            assert out and all(out.values()), (rank, out)


def _broadcast_from_rank0(rank, world_size):
    """set_model_state_dict(full_state_dict=True, broadcast_from_rank0=True) sends rank 0's state only: rank 0 gets
    its own queues back, every other rank refuses in one error naming the option, instead of starting empty."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict
    out = {}
    for wrapping in ("ddp", "root"):
        model, net, _, _ = _trained(rank, wrapping)
        full = get_model_state_dict(net, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        fresh = _model()
        fresh_net = fresh.to(torch.device("cpu")) if wrapping == "ddp" else _wrap(fresh, wrapping)
        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
        try:
            set_model_state_dict(fresh_net, full if rank == 0 else {}, options=options)
            error = None
        except RuntimeError as e:  # raised by load_state_dict after the broadcast: no collective is left half-done
            error = str(e)
        same = _equal_state(_state(fresh), _state(model))  # on every rank: gathering a sharded parameter is a collective
        out[wrapping] = error or same
    return out


@pytest.mark.distributed
def test_broadcast_from_rank0_refuses_on_the_ranks_whose_queues_it_cannot_send():
    rank0, rank1 = run_distributed(_broadcast_from_rank0, 2)
    assert rank0 == {"ddp": True, "root": True}, rank0
    for wrapping, message in rank1.items():
        assert "queues.0.: no queue state but rank 0's marker: set_model_state_dict(..., broadcast_from_rank0=True)" \
            in message, (wrapping, message)


def _resume_during_frozen_steps(rank, world_size, folder):
    """Save model and optimizer with DCP after 2 of 3 frozen steps, load them into a new model and
    optimizer, train on: the losses equal an uninterrupted run's, bit for bit."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import DefaultLoadPlanner
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    def steps(net, optimizer, loss_fn, first, last):
        losses = []
        for step in range(first, last):
            optimizer.zero_grad()
            loss = loss_fn(*net(_crops(rank, step), epoch=0, step=step))
            loss.backward()
            optimizer.step()
            losses.append(loss.detach())
        return losses

    model, net, optimizer, loss_fn = _trained(rank, "root", steps=2)
    model_state, optim_state = get_state_dict(net, optimizer)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=folder)
    straight = steps(net, optimizer, loss_fn, 2, 7)

    model = _model()
    net = _wrap(model, "root")
    optimizer = torch.optim.AdamW(net.parameters(), lr=0.05, weight_decay=0.1)
    model_state, optim_state = get_state_dict(net, optimizer)  # the template holds every parameter's state
    state = {"model": model_state, "optim": optim_state}
    with pytest.raises(CheckpointException, match="Missing key in checkpoint state_dict: optim.state.prototypes"):
        dcp.load(state, checkpoint_id=folder)
    dcp.load(state, checkpoint_id=folder, planner=DefaultLoadPlanner(allow_partial_load=True))
    set_state_dict(net, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    for p in model.prototypes.parameters():  # frozen: no state yet, as in the run that was saved
        optimizer.state.pop(p, None)
    resumed = steps(net, optimizer, loss_fn, 2, 7)
    return straight, resumed


@pytest.mark.distributed
def test_dcp_resume_during_frozen_steps_continues_exactly():
    with tempfile.TemporaryDirectory() as folder:
        for straight, resumed in run_distributed(_resume_during_frozen_steps, 2, folder):
            assert torch.equal(torch.stack(straight), torch.stack(resumed))


def _readme_example(rank, world_size, folder):
    import pathlib
    import re
    text = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    step_example = re.findall(r"```python\n(.*?)```", text, flags=re.S)[0]
    fsdp_example = re.findall(r"```python fsdp\n(.*?)```", text, flags=re.S)[0]
    torch.manual_seed(0)  # the same model and training on every rank, as FSDP2 needs
    namespace = {"__name__": "readme_example"}
    exec(compile(step_example, "README.md", "exec"), namespace)
    for queue in namespace["model"].queues:  # then each rank its own queue
        queue.push(torch.full((queue.length, queue.dim), float(rank + 1)))
    before = [queue.features() for queue in namespace["model"].queues]
    namespace["folder"] = folder
    exec(compile(fsdp_example, "README.md", "exec"), namespace)
    assert type(namespace["model_state"]["queues.0.bank"]).__name__ == "_RankRow"  # DCP: each rank's row
    return all(torch.equal(a, q.features()) for a, q in zip(before, namespace["model"].queues))


@pytest.mark.distributed
def test_readme_fsdp_example_runs_as_written_and_keeps_each_ranks_queues():
    with tempfile.TemporaryDirectory() as folder:
        assert run_distributed(_readme_example, 2, folder) == [True, True]


def _eval_codes(rank, world_size):
    model = _model()
    net = _wrap(model, "prototypes+root").eval()  # BatchNorm on its running statistics: per sample
    with torch.no_grad():
        high, _, _ = net(_crops(rank, 0))
    return sinkhorn(high[0], gather_distributed=True)


@pytest.mark.distributed
def test_sharded_codes_of_unequal_batches_equal_one_process_on_their_concatenation():
    codes = run_distributed(_eval_codes, 2)
    model = _model().eval()
    with torch.no_grad():
        (high, _), (high_1, _) = _crops(0, 0), _crops(1, 0)
        scores, _, _ = model(([torch.cat([high[0], high_1[0]])] * 2, []))
    assert_matches_oracle(torch.cat(codes), textbook_fp64(scores[0]))  # the fp64 textbook on all rows
    assert [len(c) for c in codes] == list(BATCH)
