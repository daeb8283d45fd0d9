"""Plain PyTorch references: short, obviously right, meant to run in float64. Tests compare every op to these."""

from subq.reference.monarch import blockdiag_matmul_ref, monarch_dense_matrix, monarch_matmul_ref
from subq.reference.monarch_conv import monarch_conv_fft_ref, monarch_conv_ref
from subq.reference.ssd import ssd_chunked_ref, ssd_ref

__all__ = [
    "blockdiag_matmul_ref", "monarch_conv_fft_ref", "monarch_conv_ref", "monarch_dense_matrix", "monarch_matmul_ref",
    "ssd_chunked_ref", "ssd_ref",
]
