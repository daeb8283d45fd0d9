"""Fused ops. Each is a torch custom op (torch.ops.subq.*) with CPU and CUDA kernels, a fake kernel for
torch.compile, and autograd."""

from subq.ops.causal_conv1d import causal_conv1d, causal_conv1d_update
from subq.ops.flash import FlashDecodeState, flash_chunk_attention, flash_step, gau_attention
from subq.ops.grouped_matmul import grouped_matmul
from subq.ops.monarch import blockdiag_matmul, monarch_matmul
from subq.ops.monarch_conv import monarch_conv, monarch_conv_filter
from subq.ops.rmsnorm_gated import rmsnorm_gated
from subq.ops.ssd import ssd_chunk_scan
from subq.ops.ssd_step import ssd_step

__all__ = [
    "FlashDecodeState",
    "blockdiag_matmul",
    "causal_conv1d",
    "causal_conv1d_update",
    "flash_chunk_attention",
    "flash_step",
    "gau_attention",
    "grouped_matmul",
    "monarch_conv",
    "monarch_conv_filter",
    "monarch_matmul",
    "rmsnorm_gated",
    "ssd_chunk_scan",
    "ssd_step",
]
