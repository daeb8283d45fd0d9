"""Fused ops. Each is a torch custom op (torch.ops.subq.*) with CPU and CUDA kernels, a fake kernel for
torch.compile, and autograd."""

from subq.ops.flash import FlashDecodeState, flash_chunk_attention, flash_step, gau_attention
from subq.ops.monarch import blockdiag_matmul, monarch_matmul
from subq.ops.ssd import ssd_chunk_scan

__all__ = [
    "FlashDecodeState", "blockdiag_matmul", "flash_chunk_attention", "flash_step", "gau_attention",
    "monarch_matmul", "ssd_chunk_scan",
]
