"""The collective helpers: no-ops without a group, real sums and gathers with two gloo processes."""
import pytest
import torch

from swav_core import distributed as D
from distributed_utils import run_distributed


def test_no_group_is_single_process(device):
    x = torch.arange(6.0, device=device).reshape(3, 2)
    assert not D.is_distributed() and D.world_size() == 1 and D.rank() == 0
    assert torch.equal(D.all_reduce_sum_(x.clone()), x)
    assert torch.equal(D.all_reduce_max_(x.clone()), x)
    assert torch.equal(D.all_gather_cat(x), x)


def _collectives(rank, world_size):
    x = torch.full((rank + 2, 3), float(rank + 1))  # unequal lengths: 2 rows, then 3 rows
    summed = D.all_reduce_sum_(torch.ones(4) * (rank + 1))
    maxed = D.all_reduce_max_(torch.tensor([rank, -rank, 5.0]))
    return D.rank(), D.world_size(), summed, maxed, D.all_gather_cat(x)


@pytest.mark.distributed
def test_two_process_sum_and_unequal_gather():
    results = run_distributed(_collectives, 2)
    expected_gather = torch.cat([torch.full((2, 3), 1.0), torch.full((3, 3), 2.0)])
    for r, (rank, ws, summed, maxed, gathered) in enumerate(results):
        assert (rank, ws) == (r, 2)
        assert torch.equal(summed, torch.full((4,), 3.0))
        assert torch.equal(maxed, torch.tensor([1.0, 0.0, 5.0]))
        assert torch.equal(gathered, expected_gather)
