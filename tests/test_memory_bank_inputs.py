"""MemoryBankModule under inference mode, on its own rows, and with bad or partial checkpoints."""
import collections
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from swav_core import MemoryBankModule
from strategies import examples, push_sequences
from test_memory_bank import _check_against, _rows

_KEYS = ("bank", "bank_ptr", "bank_filled")


# ---- inference mode ------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [4, (4, 2)])
@pytest.mark.parametrize("first", ["init", "push", "forward", "load_state_dict", "double"])
def test_storage_made_under_inference_mode_takes_pushes_after(device, size, first):
    """A validation pass under torch.inference_mode() may be the first to touch the queue."""
    rows = _rows(1, 3, 2, device)
    saved = MemoryBankModule(size=size).to(device)
    saved.push(rows)
    bank = None if first == "init" else MemoryBankModule(size=size).to(device)
    with torch.inference_mode():
        if first == "init":
            bank = MemoryBankModule(size=size).to(device)
        elif first == "push":
            bank.push(rows)
        elif first == "forward":
            bank(rows, update=True)
        elif first == "load_state_dict":
            bank.load_state_dict(saved.state_dict())  # an inference-mode snapshot, too
        else:
            bank.double()
    model = collections.deque([] if first in ("init", "double") else rows.unbind(0), maxlen=4)
    assert not bank.bank.is_inference()
    for step in range(3):  # training steps, outside inference mode
        x = _rows(10 + 3 * step, 3, 2, device)
        bank.push(x)
        model.extend(x.unbind(0))
        _, stored = bank(x)
    assert torch.equal(bank.features().float(), torch.stack(list(model)))
    assert stored.shape == (2, 4)


@pytest.mark.parametrize("size", [5, (5, 2)])
def test_pushes_alternating_with_inference_mode(device, size):
    bank = MemoryBankModule(size=size).to(device)
    model = collections.deque(maxlen=5)
    for step, inference in enumerate([False, True, True, False, True, False]):
        with torch.inference_mode(inference):
            x = _rows(1 + 3 * step, 3, 2, device)  # an inference tensor on inference steps
            if step % 2:
                bank(x, update=True)
            else:
                bank.push(x)
        model.extend(x.unbind(0))
        _check_against(bank, model, 2, device)
    assert not bank.bank.is_inference()
    w = torch.ones(2, 3, device=device, requires_grad=True)
    (bank.features(ordered=False) @ w).sum().backward()  # the storage still works with autograd
    assert torch.equal(w.grad, bank.features().sum(0, keepdim=True).T.expand(2, 3))


# ---- pushing the queue's own rows ----------------------------------------------------------------
@settings(max_examples=examples(40))
@given(seq=push_sequences(min_batch=1), fixed_dim=st.booleans(), data=st.data())
def test_pushing_own_rows_matches_deque(device, seq, fixed_dim, data):
    """push(features(ordered=False)[a:b]) reads rows the write overwrites: it must see them as they were."""
    length, dim, sizes = seq
    bank = MemoryBankModule(size=(length, dim) if fixed_dim else length).to(device)
    model = collections.deque(maxlen=length)
    next_id = 1
    for b in sizes:
        own = bank.num_filled > 0 and data.draw(st.booleans(), label="own rows")
        if own:
            lo = data.draw(st.integers(0, bank.num_filled), label="lo")
            hi = data.draw(st.integers(lo, bank.num_filled), label="hi")
            ordered = data.draw(st.booleans(), label="ordered")
            x = bank.features(ordered=ordered)[lo:hi]  # a view of the storage when unordered
        else:
            x, next_id = _rows(next_id, b, dim, device), next_id + b
        model.extend(x.clone().unbind(0))  # the rows as they are before the push
        bank.push(x)
        _check_against(bank, model, dim, device)


def test_push_own_storage_pinned_cases(device):
    bank = MemoryBankModule(size=(4, 2)).to(device)
    bank.push(_rows(1, 6, 2, device))  # wrapped: slots hold rows 5, 6, 3, 4
    bank.push(bank.features(ordered=False))  # the audit's case
    assert torch.equal(bank.features(), _rows(1, 6, 2, device)[[4, 5, 2, 3]])
    bank.push(bank.bank[1::2])  # strided, overlapping the slots it writes: rows 4 and 6
    assert torch.equal(bank.features(), _rows(1, 6, 2, device)[[2, 3, 3, 5]])
    alias = torch.from_dlpack(bank.bank[1:])  # the same memory through another storage object
    assert alias.untyped_storage().data_ptr() != bank.bank.untyped_storage().data_ptr()
    expected = torch.cat([bank.features(), alias.clone()])[-4:]  # slots 1..3 of (3, 4, 4, 6), pushed
    bank.push(alias)
    assert torch.equal(bank.features(), expected)


