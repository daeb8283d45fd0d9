"""Linear layers with block-diagonal (order 1) and Monarch (order 2) weight matrices."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from subq._utils import check_bool, check_positive_ints, check_tensor
from subq.ops.monarch import monarch_matmul


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _init_blocks(weight: torch.Tensor) -> None:
    """Kaiming-uniform per block (as nn.Linear does for a whole matrix): fan-in is the block's input size."""
    for block in weight:
        nn.init.kaiming_uniform_(block, a=math.sqrt(5))


class _PaddedLinear(nn.Module):
    """Shared plumbing: pad the input features up to the factored size, truncate the output, add the bias."""

    def __init__(self, in_features: int, out_features: int, nblocks: int, bias: bool, device, dtype):
        super().__init__()
        check_positive_ints(in_features=in_features, out_features=out_features, nblocks=nblocks)
        bias = check_bool(bias, "bias")
        self.in_features, self.out_features, self.nblocks = in_features, out_features, nblocks
        self.in_block, self.out_block = _ceil_div(in_features, nblocks), _ceil_div(out_features, nblocks)
        factory = {"device": device, "dtype": dtype}
        self.bias = nn.Parameter(torch.empty(out_features, **factory)) if bias else None

    def _reset_bias(self) -> None:
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features)
            nn.init.uniform_(self.bias, -bound, bound)

    def _product(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if check_tensor(x, "input").dim() == 0:
            raise ValueError(f"input must have at least 1 dimension (..., in_features={self.in_features}), got a "
                             "0-D tensor")
        if x.shape[-1] != self.in_features:
            raise ValueError(f"input.shape[-1] must be in_features={self.in_features}, got shape {tuple(x.shape)}")
        padded_in = self.nblocks * self.in_block
        if padded_in != self.in_features:
            x = F.pad(x, (0, padded_in - self.in_features))
        y = self._product(x)
        if y.shape[-1] != self.out_features:
            y = y[..., : self.out_features]
        return y + self.bias if self.bias is not None else y

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, nblocks={self.nblocks}, "
                f"bias={self.bias is not None}")


class BlockdiagLinear(_PaddedLinear):
    """y = x W^T + b with W block-diagonal: ``nblocks`` blocks of (ceil(out/nblocks), ceil(in/nblocks)).

    Sizes that do not divide by ``nblocks`` are zero-padded on the input and truncated on the output.
    The M2-BERT MLP's matrix; ``nblocks`` times fewer parameters and FLOPs than ``nn.Linear``.
    """

    def __init__(self, in_features: int, out_features: int, nblocks: int = 4, bias: bool = True,
                 device=None, dtype=None):
        super().__init__(in_features, out_features, nblocks, bias, device, dtype)
        self.weight = nn.Parameter(torch.empty(nblocks, self.out_block, self.in_block, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        _init_blocks(self.weight)
        self._reset_bias()

    def _product(self, x: torch.Tensor) -> torch.Tensor:
        return monarch_matmul(x, self.weight)


class MonarchLinear(_PaddedLinear):
    """y = x M^T + b with M = P^T L P R a Monarch matrix of two block-diagonal factors (see subq.ops.monarch_matmul).

    With nb = ``nblocks``, ib = ceil(in/nb), ob = ceil(out/nb): ``blkdiag1 (nb, q, ib)`` and ``blkdiag2 (nb, ob, q)``,
    q = ib when ib < ob else ob (the factor shapes of HazyResearch's M2 MonarchLinear). Sizes that do not divide
    are zero-padded on the input and truncated on the output.
    """

    def __init__(self, in_features: int, out_features: int, nblocks: int = 4, bias: bool = True,
                 device=None, dtype=None):
        super().__init__(in_features, out_features, nblocks, bias, device, dtype)
        mid = self.in_block if self.in_block < self.out_block else self.out_block
        factory = {"device": device, "dtype": dtype}
        self.blkdiag1 = nn.Parameter(torch.empty(nblocks, mid, self.in_block, **factory))
        self.blkdiag2 = nn.Parameter(torch.empty(nblocks, self.out_block, mid, **factory))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        _init_blocks(self.blkdiag1)
        _init_blocks(self.blkdiag2)
        self._reset_bias()

    def _product(self, x: torch.Tensor) -> torch.Tensor:
        return monarch_matmul(x, self.blkdiag1, self.blkdiag2)

    @classmethod
    def from_dense(cls, linear: nn.Linear, nblocks: int = 4) -> MonarchLinear:
        """The Monarch layer nearest (in Frobenius norm) to a dense ``nn.Linear``.

        Each entry of the Monarch matrix is w2[j, s', m] * w1[i, c, pp] for the one pair (i, c) = (j, m) that the
        permutation links, so M splits into disjoint (i, j) sub-blocks, each a sum of rank-1 terms, one per linked
        pair. Projecting is a truncated SVD of each sub-block of W, of that rank: rank 1 per block in the square
        case (nblocks**2 == features), as in the Monarch paper.
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        weight = linear.weight.detach()
        layer = cls(linear.in_features, linear.out_features, nblocks, bias=linear.bias is not None,
                    device=weight.device, dtype=weight.dtype)
        w1, w2 = _project_monarch(weight, layer.blkdiag1.shape, layer.blkdiag2.shape)
        with torch.no_grad():
            layer.blkdiag1.copy_(w1)
            layer.blkdiag2.copy_(w2)
            if linear.bias is not None:
                layer.bias.copy_(linear.bias.detach())
        return layer


def _project_monarch(weight: torch.Tensor, shape1: torch.Size, shape2: torch.Size) -> tuple[torch.Tensor, torch.Tensor]:
    k, q, p = shape1
    l, s, r = shape2
    dense = torch.zeros(l * s, k * p, dtype=torch.float64, device=weight.device)
    dense[: weight.shape[0], : weight.shape[1]] = weight.double()
    # Row s'*l + j of M belongs to output block j, column i*p + pp to input block i.
    blocks = dense.reshape(s, l, k, p).permute(1, 2, 0, 3)  # (j, i, s', pp)
    w1 = torch.zeros(k, q, p, dtype=torch.float64, device=weight.device)
    w2 = torch.zeros(l, s, r, dtype=torch.float64, device=weight.device)
    for i in range(k):
        links: dict[int, list[tuple[int, int]]] = {}
        for c in range(q):
            j, m = (i * q + c) % l, (i * q + c) // l
            links.setdefault(j, []).append((c, m))
        for j, pairs in links.items():
            u, sigma, vh = torch.linalg.svd(blocks[j, i], full_matrices=False)
            for rank, (c, m) in enumerate(pairs[: sigma.numel()]):
                scale = sigma[rank].sqrt()
                w2[j, :, m] = u[:, rank] * scale
                w1[i, c, :] = vh[rank] * scale
    return w1.to(weight.dtype), w2.to(weight.dtype)
