"""Clocks: the median time of one call after a warm-up, and the input rotation that keeps a warm cache from
flattering small sizes.

GPU: CUDA events, through ``triton.testing.do_bench`` when triton imports (which also clears L2 between calls), else
our own event loop; at least ``repeats`` calls and at least REP_MS of them after WARMUP_MS of warm-up.
CPU: ``time.perf_counter`` (monotonic) around single calls after one warm-up call.
"""

from __future__ import annotations

import itertools
import math
import statistics
import time
from collections.abc import Callable, Sequence

import torch

try:
    from triton.testing import do_bench
except ImportError:  # triton is optional: fall back to our own CUDA-event loop
    do_bench = None

WARMUP_MS = 25.0
REP_MS = 100.0
MAX_INPUT_SETS = 8
DEFAULT_L2_BYTES = 50 * 2**20  # H100's L2; used where the device does not report one (CPU), so rotation still runs


def timer_name(device: torch.device) -> str:
    if device.type != "cuda":
        return "perf_counter"
    return "triton.do_bench" if do_bench is not None else "cuda_events"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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


def gbs(nbytes: float, ms: float | None) -> float | None:
    return None if ms is None else nbytes / (ms * 1e-3) / 1e9
