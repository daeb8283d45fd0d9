"""Shared pieces of the model and system comparisons (bench_models.py, bench_distributed.py) and the sanitizer cases.
The reusable parts (timing, the environment record, JSON output, the opt-in switch) live in ``subq.profile``; the
per-op benchmarks are ``python -m subq.profile`` (each op's spec in python/subq/profile/ops/ holds its baselines).

GPU timings are medians of CUDA-event-timed calls after a warm-up (``triton.testing.do_bench`` when triton imports);
CPU timings are ``time.perf_counter`` medians of a few calls.
"""

from __future__ import annotations

from pathlib import Path

import torch

from subq.profile.device import default_device, device_name, environment, slug
from subq.profile.flags import env_flag
from subq.profile.report import write_json
from subq.profile.timing import median_ms, synchronize

__all__ = ["default_device", "default_out", "env_flag", "environment", "fmt", "synchronize", "timed_or_error",
           "write_json"]


def default_out(prefix: str, device: torch.device) -> Path:
    return Path(__file__).resolve().parent / "results" / f"{prefix}_{slug(device_name(device))}.json"


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
