"""Plain PyTorch references: short, obviously right, meant to run in float64. Tests compare every op to these."""

from subq.reference.monarch import blockdiag_matmul_ref, monarch_dense_matrix, monarch_matmul_ref

__all__ = ["blockdiag_matmul_ref", "monarch_dense_matrix", "monarch_matmul_ref"]
from subq.reference.rmsnorm_gated import rmsnorm_gated_ref  # noqa: E402

__all__ += ["rmsnorm_gated_ref"]
from subq.reference.ssd_step import ssd_step_ref  # noqa: E402

__all__ += ["ssd_step_ref"]
