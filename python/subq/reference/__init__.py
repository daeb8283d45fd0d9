"""Plain PyTorch references: short, obviously right, meant to run in float64. Tests compare every op to these."""

from subq.reference.flash import flash_chunked_ref, flash_quadratic_ref, gau_attention_ref, rel_bias_matrix
from subq.reference.monarch import blockdiag_matmul_ref, monarch_dense_matrix, monarch_matmul_ref
from subq.reference.ssd import ssd_chunked_ref, ssd_ref

__all__ = [
    "blockdiag_matmul_ref", "flash_chunked_ref", "flash_quadratic_ref", "gau_attention_ref", "monarch_dense_matrix",
    "monarch_matmul_ref", "rel_bias_matrix", "ssd_chunked_ref", "ssd_ref",
]
