"""Order-2 Monarch matmul, side by side in one process: subq vs HazyResearch m2's two-bmm formulation vs a dense
linear layer of the same size, forward and forward+backward, against the matmul peak and copy bandwidth measured in
the same run. subq_sm90 is subq with SUBQ_EXPERIMENTAL_SM90_GEMM=1: on an H100 with an sm_90a build its 16-bit GEMMs
run on the wgmma kernels; anywhere else it runs the same kernels as subq.

    python bench/bench_monarch.py                          # full sweep: 16K tokens, n 1024/4096/8192, nblocks 4/16/64
    python bench/bench_monarch.py --quick --device cpu     # smoke run

Square Monarch: k = l = nblocks, p = q = r = s = n // nblocks.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

import _harness as h
import subq
from subq.profile.ops.monarch import two_bmm
from subq.reference import monarch_matmul_ref

FULL = {"tokens": 16384, "n": [1024, 4096, 8192], "nblocks": [4, 16, 64]}
QUICK = {"tokens": 256, "n": [256], "nblocks": [4, 16]}
PASSES = ("fwd", "fwd+bwd")
IMPLS = ("subq", "subq_sm90", "two_bmm", "dense")
REFERENCE_TOL = 1e-4  # fp32 two-bmm vs the float64 reference


@dataclass
class Inputs:
    x: torch.Tensor
    w1: torch.Tensor
    w2: torch.Tensor
    dense_w: torch.Tensor
    dy: torch.Tensor  # fixed random upstream gradient: zeros could let a kernel skip work

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.x, self.w1, self.w2, self.dense_w, self.dy))

    def operands(self, impl: str) -> tuple[Callable[..., torch.Tensor], tuple[torch.Tensor, ...]]:
        if impl == "dense":
            return F.linear, (self.x, self.dense_w)
        fn = two_bmm if impl == "two_bmm" else subq.ops.monarch_matmul
        return fn, (self.x, self.w1, self.w2)


def make_inputs(tokens: int, n: int, nblocks: int, dtype: torch.dtype, device: torch.device) -> Inputs:
    """Unit-scale activations and 1/sqrt(fan-in) weights, so outputs stay O(1) in every dtype."""
    block = n // nblocks

    def leaf(*shape: int, fan_in: int = 1) -> torch.Tensor:
        return (torch.randn(*shape, device=device) / fan_in**0.5).to(dtype).requires_grad_()

    return Inputs(x=leaf(tokens, n), w1=leaf(nblocks, block, block, fan_in=block),
                  w2=leaf(nblocks, block, block, fan_in=block), dense_w=leaf(n, n, fan_in=n),
                  dy=torch.randn(tokens, n, device=device).to(dtype))


# ---- correctness -----------------------------------------------------------------------------------------------------


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| / max |want|: elementwise relative error blows up on near-zero entries."""
    want = want.double()
    return ((got.double() - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()


def output_and_grads(fn: Callable[..., torch.Tensor], x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor,
                     dy: torch.Tensor) -> dict[str, torch.Tensor]:
    y = fn(x, w1, w2)
    dx, dw1, dw2 = torch.autograd.grad(y, (x, w1, w2), dy.to(y.dtype))
    return {"y": y.detach(), "dx": dx, "dw1": dw1, "dw2": dw2}


def compare(fn: Callable[..., torch.Tensor], ref: Callable[..., torch.Tensor], inp: Inputs, ref_dtype: torch.dtype,
            tol: float, sm90_gemm: bool = False) -> dict:
    """Relative errors of fn's output and gradients against ref run on the same inputs cast to ref_dtype."""
    try:
        with h.opt_in("monarch_matmul", on=sm90_gemm):
            got = output_and_grads(fn, inp.x, inp.w1, inp.w2, inp.dy)
        cast = [t.detach().to(ref_dtype).requires_grad_() for t in (inp.x, inp.w1, inp.w2)]
        want = output_and_grads(ref, *cast, inp.dy)
    except RuntimeError as err:  # a failing kernel is reported with the timings, not allowed to end the sweep
        return {"max_rel_err": {}, "tol": tol, "ok": False, "error": error_text(err)}
    errs = {name: rel_err(got[name], want[name]) for name in got}
    return {"max_rel_err": errs, "tol": tol, "ok": max(errs.values()) <= tol}


def low_precision_tol(dtype: torch.dtype) -> float:
    """Two correct kernels differ by about one rounding of the output (plus accumulation order): allow 3 eps."""
    return max(3 * torch.finfo(dtype).eps, REFERENCE_TOL)


def error_text(err: Exception) -> str:
    return f"{type(err).__name__}: {(str(err).splitlines() or [''])[0]}"


def report_check(what: str, check: dict) -> None:
    if "error" in check:
        print(f"!!! CHECK FAILED {what}: {check['error']} !!!")
        return
    worst = max(check["max_rel_err"], key=check["max_rel_err"].get)
    err = check["max_rel_err"][worst]
    if check["ok"]:
        print(f"check {what}: ok, max rel err {err:.2e} ({worst}) <= {check['tol']:.1e}")
    else:
        print(f"!!! CHECK FAILED {what}: max rel err {err:.2e} ({worst}) > tol {check['tol']:.1e} !!!")


# ---- timing ----------------------------------------------------------------------------------------------------------


def make_call(impl: str, inp: Inputs, pass_name: str) -> Callable[[], object]:
    fn, args = inp.operands(impl)
    sm90_gemm = impl == "subq_sm90"
    if pass_name == "fwd":
        def forward() -> torch.Tensor:
            with torch.no_grad(), h.opt_in("monarch_matmul", on=sm90_gemm):
                return fn(*args)
        return forward

    def forward_backward() -> tuple[torch.Tensor, ...]:
        with h.opt_in("monarch_matmul", on=sm90_gemm):  # the backward reads the flag too
            return torch.autograd.grad(fn(*args), args, inp.dy)
    return forward_backward


def time_impl(impl: str, sets: list[Inputs], pass_name: str, device: torch.device,
              repeats: int) -> tuple[float | None, str | None]:
    """Median ms, or the error: one failing shape must not lose the rest of an unattended sweep."""
    try:
        return h.median_ms(h.rotating([make_call(impl, s, pass_name) for s in sets]), device, repeats), None
    except RuntimeError as err:  # kernel checks (TORCH_CHECK) and CUDA OOM both raise RuntimeError
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return None, error_text(err)


def flops(tokens: int, n: int, nblocks: int) -> dict[str, float]:
    """Useful forward FLOPs: Monarch 2*T*(k*q*p + l*s*r), dense 2*T*n*n."""
    block = n // nblocks
    monarch = 2 * tokens * 2 * nblocks * block * block
    return {"subq": monarch, "subq_sm90": monarch, "two_bmm": monarch, "dense": 2 * tokens * n * n}


def ratio(num: float | None, den: float | None) -> float | None:
    return None if num is None or den is None else num / den


def bench_config(args: argparse.Namespace, n: int, nblocks: int, peak: float) -> list[dict]:
    device, dtype = args.device, h.DTYPES[args.dtype]
    first = make_inputs(args.tokens, n, nblocks, dtype, device)
    check = compare(subq.ops.monarch_matmul, two_bmm, first, dtype, low_precision_tol(dtype))
    check_sm90 = compare(subq.ops.monarch_matmul, two_bmm, first, dtype, low_precision_tol(dtype), sm90_gemm=True)
    for name, c in (("subq", check), ("subq_sm90", check_sm90)):
        if not c["ok"]:
            report_check(f"{name} vs two_bmm ({args.dtype}) at n={n} nblocks={nblocks}", c)
    count = h.input_set_count(first.nbytes(), device)
    sets = [first] + [make_inputs(args.tokens, n, nblocks, dtype, device) for _ in range(count - 1)]
    rows = []
    for pass_name in PASSES:
        scale = 1 if pass_name == "fwd" else 3  # backward = two products per forward one
        timed = {impl: time_impl(impl, sets, pass_name, device, args.repeats) for impl in IMPLS}
        ms = {impl: t[0] for impl, t in timed.items()}
        tf = {impl: h.tflops(scale * f, ms[impl]) for impl, f in flops(args.tokens, n, nblocks).items()}
        rows.append({
            "n": n, "nblocks": nblocks, "block": n // nblocks, "tokens": args.tokens, "pass": pass_name,
            "input_sets": count, "ms": ms, "tflops": tf,
            "pct_peak": {impl: None if v is None else 100 * v / peak for impl, v in tf.items()},
            "speedup_subq_vs": {"two_bmm": ratio(ms["two_bmm"], ms["subq"]), "dense": ratio(ms["dense"], ms["subq"])},
            "speedup_subq_sm90_vs": {"two_bmm": ratio(ms["two_bmm"], ms["subq_sm90"]),
                                     "dense": ratio(ms["dense"], ms["subq_sm90"])},
            "errors": {impl: t[1] for impl, t in timed.items() if t[1] is not None},
            "check_subq_vs_two_bmm": check,
            "check_subq_sm90_vs_two_bmm": check_sm90,
        })
        print(table_row(rows[-1]), flush=True)
    return rows


# ---- output ----------------------------------------------------------------------------------------------------------

HEADER = (f"{'n':>5} {'nb':>3} {'pass':<7} {'subq ms':>9} {'sm90 ms':>9} {'2bmm ms':>9} {'dense ms':>9} "
          f"{'subq TF/s':>9} {'%peak':>6} {'vs 2bmm':>8} {'vs dense':>8} {'sm90 %pk':>8} {'sm90/2bmm':>9}  check")


def check_flag(check: dict) -> str:
    errs = check["max_rel_err"]
    return ("ok " if check["ok"] else "FAIL ") + (f"{max(errs.values()):.1e}" if errs else "error")


def table_row(row: dict) -> str:
    ms, speed, sm90 = row["ms"], row["speedup_subq_vs"], row["speedup_subq_sm90_vs"]
    cells = [f"{row['n']:>5}", f"{row['nblocks']:>3}", f"{row['pass']:<7}",
             *(f"{h.fmt(ms[impl], '.3f'):>9}" for impl in IMPLS), f"{h.fmt(row['tflops']['subq'], '.4g'):>9}",
             f"{h.fmt(row['pct_peak']['subq'], '.1f'):>5}%", f"{h.fmt(speed['two_bmm'], '.2f'):>7}x",
             f"{h.fmt(speed['dense'], '.2f'):>7}x", f"{h.fmt(row['pct_peak']['subq_sm90'], '.1f'):>7}%",
             f"{h.fmt(sm90['two_bmm'], '.2f'):>8}x",
             f" {check_flag(row['check_subq_vs_two_bmm'])} / {check_flag(row['check_subq_sm90_vs_two_bmm'])}"]
    return " ".join(cells)


def summarize(rows: list[dict], reference_check: dict) -> bool:
    """Print failures last, where a log tail shows them; True when every check passed."""
    for row in rows:
        for impl, err in row["errors"].items():
            print(f"!!! {impl} failed at n={row['n']} nblocks={row['nblocks']} {row['pass']}: {err}")
    bad = {(r["n"], r["nblocks"]) for r in rows
           if not (r["check_subq_vs_two_bmm"]["ok"] and r["check_subq_sm90_vs_two_bmm"]["ok"])}
    if bad:
        print(f"!!! subq FAILS or DISAGREES with two_bmm beyond tolerance at (n, nblocks) = {sorted(bad)}: timings "
              "there are not comparable !!!")
    report_check("two_bmm vs float64 reference (fp32)", reference_check)
    return not bad and reference_check["ok"]


# ---- main ------------------------------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, help=f"rows of x (default {FULL['tokens']}; --quick {QUICK['tokens']})")
    parser.add_argument("--n", type=int, nargs="+", help=f"features (default {FULL['n']}; --quick {QUICK['n']})")
    parser.add_argument("--nblocks", type=int, nargs="+",
                        help=f"Monarch blocks (default {FULL['nblocks']}; --quick {QUICK['nblocks']})")
    parser.add_argument("--dtype", choices=list(h.DTYPES), default="bf16")
    parser.add_argument("--device", default=h.default_device())
    parser.add_argument("--repeats", type=int,
                        help="minimum timed calls per measurement (default 50 on GPU, where >= 100 ms is also "
                             "timed; 5 on CPU)")
    parser.add_argument("--out", type=Path, help="JSON path (default bench/results/monarch_<device>.json)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke run")
    args = parser.parse_args()
    sizes = QUICK if args.quick else FULL
    args.tokens = args.tokens or sizes["tokens"]
    args.n, args.nblocks = args.n or sizes["n"], args.nblocks or sizes["nblocks"]
    args.device = torch.device(args.device)
    if args.device.type == "cuda" and args.device.index is None:
        args.device = torch.device("cuda", torch.cuda.current_device())
    args.repeats = args.repeats or (50 if args.device.type == "cuda" else 5)
    args.out = args.out or h.default_out("monarch", args.device)
    for n in args.n:
        for nb in args.nblocks:
            if n % nb:
                parser.error(f"n={n} is not a multiple of nblocks={nb}")
    return args


def main() -> None:
    args = parse_args()
    torch.manual_seed(0)
    device, dtype = args.device, h.DTYPES[args.dtype]
    if device.type == "cuda":
        torch.cuda.set_device(device)
    env = h.environment(device)
    peak = h.matmul_peak_tflops(dtype, device, args.repeats)
    copy_gbs = h.copy_bandwidth_gbs(device, args.repeats)
    print(f"{env['device_name']} | torch {env['torch']} CUDA {env['cuda']} | subq cuda_built={env['subq_cuda_built']} "
          f"archs='{env['subq_cuda_archs']}' | timer {env['timer']}")
    print(f"measured peak: matmul {peak:.1f} TFLOP/s ({args.dtype}), copy {h.fmt(copy_gbs, '.0f')} GB/s (read+write)")
    print(f"tokens={args.tokens} dtype={args.dtype}; speedups are other_ms / subq_ms; check = subq / subq_sm90 vs "
          "two_bmm rel err")

    smallest = make_inputs(args.tokens, min(args.n), min(args.nblocks), torch.float32, device)
    reference_check = compare(two_bmm, monarch_matmul_ref, smallest, torch.float64, REFERENCE_TOL)
    report_check("two_bmm vs float64 reference (fp32)", reference_check)
    del smallest

    print(HEADER)
    rows = [row for n in args.n for nb in args.nblocks for row in bench_config(args, n, nb, peak)]
    all_ok = summarize(rows, reference_check)
    h.write_json(args.out, {
        "benchmark": "monarch", "env": env,
        "config": {"tokens": args.tokens, "n": args.n, "nblocks": args.nblocks, "dtype": args.dtype,
                   "repeats": args.repeats, "quick": args.quick},
        "peak": {"matmul_tflops": peak, "copy_gbs": copy_gbs},
        "checks": {"two_bmm_vs_reference_fp32": reference_check, "all_ok": all_ok},
        "rows": rows,
    })
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
