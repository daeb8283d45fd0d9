"""Plain PyTorch references: short, obviously right, meant to run in float64. Tests compare every op to these."""

from subq.reference.causal_conv1d import causal_conv1d_ref, causal_conv1d_update_ref
from subq.reference.flash import flash_chunked_ref, flash_quadratic_ref, gau_attention_ref, rel_bias_matrix
from subq.reference.grouped_matmul import grouped_matmul_ref
from subq.reference.monarch import blockdiag_matmul_ref, monarch_dense_matrix, monarch_matmul_ref
from subq.reference.monarch_conv import monarch_conv_fft_ref, monarch_conv_ref
from subq.reference.rmsnorm_gated import rmsnorm_gated_ref
from subq.reference.ssd import ssd_chunked_ref, ssd_ref
from subq.reference.ssd_step import ssd_step_ref

__all__ = [
    "blockdiag_matmul_ref",
    "causal_conv1d_ref",
    "causal_conv1d_update_ref",
    "flash_chunked_ref",
    "flash_quadratic_ref",
    "gau_attention_ref",
    "grouped_matmul_ref",
    "monarch_conv_fft_ref",
    "monarch_conv_ref",
    "monarch_dense_matrix",
    "monarch_matmul_ref",
    "rel_bias_matrix",
    "rmsnorm_gated_ref",
    "ssd_chunked_ref",
    "ssd_ref",
    "ssd_step_ref",
]
