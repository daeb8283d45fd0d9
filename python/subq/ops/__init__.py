"""Fused ops. Each is a torch custom op (torch.ops.subq.*) with CPU and CUDA kernels, a fake kernel for
torch.compile, and autograd."""

from subq.ops.monarch import blockdiag_matmul, monarch_matmul
from subq.ops.monarch_conv import monarch_conv, monarch_conv_filter
from subq.ops.ssd import ssd_chunk_scan

__all__ = ["blockdiag_matmul", "monarch_conv", "monarch_conv_filter", "monarch_matmul", "ssd_chunk_scan"]
