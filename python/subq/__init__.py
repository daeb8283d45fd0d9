"""subq: fast kernels for the sub-quadratic alternatives to attention.

Ops live in :mod:`subq.ops` (registered as ``torch.ops.subq.*``), modules in :mod:`subq.nn`, plain float64 PyTorch
references in :mod:`subq.reference`.
"""

import torch  # noqa: F401  (loads libtorch, which subq._C links against)

try:
    from subq import _C
except ImportError as err:  # pragma: no cover - only without a built extension
    raise ImportError(
        "subq's compiled extension subq._C is missing or was built for another torch; "
        "reinstall with `pip install --no-build-isolation .` from the source tree"
    ) from err

from subq import nn, ops, reference

__version__ = "0.1.0"


def cuda_built() -> bool:
    """True when this build contains the CUTLASS CUDA kernels (else CUDA tensors take the ATen composite path)."""
    return _C.cuda_built()


def cuda_archs() -> str:
    """The SUBQ_CUDA_ARCHS this build was compiled for, e.g. ``"80;89;90a"`` ('' for a CPU-only build)."""
    return _C.cuda_archs()


__all__ = ["cuda_archs", "cuda_built", "nn", "ops", "reference", "__version__"]
