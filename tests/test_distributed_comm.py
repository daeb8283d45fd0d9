"""subq.distributed's collectives on gloo: values, gradients and the bytes each rank counts as sent."""

import pytest
import torch

from dist_support import run_ranks
from subq.distributed import _comm


def _collectives(rank, world):
    group = torch.distributed.group.WORLD
    torch.manual_seed(rank)
    x = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    weights = torch.arange(1.0, world + 1, dtype=torch.float64)[:, None, None] * (rank + 1)
    out = {}
    with _comm.counting_bytes() as sent:
        gathered = _comm.all_gather(x, group)
        (gathered * weights).sum().backward()
    out["gather"] = (gathered.detach(), x.detach(), x.grad.clone(), sent())
    x.grad = None
    summed = _comm.all_reduce_sum(x, group)
    (summed * (rank + 1)).sum().backward()
    out["reduce"] = (summed.detach(), x.grad.clone())
    x.grad = None
    with _comm.counting_bytes() as sent:
        halo = _comm.shift_to_next_rank(x, group)
        (halo * (rank + 1)).sum().backward()
    out["shift"] = (halo.detach(), x.grad.clone(), sent())
    return out


@pytest.mark.parametrize("world", [1, 2, 4])
def test_collectives_values_gradients_and_bytes(world):
    results = run_ranks(_collectives, world)
    xs = [r["gather"][1] for r in results]
    total_weight = sum(rank + 1 for rank in range(world))  # d/dx_r of Σ_q (q+1)·Σ_r' (r'+1)·x_r'
    for rank, r in enumerate(results):
        gathered, x, grad, sent = r["gather"]
        torch.testing.assert_close(gathered, torch.stack(xs))
        torch.testing.assert_close(grad, torch.full_like(x, (rank + 1) * total_weight))
        assert sent == (world - 1) * x.numel() * 8 + (2 * (world - 1) * world * x.numel() * 8) // world
        summed, grad = r["reduce"]
        torch.testing.assert_close(summed, sum(xs))
        torch.testing.assert_close(grad, torch.full_like(x, total_weight))
        halo, grad, sent = r["shift"]
        torch.testing.assert_close(halo, xs[rank - 1] if rank else torch.zeros_like(x))
        torch.testing.assert_close(grad, torch.full_like(x, rank + 2 if rank + 1 < world else 0))
        assert sent == x.numel() * 8 * ((rank + 1 < world) + (rank > 0))


def test_group_argument_is_checked():
    with pytest.raises(TypeError, match="group must be a torch.distributed ProcessGroup"):
        _comm.check_group("world")
