"""Mamba-2 SSD chunk scan, side by side in one process: subq vs the chunked PyTorch reference (eager and
torch.compile, same dtype) vs causal scaled_dot_product_attention at the same (batch, seqlen, heads, head dim) —
the attention the layer replaces — and flash-linear-attention's chunk_simple_gla when it imports.

    python bench/bench_ssd.py                          # B=4, H=32, P=64, N=128, G=1, L 1K..64K, bf16
    python bench/bench_ssd.py --quick --device cpu     # smoke run

FLOPs are the matmul FLOPs of the chunk algorithm's four steps per forward, with c = ceil(L/Q) chunks:
    2*B*c*(G*Q²*N  [C·Bᵀ]  +  H*Q²*P  [scores·X]  +  H*Q*P*N  [chunk states]  +  H*Q*P*N  [state to output])
and 3x that for forward+backward. SDPA's are its own: 4*B*H*L²*P/2 per causal forward (3.5x with backward).
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

import _harness as h
from subq.ops import ssd_chunk_scan
from subq.reference import ssd_chunked_ref

FULL = {"batch": 4, "heads": 32, "headdim": 64, "dstate": 128, "seqlen": [1024, 2048, 4096, 8192, 16384, 32768,
                                                                          65536]}
QUICK = {"batch": 1, "heads": 4, "headdim": 16, "dstate": 16, "seqlen": [256, 512]}
CHUNK = 256
PASSES = ("fwd", "fwd+bwd")

try:
    from fla.ops.simple_gla import chunk_simple_gla
except ImportError:
    chunk_simple_gla = None


def make_inputs(args, seqlen, dtype, device):
    b, H, P, N = args.batch, args.heads, args.headdim, args.dstate
    kw = dict(device=device, dtype=dtype, requires_grad=True)
    return {
        "x": torch.randn(b, seqlen, H, P, **kw), "dt": torch.randn(b, seqlen, H, **kw),
        "A": -torch.rand(H, device=device).add(0.5), "B": torch.randn(b, seqlen, 1, N, **kw),
        "C": torch.randn(b, seqlen, 1, N, **kw), "D": torch.ones(H, device=device),
        "dt_bias": torch.randn(H, device=device).mul(0.5),
    }


def ssd_flops(args, seqlen: int) -> float:
    b, H, P, N, Q = args.batch, args.heads, args.headdim, args.dstate, CHUNK
    chunks = math.ceil(seqlen / Q)
    return 2 * b * chunks * (1 * Q * Q * N + H * Q * Q * P + 2 * H * Q * P * N)


def sdpa_flops(args, seqlen: int) -> float:
    return 4 * args.batch * args.heads * seqlen * seqlen * args.headdim / 2


def implementations(args) -> dict[str, Callable]:
    def subq_fn(inp):
        return ssd_chunk_scan(**inp, chunk_size=CHUNK, dt_softplus=True)

    def subq_fused(inp):  # the tensor-core kernels, opt-in until verified on a GPU: make_call sets the flag
        return ssd_chunk_scan(**inp, chunk_size=CHUNK, dt_softplus=True)

    def reference(inp):
        return ssd_chunked_ref(**inp, chunk_size=CHUNK, dt_softplus=True)[0]

    def sdpa(inp):  # q = C-like, k = B-like, v = x, at the layer's width: (batch, heads, seqlen, headdim)
        q = inp["x"].transpose(1, 2)
        return F.scaled_dot_product_attention(q, q, q, is_causal=True)

    impls = {"subq": subq_fn, "subq_fused": subq_fused, "reference": reference,
             "reference_compiled": torch.compile(reference, dynamic=False), "sdpa": sdpa}
    if chunk_simple_gla is not None:
        def fla(inp):
            x = inp["x"]
            g = F.logsigmoid(inp["dt"].float())
            q = inp["C"].expand(-1, -1, x.shape[2], -1)
            k = inp["B"].expand(-1, -1, x.shape[2], -1)
            return chunk_simple_gla(q, k, x, g)[0]
        impls["fla_chunk_simple_gla"] = fla
    return impls


def make_call(fn, inp, pass_name):
    if pass_name == "fwd":
        def forward():
            with torch.no_grad():
                return fn(inp)
        return forward
    leaves = [v for k, v in inp.items() if k in ("x", "B", "C", "dt")]

    def forward_backward():
        out = fn(inp)
        return torch.autograd.grad(out, leaves, torch.ones_like(out), allow_unused=True)
    return forward_backward


def with_fused_flag(call):
    """The call with the fused kernels switched on for all of it: the backward reads the flag when autograd runs
    it, after the forward has returned."""
    def flagged():
        with h.opt_in("ssd_chunk_scan"):
            return call()
    return flagged


def time_impl(name, fn, inp, pass_name, device, repeats):
    call = make_call(fn, inp, pass_name)
    return h.timed_or_error(with_fused_flag(call) if name == "subq_fused" else call, device, repeats)


def check(args, device) -> dict:
    """subq (bf16/fp16/fp32 as benchmarked) against the float64 chunked reference on the smallest size."""
    inp = make_inputs(args, min(args.seqlen), h.DTYPES[args.dtype], device)
    with torch.no_grad():
        y = ssd_chunk_scan(**inp, chunk_size=CHUNK, dt_softplus=True).double()
        ref = ssd_chunked_ref(**{k: v.double() for k, v in inp.items()}, chunk_size=CHUNK, dt_softplus=True)[0]
    rel = ((y - ref).norm() / ref.norm()).item()
    tol = 1e-2 if args.dtype in ("bf16", "fp16") else 1e-4
    return {"rel_err": rel, "tol": tol, "ok": rel <= tol}


def main() -> None:
    args = parse_args()
    torch.manual_seed(0)
    device, dtype = args.device, h.DTYPES[args.dtype]
    env = h.environment(device)
    peak = h.matmul_peak_tflops(dtype, device, args.repeats)
    copy_gbs = h.copy_bandwidth_gbs(device, args.repeats)
    print(f"{env['device_name']} | torch {env['torch']} | subq cuda_built={env['subq_cuda_built']} | {env['timer']}")
    print(f"measured peak: matmul {peak:.1f} TFLOP/s ({args.dtype}), copy {h.fmt(copy_gbs, '.0f')} GB/s")
    correctness = check(args, device)
    print(f"check subq vs float64 reference: rel err {correctness['rel_err']:.2e} "
          f"({'ok' if correctness['ok'] else 'FAIL'}, tol {correctness['tol']})")
    impls = implementations(args)
    print(h.comparison_header(f"{'L':>6} {'pass':<7}", impls))
    rows = []
    for seqlen in args.seqlen:
        inp = make_inputs(args, seqlen, dtype, device)
        for pass_name in PASSES:
            scale = 1 if pass_name == "fwd" else 3
            timed = {name: time_impl(name, fn, inp, pass_name, device, args.repeats) for name, fn in impls.items()}
            flops = {name: scale * ssd_flops(args, seqlen) for name in impls}
            flops["sdpa"] = (1 if pass_name == "fwd" else 3.5) * sdpa_flops(args, seqlen)
            row = {
                "seqlen": seqlen, "batch": args.batch, "heads": args.heads, "headdim": args.headdim,
                "dstate": args.dstate, "chunk_size": CHUNK, "pass": pass_name, **h.comparison(timed, flops, peak),
            }
            rows.append(row)
            print(f"{seqlen:>6} {pass_name:<7} {h.comparison_cells(row, impls)}", flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    growth = {}
    for pass_name in PASSES:
        by_len = {r["seqlen"]: r["ms"]["subq"] for r in rows if r["pass"] == pass_name}
        lens = sorted(by_len)
        if len(lens) >= 2 and by_len[lens[-1]] and by_len[lens[-2]]:
            growth[pass_name] = by_len[lens[-1]] / by_len[lens[-2]]
            print(f"subq {pass_name}: t({lens[-1]}) / t({lens[-2]}) = {growth[pass_name]:.2f}")
    for row in rows:
        for name, err in row["errors"].items():
            print(f"!!! {name} failed at L={row['seqlen']} {row['pass']}: {err}")
    h.write_json(args.out, {
        "benchmark": "ssd", "env": env,
        "config": {k: getattr(args, k) for k in ("batch", "heads", "headdim", "dstate", "seqlen", "dtype",
                                                  "repeats", "quick")} | {"chunk_size": CHUNK, "ngroups": 1},
        "peak": {"matmul_tflops": peak, "copy_gbs": copy_gbs},
        "checks": {"subq_vs_reference_fp64": correctness, "growth_last_two_lengths": growth,
                   "all_ok": correctness["ok"]},
        "rows": rows,
    })
    print(f"wrote {args.out}")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seqlen", type=int, nargs="+", help=f"default {FULL['seqlen']}; --quick {QUICK['seqlen']}")
    parser.add_argument("--batch", type=int)
    parser.add_argument("--heads", type=int)
    parser.add_argument("--headdim", type=int)
    parser.add_argument("--dstate", type=int)
    parser.add_argument("--dtype", choices=list(h.DTYPES), default="bf16")
    parser.add_argument("--device", default=h.default_device())
    parser.add_argument("--repeats", type=int, help="minimum timed calls (default 20 on GPU, 3 on CPU)")
    parser.add_argument("--out", type=Path, help="JSON path (default bench/results/ssd_<device>.json)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke run")
    args = parser.parse_args()
    sizes = QUICK if args.quick else FULL
    for key in ("batch", "heads", "headdim", "dstate", "seqlen"):
        if getattr(args, key) is None:
            setattr(args, key, sizes[key])
    args.device = torch.device(args.device)
    args.repeats = args.repeats or (20 if args.device.type == "cuda" else 3)
    args.out = args.out or h.default_out("ssd", args.device)
    return args


if __name__ == "__main__":
    main()
