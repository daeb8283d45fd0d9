"""Monarch products: ``blockdiag_matmul`` (order 1) and ``monarch_matmul`` (order 2), square Monarch matrices, against
the plain PyTorch bmm formulations (order 2: HazyResearch m2's two-bmm) and a dense linear layer of the same size.
``subq_sm90`` is order 2 with SUBQ_EXPERIMENTAL_SM90_GEMM=1: with an sm_90a build on a Hopper GPU its 16-bit GEMMs
run on the wgmma kernels, elsewhere the same kernels as subq.

Size: ``batch``, ``seqlen`` (T = batch * seqlen tokens), ``n`` features, ``nblocks``; block b = n // nblocks, so
order 1 has ``w (nb, b, b)`` and order 2 has k = l = nb, p = q = r = s = b.

FLOPs (forward; fwd+bwd is 3x: dx and dw for each product):
- subq and the bmm baselines execute exactly the block products, which are also the math: matmul = useful =
  order 1: 2 T nb b^2 = 2 T n b;  order 2: 2 T (k q p + l s r) = 4 T n b.
- dense ``F.linear`` with an (n, n) weight: matmul = useful = 2 T n^2.
Minimum bytes (e = element size): order 1 (2 T n + n b) e, order 2 (2 T n + 2 n b) e, dense (2 T n + n^2) e
forward; fwd+bwd per ops/base.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import subq
from subq.profile.ops.base import Impl, Inputs, OpSpec, Size, leaf, opt_in, three_x

FULL = {"batch": [4], "seqlen": [4096], "n": [1024, 4096, 8192], "nblocks": [4, 16, 64]}
ABBREV = {"batch": "b", "seqlen": "L", "n": "n", "nblocks": "nb"}


class _TwoBmm(torch.autograd.Function):
    """m2's BlockdiagButterflyMultiply (bert/src/mm/blockdiag_butterfly_multiply.py), forward and hand-written
    backward: two torch.bmm whose out= tensors are transposed views, so each bmm writes straight into the layout
    the next step reads. All three gradients are always wanted here, so no needs_input_grad branches."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
        k, q, p = w1.shape
        l, s, r = w2.shape
        batch = x.shape[0]
        out1 = torch.empty(batch, k, q, device=x.device, dtype=x.dtype).transpose(0, 1)
        out1 = torch.bmm(x.reshape(batch, k, p).transpose(0, 1), w1.transpose(-1, -2), out=out1)  # (k, B, q)
        out1 = out1.transpose(0, 1).reshape(batch, r, l).transpose(-1, -2).contiguous().transpose(0, 1)  # (l, B, r)
        out2 = torch.empty(batch, l, s, device=x.device, dtype=x.dtype).transpose(0, 1)
        out2 = torch.bmm(out1, w2.transpose(-1, -2), out=out2)  # (l, B, s)
        ctx.save_for_backward(x, w1, w2, out1)
        return out2.permute(1, 2, 0).reshape(batch, s * l)

    @staticmethod
    def backward(ctx, dout: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x, w1, w2, out1 = ctx.saved_tensors
        k, q, p = w1.shape
        l, s, r = w2.shape
        batch = x.shape[0]
        dout2 = dout.reshape(batch, s, l).transpose(-1, -2).contiguous().transpose(0, 1)  # (l, B, s)
        dw2 = torch.bmm(dout2.transpose(-1, -2), out1)
        dout1 = torch.empty(batch, l, r, device=x.device, dtype=x.dtype).transpose(0, 1)
        dout1 = torch.bmm(dout2, w2, out=dout1)  # (l, B, r)
        dout1 = dout1.transpose(0, 1).transpose(-1, -2).contiguous().reshape(batch, k, q).transpose(0, 1)  # (k, B, q)
        dx = torch.empty(batch, k, p, device=x.device, dtype=x.dtype)
        dx = torch.bmm(dout1, w1, out=dx.transpose(0, 1)).transpose(0, 1).reshape(batch, k * p)
        dw1 = torch.bmm(dout1.transpose(-1, -2), x.reshape(batch, k, p).transpose(0, 1))
        return dx, dw1, dw2


def two_bmm(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """The order-2 Monarch product as HazyResearch m2 computes it in PyTorch: two bmm (x is 2-D)."""
    return _TwoBmm.apply(x, w1, w2)


def blockdiag_bmm(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The order-1 product in plain PyTorch: one bmm over the blocks, autograd for the backward (x is 2-D)."""
    nb, bo, bi = w.shape
    return torch.bmm(x.reshape(-1, nb, bi).transpose(0, 1), w.transpose(1, 2)).transpose(0, 1).reshape(-1, nb * bo)


def _tokens(size: Size) -> int:
    return size["batch"] * size["seqlen"]


def _block(size: Size) -> int:
    return size["n"] // size["nblocks"]


def _invalid(size: Size) -> str | None:
    if min(size.values()) < 1:
        return "every size must be at least 1"
    if size["n"] % size["nblocks"]:
        return f"n={size['n']} is not a multiple of nblocks={size['nblocks']}"
    return None


def _inputs(order: int):
    """Unit-scale activations and 1/sqrt(fan-in) weights, so outputs stay O(1) in every dtype."""

    def make(size: Size, dtype: torch.dtype, device: torch.device) -> Inputs:
        n, nb, b, t = size["n"], size["nblocks"], _block(size), _tokens(size)
        inputs = {"x": leaf(t, n, dtype=dtype, device=device),
                  "w1": leaf(nb, b, b, dtype=dtype, device=device, scale=b**-0.5)}
        if order == 2:
            inputs["w2"] = leaf(nb, b, b, dtype=dtype, device=device, scale=b**-0.5)
        inputs["dense_w"] = leaf(n, n, dtype=dtype, device=device, scale=n**-0.5)
        inputs["dy"] = torch.randn(t, n, device=device).to(dtype)  # random: zeros could let a kernel skip work
        return inputs

    return make


def _work_bytes(size: Size, dtype: torch.dtype) -> int:
    """Output, its gradient, dx, m2's permuted intermediate and its gradient, twice over; the dense weight's grad."""
    e = torch.finfo(dtype).bits // 8
    return 8 * _tokens(size) * size["n"] * e + 2 * size["n"] ** 2 * e


def _blockdiag_flops(size: Size) -> float:
    return 2 * _tokens(size) * size["n"] * _block(size)


def _monarch_flops(size: Size) -> float:
    return 4 * _tokens(size) * size["n"] * _block(size)


def _dense_flops(size: Size) -> float:
    return 2 * _tokens(size) * size["n"] ** 2


DENSE = Impl("dense", lambda i, s: F.linear(i["x"], i["dense_w"]), ("x", "dense_w"),
             three_x(_dense_flops), three_x(_dense_flops))

BLOCKDIAG = OpSpec(
    name="blockdiag_matmul",
    summary="order-1 Monarch (block-diagonal) product; baselines: one bmm, dense F.linear",
    full=FULL,
    quick={"batch": [1], "seqlen": [256], "n": [256], "nblocks": [4]},
    make_inputs=_inputs(order=1),
    impls=(
        Impl("subq", lambda i, s: subq.ops.monarch_matmul(i["x"], i["w1"]), ("x", "w1"),
             three_x(_blockdiag_flops), three_x(_blockdiag_flops)),
        Impl("bmm", lambda i, s: blockdiag_bmm(i["x"], i["w1"]), ("x", "w1"),
             three_x(_blockdiag_flops), three_x(_blockdiag_flops)),
        DENSE,
    ),
    check_against="bmm",
    work_bytes=_work_bytes,
    invalid=_invalid,
    abbrev=ABBREV,
)

_MONARCH_SUBQ = Impl("subq", lambda i, s: subq.ops.monarch_matmul(i["x"], i["w1"], i["w2"]), ("x", "w1", "w2"),
                     three_x(_monarch_flops), three_x(_monarch_flops))

MONARCH = OpSpec(
    name="monarch_matmul",
    summary="order-2 Monarch product; baselines: m2's two-bmm PyTorch formulation, dense F.linear",
    full=FULL,
    quick={"batch": [1], "seqlen": [256], "n": [256], "nblocks": [4, 16]},
    make_inputs=_inputs(order=2),
    impls=(
        _MONARCH_SUBQ,
        opt_in(_MONARCH_SUBQ, "subq_sm90", "SUBQ_EXPERIMENTAL_SM90_GEMM"),
        Impl("two_bmm", lambda i, s: two_bmm(i["x"], i["w1"], i["w2"]), ("x", "w1", "w2"),
             three_x(_monarch_flops), three_x(_monarch_flops)),
        DENSE,
    ),
    check_against="two_bmm",
    work_bytes=_work_bytes,
    invalid=_invalid,
    abbrev=ABBREV,
)
