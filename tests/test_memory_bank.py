"""MemoryBankModule against a ``collections.deque(maxlen=length)`` model of a FIFO queue."""
import collections
import io

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch import nn

from swav_core import MemoryBankModule
from strategies import examples, push_sequences


def _rows(start, b, dim, device):
    """b distinct rows whose first entry is a unique non-zero id (exact in float32)."""
    ids = torch.arange(start, start + b, dtype=torch.float32, device=device)
    return torch.stack([ids * (j + 1) for j in range(dim)], dim=1)  # (b, D)


def _expected(model, dim, device):
    return torch.stack(list(model)) if model else torch.zeros(0, dim, device=device)


def _roundtrip(state, via_bytes):
    if not via_bytes:
        return state
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf)


def _check_against(bank, model, dim, device):
    length = model.maxlen
    if bank.dim is None:  # nothing pushed yet into an int-size queue: D unknown
        assert len(model) == 0 and bank.features().shape == (0, 0) and bank.num_filled == 0
        return
    assert bank.num_filled == len(model)
    assert bank.is_full == (len(model) == length)
    assert torch.equal(bank.features(ordered=True), _expected(model, dim, device))
    unordered = bank.features(ordered=False)
    assert unordered.untyped_storage().data_ptr() == bank.bank.untyped_storage().data_ptr()
    key = lambda t: t[:, 0].argsort()  # noqa: E731 (rows are told apart by their unique id)
    expected = _expected(model, dim, device)
    assert torch.equal(unordered[key(unordered)], expected[key(expected)])
    _, storage = bank(torch.zeros(1, dim, device=device))  # (D, length), slot order
    empty = storage.T[(storage.T != 0).any(dim=1) == 0]
    assert empty.shape[0] == length - len(model)  # every slot without a real row is zero


@settings(max_examples=examples(60))
@given(seq=push_sequences(), cut=st.integers(0, 8), via_bytes=st.booleans(), fixed_dim=st.booleans())
@example(seq=(4, 2, [3, 3, 3]), cut=1, via_bytes=True, fixed_dim=False)  # wrap around, then a restore
@example(seq=(3, 1, [7, 1]), cut=1, via_bytes=False, fixed_dim=False)  # a batch longer than the queue
@example(seq=(5, 3, [0, 5, 2]), cut=2, via_bytes=True, fixed_dim=False)  # empty batch, exact fill
@example(seq=(1, 1, [0]), cut=0, via_bytes=False, fixed_dim=False)  # restore before D is known
@example(seq=(4, 2, [3, 3, 3]), cut=1, via_bytes=True, fixed_dim=True)  # size=(length, D): same cases
@example(seq=(3, 2, [7, 1]), cut=1, via_bytes=False, fixed_dim=True)
@example(seq=(5, 3, [0, 5, 2]), cut=0, via_bytes=True, fixed_dim=True)  # restore an empty queue
def test_ring_buffer_matches_deque(device, seq, cut, via_bytes, fixed_dim):
    length, dim, sizes = seq
    size = (length, dim) if fixed_dim else length  # an int size learns D from the first batch
    bank = MemoryBankModule(size=size).to(device)
    model = collections.deque(maxlen=length)
    next_id = 1
    for i, b in enumerate(sizes):
        if i == cut:  # checkpoint mid-sequence and continue in a fresh module
            restored = MemoryBankModule(size=size).to(device)
            restored.load_state_dict(_roundtrip(bank.state_dict(), via_bytes), strict=True)
            bank = restored
            _check_against(bank, model, dim, device)
        x = _rows(next_id, b, dim, device)
        next_id += b
        bank.push(x)
        model.extend(x.unbind(0))
        _check_against(bank, model, dim, device)


def _push_model(model, pushed, x):
    """The deque after ``push(x)``: a row not finite in the bank's dtype takes its slot's content before the
    push (slot (pushed + i) % length; the oldest row once full, else a zero row)."""
    length = model.maxlen
    before = [x.new_zeros(x.shape[1:])] * length
    for k, row in enumerate(model):  # deque index k ↔ slot (pushed − len + k) % length
        before[(pushed - len(model) + k) % length] = row
    model.extend(row if row.isfinite().all() else before[(pushed + i) % length] for i, row in enumerate(x))


_BAD_VALUES = [float("nan"), float("inf"), -float("inf"), 1e300]  # 1e300: finite in float64, inf once cast


