"""Shared benchmark pieces for the bench/*.py scripts. The reusable parts (timing, input rotation, the measured
peaks, the environment record, JSON output) live in ``subq.profile``; this module re-exports them under the names
the scripts use and keeps what is specific to them (output paths under bench/results/, table cells).

GPU timings are medians of CUDA-event-timed calls after a warm-up (``triton.testing.do_bench`` when triton imports);
CPU timings are ``time.perf_counter`` medians of a few calls, meant only for smoke runs.
"""

from __future__ import annotations

from pathlib import Path

import torch

from subq.experimental import enabled as opt_in
from subq.profile import ceilings
from subq.profile.device import DTYPES, default_device, device_name, environment, slug
from subq.profile.report import write_json
from subq.profile.timing import (
    DEFAULT_L2_BYTES,
    MAX_INPUT_SETS,
    REP_MS,
    WARMUP_MS,
    do_bench,
    input_set_count,
    median_ms,
    rotating,
    synchronize,
    tflops,
)

__all__ = [
    "DEFAULT_L2_BYTES", "DTYPES", "MAX_INPUT_SETS", "REP_MS", "WARMUP_MS", "copy_bandwidth_gbs", "default_device",
    "default_out", "device_name", "do_bench", "environment", "fmt", "input_set_count", "matmul_peak_tflops",
    "median_ms", "opt_in", "rotating", "slug", "synchronize", "tflops", "timed_or_error", "write_json", "comparison",
    "comparison_header", "comparison_cells",
]


def default_out(prefix: str, device: torch.device) -> Path:
    return Path(__file__).resolve().parent / "results" / f"{prefix}_{slug(device_name(device))}.json"


def matmul_peak_tflops(dtype: torch.dtype, device: torch.device, repeats: int) -> float:
    """TFLOP/s of one large square matmul in ``dtype`` (8192 on a GPU, 512 on a CPU)."""
    return ceilings.matmul_peak_tflops(dtype, device, repeats, size=8192 if device.type == "cuda" else 512)


def copy_bandwidth_gbs(device: torch.device, repeats: int, nbytes: int = 2**30) -> float | None:
    """Device-to-device copy GB/s, counting read and write; None off-GPU (the bench scripts target the GPU)."""
    return ceilings.copy_bandwidth_gbs(device, repeats, nbytes) if device.type == "cuda" else None


def fmt(value: float | None, spec: str) -> str:
    """Table cell text (pad it at the call site); '-' where a measurement failed."""
    return "-" if value is None else format(value, spec)


def timed_or_error(call, device: torch.device, repeats: int) -> tuple[float | None, str | None]:
    """Median ms of ``call``, or the first line of its error: one failing size (a kernel check, an out-of-memory)
    must not lose the rest of an unattended sweep."""
    try:
        return median_ms(call, device, repeats), None
    except (RuntimeError, torch.OutOfMemoryError) as err:
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return None, str(err).splitlines()[0][:200]


def comparison(timed: dict[str, tuple[float | None, str | None]], flops: dict[str, float], peak: float) -> dict:
    """The per-row fields every side-by-side bench reports from its ``timed_or_error`` results: ms, TFLOP/s,
    % of the measured peak, speedup of subq over each other implementation, and the errors."""
    ms = {name: t[0] for name, t in timed.items()}
    tf = {name: tflops(flops[name], ms[name]) for name in timed}
    return {
        "ms": ms, "tflops": tf,
        "pct_peak": {k: None if v is None else 100 * v / peak for k, v in tf.items()},
        "speedup_subq_vs": {k: None if ms[k] is None or ms["subq"] is None else ms[k] / ms["subq"]
                            for k in timed if k != "subq"},
        "errors": {k: t[1] for k, t in timed.items() if t[1] is not None},
    }


def column_width(impls) -> int:
    """An implementation's ms column: its whole name, and at least a 5-digit time with 3 decimals."""
    return max(9, *(len(name) for name in impls))


def comparison_header(keys: str, impls) -> str:
    """The table header for rows printed with ``comparison_cells``: ``keys`` is the padded header of the columns
    that name the configuration (sequence length, pass, ...)."""
    width = column_width(impls)
    names = " ".join(f"{name:>{width}}" for name in impls)
    return f"{keys} {names} {'subq TF/s':>11} {'%peak':>6}  speedups"


def comparison_cells(row: dict, impls) -> str:
    """The cells of one ``comparison`` row after its configuration columns: ms per implementation, subq's TFLOP/s
    and % of peak, and subq's speedup over each other implementation."""
    width = column_width(impls)
    cells = " ".join(f"{fmt(row['ms'].get(name), '.3f'):>{width}}" for name in impls)
    speed = " ".join(f"{name}={fmt(v, '.2f')}x" for name, v in row["speedup_subq_vs"].items())
    return f"{cells} {fmt(row['tflops']['subq'], '.4g'):>11} {fmt(row['pct_peak']['subq'], '.1f'):>5}%  {speed}"
