"""The two ceilings every op is placed against, measured in the same run on the same device: dense matmul TFLOP/s
in the dtype and copy GB/s (device to device on a GPU, RAM to RAM on a CPU; read plus write bytes)."""

from __future__ import annotations

import torch

from subq.profile.timing import median_ms, tflops

MATMUL_SIZE = {"cuda": 8192, "cpu": 1024}
COPY_BYTES = {"cuda": 2**30, "cpu": 2**28}  # well past the last-level cache of either


def matmul_peak_tflops(dtype: torch.dtype, device: torch.device, repeats: int, size: int | None = None) -> float:
    """TFLOP/s of one large square matmul in ``dtype``: the practical ceiling the kernels are compared against."""
    size = size or MATMUL_SIZE.get(device.type, MATMUL_SIZE["cpu"])
    a = torch.randn(size, size, dtype=dtype, device=device)
    b = torch.randn(size, size, dtype=dtype, device=device)
    return tflops(2 * size**3, median_ms(lambda: a @ b, device, repeats))


def copy_bandwidth_gbs(device: torch.device, repeats: int, nbytes: int | None = None) -> float:
    """Copy GB/s of one large buffer, counting the read and the write."""
    nbytes = nbytes or COPY_BYTES.get(device.type, COPY_BYTES["cpu"])
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), device, repeats)
    return 2 * nbytes / (ms * 1e-3) / 1e9


def measure(dtype: torch.dtype, device: torch.device, repeats: int) -> dict:
    size = MATMUL_SIZE.get(device.type, MATMUL_SIZE["cpu"])
    nbytes = COPY_BYTES.get(device.type, COPY_BYTES["cpu"])
    return {"matmul_tflops": matmul_peak_tflops(dtype, device, repeats, size),
            "copy_gbs": copy_bandwidth_gbs(device, repeats, nbytes), "matmul_size": size, "copy_bytes": nbytes}