@settings(max_examples=examples(60))
@given(seq=push_sequences(), fixed_dim=st.booleans(), data=st.data())
def test_non_finite_rows_never_enter_the_bank(device, seq, fixed_dim, data):
    length, dim, sizes = seq
    bank = MemoryBankModule(size=(length, dim) if fixed_dim else length).to(device)
    model, pushed = collections.deque(maxlen=length), 0
    for i, b in enumerate(sizes):
        x = _rows(pushed + 1, b, dim, device).double()
        for row in data.draw(st.lists(st.integers(0, b - 1), max_size=b), label=f"bad rows {i}") if b else []:
            x[row, data.draw(st.integers(0, dim - 1))] = data.draw(st.sampled_from(_BAD_VALUES))
        _push_model(model, pushed, x.float())
        bank.push(x)
        pushed += b
        assert bool(bank.bank.isfinite().all())
        assert (bank.num_filled, int(bank.bank_ptr)) == (len(model), pushed % length)
        assert torch.equal(bank.features(), _expected(model, dim, device))


def test_non_finite_rows_pinned(device):
    rows = _rows(1, 5, 2, device)
    rows[1, 0], rows[4, 1] = float("nan"), -float("inf")
    bank = MemoryBankModule(size=(3, 2)).to(device)
    bank.push(rows[:2])  # before full, the bad row's slot keeps its zero and counts as filled
    assert bank.num_filled == 2 and torch.equal(bank.features(), torch.stack([rows[0], torch.zeros_like(rows[0])]))
    full = MemoryBankModule(size=(3, 2)).to(device)
    full.push(_rows(1, 3, 2, device))
    full.push(rows[3:])  # row 3 overwrites the oldest, row 1; row 4 is bad: row 2 survives one more cycle
    assert torch.equal(full.features(), _rows(1, 4, 2, device)[[2, 3, 1]])


def test_unordered_view_follows_later_pushes(device):
    bank = MemoryBankModule(size=(4, 2)).to(device)
    bank.push(_rows(1, 4, 2, device))
    view = bank.features(ordered=False)
    bank.push(_rows(5, 1, 2, device))  # overwrites the oldest slot, 0
    assert torch.equal(view[0], _rows(5, 1, 2, device)[0])  # no copy was made


@pytest.mark.parametrize("feature_dim_first", [True, False])
def test_forward_returns_pre_update_bank(device, feature_dim_first):
    bank = MemoryBankModule(size=5, feature_dim_first=feature_dim_first).to(device)
    first = _rows(1, 3, 2, device)
    out, before = bank(first, labels=torch.zeros(3), update=True)
    assert out is first
    assert torch.equal(before, torch.zeros((2, 5) if feature_dim_first else (5, 2), device=device))
    second = _rows(4, 4, 2, device).requires_grad_()
    _, stored = bank(second, update=True)
    slots = torch.cat([first, torch.zeros(2, 2, device=device)])  # (length, D) before the 2nd push
    assert torch.equal(stored, slots.T if feature_dim_first else slots)
    assert not stored.requires_grad
    bank.push(_rows(100, 5, 2, device))
    assert torch.equal(stored, slots.T if feature_dim_first else slots)  # a copy, not a view


def test_tuple_size_knows_dim_before_first_push(device):
    bank = MemoryBankModule(size=(6, 3)).to(device)
    assert (bank.length, bank.dim, bank.num_filled, bank.is_full) == (6, 3, 0, False)
    assert bank.features().shape == (0, 3)
    _, stored = bank(torch.ones(2, 3, device=device))
    assert torch.equal(stored, torch.zeros(3, 6, device=device))
    assert MemoryBankModule(size=6).dim is None


def test_lightly_state_dict_loads_strict_and_empties_queue(device):
    net = nn.Sequential(nn.Linear(2, 2), MemoryBankModule(size=4)).to(device)
    net[1].push(_rows(1, 3, 2, device))
    lightly_state = {k: v for k, v in net.state_dict().items() if not k.startswith("1.")}
    assert set(lightly_state) == {"0.weight", "0.bias"}
    net.load_state_dict(lightly_state, strict=True)
    assert net[1].num_filled == 0 and not net[1].is_full
    assert torch.equal(net[1].bank, torch.zeros(4, 2, device=device))
    assert torch.equal(net[1].bank_ptr, torch.tensor([0], device=device))


