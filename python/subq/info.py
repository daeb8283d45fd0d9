"""``python -m subq.info``: what this installation is and what each op will run here.

Versions (subq, torch, CUDA, Python), the build (CUDA or CPU-only, its archs, the torch it was built against), the
GPU found, and for each op the path it takes on this device: the fused CUDA kernel, or the ATen composite, with
the opt-in flag (``SUBQ_EXPERIMENTAL_*``, listed by :mod:`subq.experimental`) that changes it.

``python -m subq.info --experimental-env`` prints instead one ``NAME=1`` line per opt-in flag (bench/gpu_check.sh
switches every opt-in kernel on with them).
"""

from __future__ import annotations

import argparse
import platform
import sys
from dataclasses import dataclass

import torch

import subq
from subq import experimental


@dataclass(frozen=True)
class OpKernels:
    """Ops' CUDA kernels: what they are, and their opt-in flag's row (None: on by default)."""

    op: str
    kernels: str
    opt_in: experimental.ExperimentalKernels | None = None


# The ops with hand-written or CUTLASS CUDA kernels; the rest run ATen composites on every device.
OP_KERNELS = (
    OpKernels("monarch_matmul, blockdiag_matmul", "CUTLASS batched GEMMs + permutation kernel"),
    *(OpKernels(", ".join(e.ops) + (f" (sm_{e.needs_arch})" if e.needs_arch else ""), e.kernels, e)
      for e in experimental.KERNELS),
)


def op_path(entry: OpKernels, gpu: bool) -> str:
    if not gpu:
        return "ATen composite (CPU)"
    if not subq.cuda_built():
        return "ATen composite (CPU-only build: no CUDA kernels compiled)"
    opt_in = entry.opt_in
    if opt_in is None:
        return entry.kernels
    if opt_in.needs_arch and opt_in.needs_arch not in subq.cuda_archs().split(";"):
        return f"not in this build (it has no sm_{opt_in.needs_arch})"
    if opt_in.on:
        return f"{entry.kernels} ({opt_in.env}=1)"
    return f"ATen composite (set {opt_in.env}=1 for the {entry.kernels})"


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
    width = max(len(entry.op) for entry in OP_KERNELS) + 2
    lines.append(f"{'op':<{width}}path on {'cuda' if gpu else 'cpu'}")
    for entry in OP_KERNELS:
        lines.append(f"{entry.op:<{width}}{op_path(entry, gpu)}")
    lines.append(f"{'every other op':<{width}}ATen composite")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m subq.info", description=__doc__.splitlines()[0])
    parser.add_argument("--experimental-env", action="store_true",
                        help="print NAME=1 for every opt-in kernel flag, one a line, and nothing else")
    args = parser.parse_args(argv)
    if args.experimental_env:
        print("\n".join(f"{name}={value}" for name, value in experimental.all_on().items()))
    else:
        print(report())
    return 0


if __name__ == "__main__":
    sys.exit(main())
