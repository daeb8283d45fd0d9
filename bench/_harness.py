"""Shared benchmark pieces: timing, the measured matmul and copy peaks, input rotation, environment and JSON output.

GPU timings are medians of CUDA-event-timed calls after a warm-up (``triton.testing.do_bench`` when triton imports);
CPU timings are ``time.perf_counter`` medians of a few calls, meant only for smoke runs.
"""

from __future__ import annotations

import datetime
import itertools
import json
import math
import re
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

import subq

try:
    from triton.testing import do_bench
except ImportError:  # triton is optional: fall back to our own CUDA-event loop
    do_bench = None

WARMUP_MS = 25.0
REP_MS = 100.0
MAX_INPUT_SETS = 8
DEFAULT_L2_BYTES = 50 * 2**20  # H100's L2; used where the device does not report one (CPU), so rotation still runs

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def slug(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia_h100_80gb_hbm3', for file names."""
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def default_out(prefix: str, device: torch.device) -> Path:
    return Path(__file__).resolve().parent / "results" / f"{prefix}_{slug(device_name(device))}.json"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---- timing ----------------------------------------------------------------------------------------------------------


def _cpu_median_ms(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up: first-call allocations and dispatch caches
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _estimate_ms(fn: Callable[[], object], device: torch.device, calls: int = 3) -> float:
    fn()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    synchronize(device)
    return max((time.perf_counter() - start) * 1e3 / calls, 1e-3)


def _event_median_ms(fn: Callable[[], object], n_warmup: int, n_repeat: int) -> float:
    for _ in range(n_warmup):
        fn()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n_repeat)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n_repeat)]
    for start, end in zip(starts, ends, strict=True):
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends, strict=True))


def median_ms(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Median time of one call of ``fn`` in ms: at least ``repeats`` calls and (GPU) at least REP_MS of them."""
    if device.type != "cuda":
        return _cpu_median_ms(fn, repeats)
    estimate = _estimate_ms(fn, device)
    rep_ms = max(REP_MS, repeats * estimate)
    if do_bench is not None:
        return float(do_bench(fn, warmup=WARMUP_MS, rep=rep_ms, return_mode="median"))
    return _event_median_ms(fn, math.ceil(WARMUP_MS / estimate), math.ceil(rep_ms / estimate))


def input_set_count(bytes_per_set: int, device: torch.device) -> int:
    """How many distinct input sets to cycle through so consecutive calls do not all hit a warm L2.

    Sets of at least 2x L2 need no rotation; smaller ones get enough sets to cover 2x L2 (at least 3, at most
    MAX_INPUT_SETS, which covers it for sets of 12.5 MB and up on a 50 MB L2).
    """
    l2 = DEFAULT_L2_BYTES
    if device.type == "cuda":
        l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or DEFAULT_L2_BYTES
    if bytes_per_set >= 2 * l2:
        return 1
    return min(MAX_INPUT_SETS, max(3, math.ceil(2 * l2 / max(bytes_per_set, 1))))


def rotating(calls: Sequence[Callable[[], object]]) -> Callable[[], object]:
    """One callable that runs ``calls`` in turn, one per invocation (each call closing over its own input set)."""
    turn = itertools.cycle(calls)
    return lambda: next(turn)()


def tflops(flops: float, ms: float | None) -> float | None:
    return None if ms is None else flops / (ms * 1e-3) / 1e12


# ---- measured peaks --------------------------------------------------------------------------------------------------


def matmul_peak_tflops(dtype: torch.dtype, device: torch.device, repeats: int) -> float:
    """TFLOP/s of one large square matmul in ``dtype``: the practical ceiling the kernels are compared against."""
    size = 8192 if device.type == "cuda" else 512
    a = torch.randn(size, size, dtype=dtype, device=device)
    b = torch.randn(size, size, dtype=dtype, device=device)
    return tflops(2 * size**3, median_ms(lambda: a @ b, device, repeats))


def copy_bandwidth_gbs(device: torch.device, repeats: int, nbytes: int = 2**30) -> float | None:
    """Device-to-device copy GB/s, counting read and write; None off-GPU (host memory bandwidth is not the target)."""
    if device.type != "cuda":
        return None
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), device, repeats)
    return 2 * nbytes / (ms * 1e-3) / 1e9


# ---- environment and output ------------------------------------------------------------------------------------------


def environment(device: torch.device) -> dict:
    return {
        "device": str(device),
        "device_name": device_name(device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "subq_cuda_built": subq.cuda_built(),
        "subq_cuda_archs": subq.cuda_archs(),
        "allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        "timer": ("triton.do_bench" if do_bench is not None else "cuda_events") if device.type == "cuda"
        else "perf_counter",
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([sys.executable, *sys.argv]),
    }


def write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")


def fmt(value: float | None, spec: str) -> str:
    """Table cell text (pad it at the call site); '-' where a measurement failed."""
    return "-" if value is None else format(value, spec)
