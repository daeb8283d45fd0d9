"""The device and dtype a run uses: parsing, what the device can run, free memory, names and the environment record."""

from __future__ import annotations

import datetime
import os
import re
import sys
from pathlib import Path

import torch

import subq
from subq.profile.errors import ProfileError
from subq.profile.timing import timer_name

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_dtype(device: torch.device) -> str:
    """bf16 on a GPU; fp32 on a CPU, where bf16 and fp16 matmuls are mostly emulated and not what one would run."""
    return "bf16" if device.type == "cuda" else "fp32"


def resolve_device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ProfileError(f"--device {name!r} is not a device torch knows ({err})") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ProfileError(f"--device {name}: no CUDA device is available here (use --device cpu)")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if device.index >= torch.cuda.device_count():
            raise ProfileError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif device.type != "cpu":
        raise ProfileError(f"--device {name}: only cpu and cuda devices can be profiled")
    return device


def _probe(dtype: torch.dtype, device: torch.device) -> None:
    """Raises when the device cannot multiply matrices in ``dtype`` (the one thing every op here does)."""
    a = torch.ones(8, 8, dtype=dtype, device=device)
    (a @ a).sum().item()


def check_dtype(name: str, device: torch.device) -> torch.dtype:
    if name not in DTYPES:
        raise ProfileError(f"--dtype {name!r} is not one of {', '.join(DTYPES)}")
    dtype = DTYPES[name]
    if device.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise ProfileError(f"--dtype bf16: {device_name(device)} has no bfloat16 support (use fp16 or fp32)")
    try:
        _probe(dtype, device)
    except RuntimeError as err:
        first = (str(err).splitlines() or [""])[0]
        raise ProfileError(f"--dtype {name}: {device_name(device)} cannot run {dtype} matmuls ({first})") from None
    return dtype


def free_bytes(device: torch.device) -> int:
    """Memory an allocation can use now: free GPU memory, or the kernel's MemAvailable for the CPU."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def slug(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia_h100_80gb_hbm3', for file names."""
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def environment(device: torch.device) -> dict:
    return {
        "device": str(device),
        "device_name": device_name(device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "subq_cuda_built": subq.cuda_built(),
        "subq_cuda_archs": subq.cuda_archs(),
        "allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        # Which opt-in kernels ran: the ops read these on every call.
        "experimental_flags": {name: os.environ[name] for name in sorted(e.env for e in subq.experimental.KERNELS)
                               if name in os.environ},
        "timer": timer_name(device),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([sys.executable, *sys.argv]),
    }
