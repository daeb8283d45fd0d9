"""Fused ops. Each is a torch custom op (torch.ops.subq.*) with CPU and CUDA kernels, a fake kernel for
torch.compile, and autograd."""

from subq.ops.causal_conv1d import causal_conv1d, causal_conv1d_update
from subq.ops.monarch import blockdiag_matmul, monarch_matmul
from subq.ops.rmsnorm_gated import rmsnorm_gated
from subq.ops.ssd import ssd_chunk_scan
from subq.ops.ssd_step import ssd_step

__all__ = [
    "blockdiag_matmul",
    "causal_conv1d",
    "causal_conv1d_update",
    "monarch_matmul",
    "rmsnorm_gated",
    "ssd_chunk_scan",
    "ssd_step",
]