# ---- checkpoints ---------------------------------------------------------------------------------
_BAD = [  # (key, value, what the error says after the key)
    ("bank_ptr", torch.tensor([1, 2]), " must be a 0-dim integer tensor, got tensor([1, 2]) (shape (2,), "),
    ("bank_ptr", torch.tensor(1.7),
     " must be a 0-dim integer tensor, got tensor(1.7000) (shape (), dtype torch.float32)"),
    ("bank_filled", torch.tensor(1.2), " must be a 0-dim integer tensor, got tensor(1.2000)"),
    ("bank_filled", torch.tensor([[4]]),
     " must be a 0-dim integer tensor, got tensor([[4]]) (shape (1, 1), "),
    ("bank_filled", torch.tensor(True),
     " must be a 0-dim integer tensor, got tensor(True) (shape (), dtype torch.bool"),
    ("bank_ptr", 1, " must be a 0-dim integer tensor, got 1 (int)"),
    ("bank_ptr", torch.tensor(4), "=4 is out of range: expected 0..3 (queue length 4)"),
    ("bank_ptr", torch.tensor(-1), "=-1 is out of range: expected 0..3 (queue length 4)"),
    ("bank_filled", torch.tensor(5), "=5 is out of range: expected 0..4 (queue length 4)"),
]


@pytest.mark.parametrize("key, value, message", _BAD, ids=[f"{k}-{i}" for i, (k, _, _) in enumerate(_BAD)])
def test_bad_counters_raise_and_leave_queue_alone(device, key, value, message):
    net = nn.Sequential(MemoryBankModule(size=(4, 2))).to(device)
    net[0].push(_rows(1, 5, 2, device))  # full: bank_ptr=1, bank_filled=4
    state = dict(net.state_dict(), **{"0." + key: value})
    with pytest.raises(RuntimeError, match=re.escape(f"0.{key}{message}")):
        net.load_state_dict(state)
    assert (int(net[0].bank_ptr), net[0].num_filled) == (1, 4)
    assert torch.equal(net[0].features(), _rows(2, 4, 2, device))


def test_both_bad_counters_reported(device):
    state = dict(MemoryBankModule(size=3).to(device).state_dict(), bank=torch.zeros(3, 2, device=device),
                 bank_ptr=torch.tensor(1.5), bank_filled=torch.tensor(9))
    with pytest.raises(RuntimeError, match=r"(?s)bank_ptr must be .*tensor\(1.5000\).*bank_filled=9 is out"):
        MemoryBankModule(size=3).load_state_dict(state)


@pytest.mark.parametrize("size", [4, (4, 2)])
@pytest.mark.parametrize("keep", [("bank",), ("bank", "bank_ptr"), ("bank_ptr", "bank_filled")])
def test_partial_queue_state_is_missing_keys(device, size, keep):
    """PyTorch's convention: strict=True raises naming the absent keys; strict=False lists them in
    missing_keys and the queue starts empty (a state_dict with none of the keys is lightly's, no error)."""
    net = nn.Sequential(nn.Linear(2, 2), MemoryBankModule(size=size)).to(device)
    net[1].push(_rows(1, 3, 2, device))
    partial = {k: v for k, v in net.state_dict().items() if not k.startswith("1.") or k[2:] in keep}
    absent = [f"1.{k}" for k in _KEYS if k not in keep]
    missing = ", ".join(f'"{k}"' for k in absent)
    with pytest.raises(RuntimeError, match=re.escape(f"Missing key(s) in state_dict: {missing}.")):
        net.load_state_dict(partial, strict=True)
    net[1].push(_rows(1, 3, 2, device))
    result = net.load_state_dict(partial, strict=False)
    assert result.missing_keys == absent and result.unexpected_keys == []
    assert (net[1].num_filled, int(net[1].bank_ptr), net[1].is_full) == (0, 0, False)
    assert torch.equal(net[1].bank, torch.zeros(4, 2, device=device))
    net[1].push(_rows(7, 2, 2, device))  # and it goes on as a fresh queue
    assert torch.equal(net[1].features(), _rows(7, 2, 2, device))


def test_a_loaded_bank_with_non_finite_rows_is_refused_and_leaves_the_queue_alone(device):
    """As a pushed row that is not finite never enters the queue, a saved one is refused at load."""
    net = nn.Sequential(MemoryBankModule(size=(4, 2))).to(device)
    net[0].push(_rows(1, 5, 2, device))
    state = net.state_dict()
    bad = state["0.bank"].clone()
    bad[2, 1] = float("nan")
    bad[3, 0] = float("-inf")
    with pytest.raises(RuntimeError, match=re.escape("0.bank holds rows that are not finite (NaN or ±inf), "
                                                     "e.g. [2, 3]: a queue takes finite rows only")):
        net.load_state_dict(dict(state, **{"0.bank": bad}))
    assert torch.equal(net[0].features(), _rows(2, 4, 2, device))