def test_state_dict_is_a_snapshot(device):
    """A state_dict kept while pushes go on still restores the queue as it was when it was taken."""
    bank = MemoryBankModule(size=2).to(device)
    bank.push(torch.ones(2, 2, device=device))
    state = bank.state_dict()
    bank.push(2 * torch.ones(3, 2, device=device))
    restored = MemoryBankModule(size=2).to(device)
    restored.load_state_dict(state)
    assert restored.num_filled == 2
    assert torch.equal(restored.features(), torch.ones(2, 2, device=device))


def test_state_dict_keys_and_errors(device):
    bank = MemoryBankModule(size=(4, 2)).to(device)
    bank.push(_rows(1, 5, 2, device))
    state = bank.state_dict()
    assert set(state) == {"bank", "bank_ptr", "bank_filled", "_extra_state"}  # the last: whose queue (rank 0)
    assert (int(state["bank_ptr"]), int(state["bank_filled"]), int(state["_extra_state"])) == (1, 4, 0)
    without = {k: v for k, v in state.items() if k != "_extra_state"}  # written before the marker: loads strictly
    MemoryBankModule(size=(4, 2)).load_state_dict(without, strict=True)
    with pytest.raises(RuntimeError, match=r"\(4, 2\).*\(4, 3\)"):
        MemoryBankModule(size=(4, 3)).load_state_dict(state)
    with pytest.raises(RuntimeError, match=r"\(4, 2\).*\(5, 'D'\)"):
        MemoryBankModule(size=5).load_state_dict(state)
    with pytest.raises(RuntimeError, match=r'Missing key\(s\) in state_dict: "bank_filled"'):
        MemoryBankModule(size=4).load_state_dict({"bank": state["bank"], "bank_ptr": state["bank_ptr"]})
    bad = dict(state, bank_filled=torch.tensor(2))  # not full, yet the pointer is not at the fill
    with pytest.raises(RuntimeError, match="bank_ptr=1, bank_filled=2"):
        MemoryBankModule(size=4).load_state_dict(bad)


def test_to_casts_storage_and_incoming_features(device):
    bank = MemoryBankModule(size=3).to(device).to(torch.float64)  # before D is known
    bank.push(torch.tensor([[0.1, 0.2]], device=device))  # float32 in
    assert bank.features().dtype == torch.float64
    assert torch.equal(bank.features(), torch.tensor([[0.1, 0.2]], device=device).double())
    bank.half()
    assert bank.features().dtype == torch.float16 and bank.features().device.type == device
    state = bank.state_dict()
    assert state["bank"].dtype == torch.float16
    restored = MemoryBankModule(size=3).to(device)  # float32 module: the checkpoint is cast
    restored.load_state_dict(state)
    assert restored.features().dtype == torch.float32
    assert torch.equal(restored.features(), bank.features().float())


def test_size_zero_disables(device):
    bank = MemoryBankModule(size=0).to(device)
    x = torch.ones(2, 3, device=device)
    out, stored = bank(x, update=True)
    assert out is x and stored is None
    assert bank.num_filled == 0 and not bank.is_full
    with pytest.raises(ValueError, match="disabled"):
        bank.push(x)


@pytest.mark.parametrize("size", [-1, 1.5, True, (3,), (3, 0), (-1, 2), (2, 2.0), "65536", None])
def test_bad_size_raises(size):
    with pytest.raises(ValueError, match=r"size must be .*got"):
        MemoryBankModule(size=size)


def test_numpy_and_tensor_integer_sizes_are_accepted_as_heads_accepts_them(device):
    """The same integers SwaVPrototypes takes (NumPy's, 0-dim integer tensors), stored as ints; bools refused."""
    np = pytest.importorskip("numpy")
    for size, length, dim in [(np.int64(6), 6, None), ((np.int32(6), np.int64(3)), 6, 3), (torch.tensor(6), 6, None)]:
        bank = MemoryBankModule(size=size).to(device)
        bank.push(torch.ones(2, 3, device=device))
        assert (bank.length, type(bank.length), bank.dim, bank.num_filled) == (length, int, 3, 2)
        assert bank.size == ((length, dim) if dim else length)
    with pytest.raises(ValueError, match="size must be"):
        MemoryBankModule(size=np.bool_(True))


