"""``python -m subq.info``: what this installation is and what each op will run here.

Versions (subq, torch, CUDA, Python), the build (CUDA or CPU-only, its archs, the torch it was built against), the
GPU found, and for each op the path it takes on this device: the fused CUDA kernel, or the ATen composite, with
the opt-in flag (``SUBQ_EXPERIMENTAL_*``) that changes it.
"""

from __future__ import annotations

import os
import platform
import sys
from dataclasses import dataclass

import torch

import subq


@dataclass(frozen=True)
class OpKernels:
    """An op's CUDA kernels: their opt-in flag (None: on by default), what they are, the arch the build needs."""

    op: str
    flag: str | None
    kernels: str
    needs_arch: str | None = None


# The ops with hand-written or CUTLASS CUDA kernels; the rest run ATen composites on every device.
OP_KERNELS = (
    OpKernels("monarch_matmul", None, "CUTLASS batched GEMMs + permutation kernel"),
    OpKernels("monarch_matmul (Hopper)", "SUBQ_EXPERIMENTAL_SM90_GEMM", "CUTLASS 3 TMA + wgmma GEMMs", "90a"),
    OpKernels("ssd_chunk_scan", "SUBQ_EXPERIMENTAL_SSD_KERNELS", "fused tensor-core forward and backward"),
    OpKernels("ssd_step, causal_conv1d, rmsnorm_gated", "SUBQ_EXPERIMENTAL_MAMBA2_KERNELS", "CUDA kernels"),
    OpKernels("monarch_conv", "SUBQ_EXPERIMENTAL_CONV_KERNELS", "fused Monarch-DFT forward and backward"),
    OpKernels("flash_chunk_attention", "SUBQ_EXPERIMENTAL_FLASH_KERNELS", "fused tensor-core forward and backward"),
    OpKernels("grouped_matmul", "SUBQ_EXPERIMENTAL_GROUPED_GEMM", "CUTLASS grouped GEMM"),
)


def flag_on(flag: str | None) -> bool:
    """As the glue reads it (csrc/torch/experimental_flags.h): on when the variable is exactly "1"."""
    return flag is None or os.environ.get(flag) == "1"


def op_path(entry: OpKernels, gpu: bool) -> str:
    if not gpu:
        return "ATen composite (CPU)"
    if not subq.cuda_built():
        return "ATen composite (CPU-only build: no CUDA kernels compiled)"
    if entry.needs_arch and entry.needs_arch not in subq.cuda_archs().split(";"):
        return f"not in this build (it has no sm_{entry.needs_arch})"
    if flag_on(entry.flag):
        return f"{entry.kernels}" + (f" ({entry.flag}=1)" if entry.flag else "")
    return f"ATen composite (set {entry.flag}=1 for the {entry.kernels})"


def report() -> str:
    from subq import _build_info

    gpu = torch.cuda.is_available()
    lines = [
        f"subq {subq.__version__} (Python {platform.python_version()}, {platform.machine()})",
        f"torch {torch.__version__} (CUDA {torch.version.cuda or 'none'})",
        f"build: {'CUDA, archs ' + subq.cuda_archs() if subq.cuda_built() else 'CPU-only'}; built against torch "
        f"{_build_info.TORCH_VERSION}" + (f", CUDA {_build_info.CUDA_VERSION}" if _build_info.CUDA_VERSION else ""),
    ]
    if gpu:
        index = torch.cuda.current_device()
        major, minor = torch.cuda.get_device_capability(index)
        lines.append(f"GPU: {torch.cuda.get_device_name(index)} (sm_{major}{minor})")
    else:
        lines.append("GPU: none found (torch.cuda.is_available() is False): every op runs on the CPU")
    lines.append("")
    lines.append(f"{'op':<40} path on {'cuda' if gpu else 'cpu'}")
    for entry in OP_KERNELS:
        lines.append(f"{entry.op:<40} {op_path(entry, gpu)}")
    lines.append(f"{'every other op':<40} ATen composite")
    return "\n".join(lines)


def main() -> int:
    print(report())
    return 0


if __name__ == "__main__":
    sys.exit(main())
