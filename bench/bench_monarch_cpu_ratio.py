"""CPU only: subq.ops.monarch_matmul against HazyResearch m2's two-bmm formulation, forward and forward+backward,
timed interleaved in one process (medians), printed as subq / two-bmm time ratios (< 1: subq is faster). For a shared
machine: THREADS (default 1) sets torch's thread count, since two OpenMP threads competing with other jobs time the
scheduler more than the kernels.

    PYTHONPATH=python:tests python bench/bench_monarch_cpu_ratio.py bfloat16,float32 5 2048x1024x16 1024x4096x64

Arguments: dtypes, repeats, then TOKENSxNxNBLOCKS sizes (square Monarch, blocks of N // NBLOCKS).
"""

from __future__ import annotations

import os
import statistics
import sys
import time

import torch

import subq
from subq.profile.ops.monarch import two_bmm

IMPLS = {"subq": subq.ops.monarch_matmul, "two_bmm": two_bmm}


def call(fn, x, w1, w2, dy, backward: bool):
    if not backward:
        with torch.no_grad():
            return fn(x, w1, w2)
    return torch.autograd.grad(fn(x, w1, w2), (x, w1, w2), dy)


def ratios(dtype: torch.dtype, tokens: int, n: int, nblocks: int, repeats: int) -> dict[str, tuple[float, ...]]:
    """{pass: (subq ms, two_bmm ms, subq / two_bmm)} on fresh random inputs (1/sqrt(fan-in) weights)."""
    block = n // nblocks

    def leaf(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape) * scale).to(dtype).requires_grad_()

    x, w1, w2 = leaf(tokens, n), leaf(nblocks, block, block, scale=block**-0.5), leaf(nblocks, block, block,
                                                                                      scale=block**-0.5)
    dy = torch.randn(tokens, n).to(dtype)
    out = {}
    for backward in (False, True):
        for fn in IMPLS.values():
            call(fn, x, w1, w2, dy, backward)  # warm-up
        times: dict[str, list[float]] = {name: [] for name in IMPLS}
        for _ in range(repeats):
            for name, fn in IMPLS.items():
                start = time.perf_counter()
                call(fn, x, w1, w2, dy, backward)
                times[name].append(time.perf_counter() - start)
        ms = {name: statistics.median(t) * 1e3 for name, t in times.items()}
        out["fwd+bwd" if backward else "fwd"] = (ms["subq"], ms["two_bmm"], ms["subq"] / ms["two_bmm"])
    return out


def main() -> None:
    torch.set_num_threads(int(os.environ.get("THREADS", "1")))
    dtypes, repeats = sys.argv[1].split(","), int(sys.argv[2])
    sizes = [tuple(map(int, s.split("x"))) for s in sys.argv[3:]]
    for dtype in dtypes:
        for tokens, n, nblocks in sizes:
            cells = [f"{p}: subq {a:8.2f} ms  2bmm {b:8.2f} ms  ratio {c:.2f}"
                     for p, (a, b, c) in ratios(getattr(torch, dtype), tokens, n, nblocks, repeats).items()]
            print(f"{dtype:9s} T{tokens:<5d} n{n:<5d} nb{nblocks:<3d} " + "  ".join(cells), flush=True)


if __name__ == "__main__":
    main()