def test_bad_batches_raise(device):
    bank = MemoryBankModule(size=(5, 3)).to(device)
    with pytest.raises(ValueError, match=r"push expects features of shape \(B, 3\) to match the bank \(5, 3\), got \(3,\)"):
        bank.push(torch.ones(3, device=device))
    with pytest.raises(ValueError, match=r"\(B, 3\).*\(5, 3\), got \(2, 4\)"):
        bank.push(torch.ones(2, 4, device=device))
    with pytest.raises(ValueError, match=r"forward expects .*\(B, 3\).*got \(2, 1, 3\)"):
        bank(torch.ones(2, 1, 3, device=device), update=True)
    assert bank.num_filled == 0


def test_extra_repr():
    text = repr(MemoryBankModule(size=(10, 4), gather_distributed=True))
    assert "size=(10, 4), gather_distributed=True, feature_dim_first=True" in text


def test_zero_feature_dim_raises(device):
    bank = MemoryBankModule(4).to(device)
    with pytest.raises(ValueError, match=r"push expects features of shape \(B, D\) with D > 0, got \(3, 0\)"):
        bank.push(torch.randn(3, 0, device=device))
    with pytest.raises(ValueError, match=r"forward expects .*D > 0, got \(3, 0\)"):
        bank(torch.randn(3, 0, device=device), update=True)
    assert bank.num_filled == 0 and bank.dim is None


def test_gather_distributed_without_process_group_is_single_process(device):
    bank = MemoryBankModule(size=5, gather_distributed=True).to(device)
    bank.push(_rows(1, 3, 2, device))
    bank(_rows(4, 4, 2, device), update=True)
    assert torch.equal(bank.features(), _rows(3, 5, 2, device))  # the last 5 of rows 1..7


# ---- lightly's public attributes and subclassing -------------------------------------------------
def test_lightly_bank_and_bank_ptr(device):
    """lightly 1.6: ``bank`` the (length, D) storage itself, ``bank_ptr`` a (1,) long tensor; neither
    is a buffer DDP would broadcast, and the pointer is read-only."""
    mb = MemoryBankModule(size=(4, 2)).to(device)
    x = _rows(1, 2, 2, device)
    mb(x, update=True)
    assert mb.bank.shape == (4, 2) and mb.bank.dtype == torch.float32 and mb.bank.device.type == device
    assert torch.equal(mb.bank, torch.cat([x, torch.zeros(2, 2, device=device)]))
    assert mb.bank_ptr.dtype == torch.long and torch.equal(mb.bank_ptr, torch.tensor([2], device=device))
    storage, pointer = mb.bank.untyped_storage().data_ptr(), mb.bank_ptr
    mb.push(_rows(3, 3, 2, device))  # rows 3, 4, 5 into slots 2, 3, then 0
    assert mb.bank.untyped_storage().data_ptr() == storage  # written in place: reading it copies nothing
    assert mb.bank_ptr is pointer  # one tensor, refilled in place by every push: no copy per read
    assert torch.equal(mb.bank, _rows(1, 5, 2, device)[[4, 1, 2, 3]])
    assert torch.equal(mb.bank_ptr, torch.tensor([1], device=device))
    assert list(mb.buffers()) == [] and list(mb.parameters()) == []
    with pytest.raises(AttributeError):
        mb.bank_ptr = torch.tensor([0])
    assert MemoryBankModule(size=3).bank.shape == (3, 0)  # an int size: D comes with the first batch


class _NegativesLoss(MemoryBankModule):
    """A loss that subclasses the memory bank as lightly's contrastive losses do."""

    def __init__(self, memory_bank_size):
        super().__init__(size=memory_bank_size)

    def forward(self, out0, out1):
        out1, negatives = super().forward(out1, update=True)  # (D, length), before this batch
        return out0 @ negatives  # (B, length): similarities to the stored rows


def test_loss_subclass_calls_super_forward_as_in_lightly(device):
    loss = _NegativesLoss(memory_bank_size=(4, 2)).to(device)
    model = collections.deque(maxlen=4)
    for step in range(3):
        out1 = _rows(1 + 3 * step, 3, 2, device)
        negatives = loss(torch.eye(2, device=device), out1).T  # (length, D), slot order, zeros where empty
        stored, expected = negatives[negatives[:, 0] != 0], _expected(model, 2, device)
        assert torch.equal(stored[stored[:, 0].argsort()], expected[expected[:, 0].argsort()])
        model.extend(out1.unbind(0))
        assert torch.equal(loss.features(), torch.stack(list(model)))
        assert int(loss.bank_ptr) == 3 * (step + 1) % 4
    assert set(loss.state_dict()) == {"bank", "bank_ptr", "bank_filled", "_extra_state"}
