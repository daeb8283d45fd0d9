"""subq: fast kernels for the sub-quadratic alternatives to attention.

Ops live in :mod:`subq.ops` (registered as ``torch.ops.subq.*``), modules in :mod:`subq.nn`, plain float64 PyTorch
references in :mod:`subq.reference`.
"""

import importlib.metadata

import torch  # loads libtorch, which subq._C links against

try:
    from subq import _build_info
except ImportError:  # pragma: no cover - a source tree never built
    _build_info = None

# The ABI guard: subq._C links against one torch's C++ symbols; under another torch it would fail with an
# "undefined symbol" (or worse, load and misbehave). Say which versions and what to do instead.
if _build_info is not None and _build_info.TORCH_VERSION != torch.__version__:
    raise ImportError(
        f"subq was built against torch {_build_info.TORCH_VERSION}, but torch {torch.__version__} is installed. "
        "Rebuild subq for this torch (from the source tree: pip install --no-build-isolation --force-reinstall .) "
        f"or install the torch it was built for (pip install torch=={_build_info.TORCH_VERSION.split('+')[0]})."
    )

try:
    from subq import _C
except ImportError as err:  # pragma: no cover - only without a built extension
    raise ImportError(
        "subq's compiled extension subq._C is missing or was built for another torch; "
        "reinstall with `pip install --no-build-isolation .` from the source tree"
    ) from err

from subq import experimental, nn, ops, reference

try:
    __version__ = importlib.metadata.version("subq")  # 0.1.0+cu130torch2.11: the torch and CUDA it was built for
except importlib.metadata.PackageNotFoundError:  # pragma: no cover - a source tree on sys.path, not installed
    __version__ = "0.1.0"


def cuda_built() -> bool:
    """True when this build contains the CUTLASS CUDA kernels (else CUDA tensors take the ATen composite path)."""
    return _C.cuda_built()


def cuda_archs() -> str:
    """The SUBQ_CUDA_ARCHS this build was compiled for, e.g. ``"80;89;90a"`` ('' for a CPU-only build)."""
    return _C.cuda_archs()


__all__ = ["cuda_archs", "cuda_built", "experimental", "nn", "ops", "reference", "__version__"]
