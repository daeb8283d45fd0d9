"""FLASH mixed-chunk attention, side by side in one process: subq.ops.flash_chunk_attention (the composite, and as
subq_fused its tensor-core forward and backward, opt-in with SUBQ_EXPERIMENTAL_FLASH_KERNELS=1) vs the chunked PyTorch
reference (eager and torch.compile, same dtype) vs scaled_dot_product_attention of a Transformer layer of the same
width (d_model split into heads of 64 and of 128 dims), bidirectional and causal.

    python bench/bench_flash.py                          # B*L = 64K tokens, d=1024 (e=2048, s=128), C=256, bf16
    python bench/bench_flash.py --quick --device cpu     # smoke run

The batch is tokens // L, so every row processes the same number of tokens: a linear-time method stays flat.
FLOPs of one FLASH forward with G = ceil(L/C) chunks, counting the chunk squares dense (as computed, causal too):
    2*B*G*(C²*s [q_quad·k_quadᵀ] + C²*e [kernel·V] + C*s*e [k_linᵀV] + C*s*e [q_lin·state])
and 3x that for forward+backward. SDPA's: 4*B*L²*d per forward (half of it causal), 3.5x with backward.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

import _harness as h
from subq.ops import flash_chunk_attention
from subq.reference import flash_chunked_ref

FULL = {"tokens": 65536, "d_model": 1024, "s": 128, "chunk_size": 256,
        "seqlen": [512, 1024, 2048, 4096, 8192, 16384, 32768, 65536]}
QUICK = {"tokens": 1024, "d_model": 128, "s": 32, "chunk_size": 64, "seqlen": [256, 512]}
PASSES = ("fwd", "fwd+bwd")
MODES = ("bidirectional", "causal")
SDPA_HEADDIMS = (64, 128)
GRAD_KEYS = ("q_quad", "k_quad", "q_lin", "k_lin", "v", "u")  # the inputs fwd+bwd differentiates


def fused_kernels() -> contextlib.AbstractContextManager[None]:
    """The fused forward and backward for the duration (opt-in until verified on a GPU)."""
    return h.opt_in("flash_chunk_attention")


def make_inputs(args, seqlen, dtype, device):
    batch, e, s = args.tokens // seqlen, 2 * args.d_model, args.s
    kw = dict(device=device, dtype=dtype, requires_grad=True)
    inp = {name: torch.randn(batch, seqlen, s, **kw) for name in ("q_quad", "k_quad", "q_lin", "k_lin")}
    inp |= {"v": torch.randn(batch, seqlen, e, **kw), "u": torch.randn(batch, seqlen, e, **kw),
            "rel_bias": torch.randn(2 * args.chunk_size - 1, device=device, dtype=torch.float32)}
    # SDPA of the same layer width: (batch, heads, seqlen, headdim) views of one (batch, seqlen, d) tensor
    inp["x"] = torch.randn(batch, seqlen, args.d_model, **kw)
    return inp


def flash_flops(args, seqlen: int) -> float:
    batch, C, s, e = args.tokens // seqlen, args.chunk_size, args.s, 2 * args.d_model
    chunks = -(-seqlen // C)
    return 2 * batch * chunks * (C * C * (s + e) + 2 * C * s * e)


def sdpa_flops(args, seqlen: int, causal: bool) -> float:
    batch = args.tokens // seqlen
    return 4 * batch * seqlen * seqlen * args.d_model / (2 if causal else 1)


def implementations(args, causal: bool) -> dict[str, Callable]:
    keys = ("q_quad", "k_quad", "q_lin", "k_lin", "v", "u", "rel_bias")

    def subq_fn(inp):
        return flash_chunk_attention(*(inp[k] for k in keys), chunk_size=args.chunk_size, causal=causal)

    def subq_fused(inp):  # the tensor-core forward; make_call keeps the flag on through its backward too
        with fused_kernels():
            return subq_fn(inp)

    def reference(inp):
        return flash_chunked_ref(*(inp[k] for k in keys), chunk_size=args.chunk_size, causal=causal)

    impls = {"subq": subq_fn, "subq_fused": subq_fused, "reference": reference,
             "reference_compiled": torch.compile(reference, dynamic=False)}
    for headdim in SDPA_HEADDIMS:
        def sdpa(inp, headdim=headdim):
            x = inp["x"]
            q = x.view(*x.shape[:2], -1, headdim).transpose(1, 2)
            return F.scaled_dot_product_attention(q, q, q, is_causal=causal)
        impls[f"sdpa_h{headdim}"] = sdpa
    return impls


def make_call(fn, inp, pass_name, name):
    if pass_name == "fwd":
        def forward():
            with torch.no_grad():
                return fn(inp)
        return forward
    leaves = [inp["x"]] if name.startswith("sdpa") else [inp[k] for k in GRAD_KEYS]
    # autograd.grad runs subq_fused's backward after subq_fused has returned: the flag stays on around both
    context = fused_kernels if name == "subq_fused" else contextlib.nullcontext

    def forward_backward():
        with context():
            out = fn(inp)
            return torch.autograd.grad(out, leaves, torch.ones_like(out))
    return forward_backward


def time_impl(fn, inp, pass_name, name, device, repeats):
    return h.timed_or_error(make_call(fn, inp, pass_name, name), device, repeats)


def check(args, device) -> dict:
    """subq and subq_fused in the benchmarked dtype against the float64 chunked reference on the smallest size, both
    modes, and subq_fused's gradients too (subq_fused is the composite again where the fused kernels do not run: CPU,
    float32)."""
    inp = make_inputs(args, min(args.seqlen), h.DTYPES[args.dtype], device)
    keys = ("q_quad", "k_quad", "q_lin", "k_lin", "v", "u", "rel_bias")
    rel = {"subq": 0.0, "subq_fused": 0.0, "subq_fused_grads": 0.0}
    for causal in (False, True):
        impls = implementations(args, causal)
        leaves64 = {k: inp[k].detach().double().requires_grad_(k in GRAD_KEYS) for k in keys}
        ref = flash_chunked_ref(*leaves64.values(), chunk_size=args.chunk_size, causal=causal)
        with torch.no_grad():
            for name in ("subq", "subq_fused"):
                out = impls[name](inp)
                rel[name] = max(rel[name], ((out.double() - ref).norm() / ref.norm()).item())
        dout = torch.randn_like(inp["v"])
        with fused_kernels():
            out = impls["subq_fused"](inp)
            grads = torch.autograd.grad(out, [inp[k] for k in GRAD_KEYS], dout)
        grads_ref = torch.autograd.grad(ref, [leaves64[k] for k in GRAD_KEYS], dout.double())
        for g, g_ref in zip(grads, grads_ref, strict=True):
            rel["subq_fused_grads"] = max(rel["subq_fused_grads"], ((g.double() - g_ref).norm() / g_ref.norm()).item())
    tol = 1e-2 if args.dtype in ("bf16", "fp16") else 1e-4
    worst = max(rel.values())
    return {"rel_err": worst, "rel_err_by_impl": rel, "tol": tol, "ok": worst <= tol}


def main() -> None:
    args = parse_args()
    torch.manual_seed(0)
    device, dtype = args.device, h.DTYPES[args.dtype]
    env = h.environment(device)
    peak = h.matmul_peak_tflops(dtype, device, args.repeats)
    print(f"{env['device_name']} | torch {env['torch']} | subq cuda_built={env['subq_cuda_built']} | {env['timer']}")
    print(f"measured peak: matmul {peak:.1f} TFLOP/s ({args.dtype}); tokens per row {args.tokens}, d={args.d_model}, "
          f"e={2 * args.d_model}, s={args.s}, C={args.chunk_size}")
    correctness = check(args, device)
    print(f"check subq vs float64 reference: rel err {correctness['rel_err']:.2e} "
          f"({'ok' if correctness['ok'] else 'FAIL'}, tol {correctness['tol']})")
    rows = []
    for mode in MODES:
        causal = mode == "causal"
        impls = implementations(args, causal)
        print(f"\n{mode}: ms per call")
        print(h.comparison_header(f"{'L':>6} {'B':>4} {'pass':<7}", impls))
        for seqlen in args.seqlen:
            inp = make_inputs(args, seqlen, dtype, device)
            for pass_name in PASSES:
                timed = {name: time_impl(fn, inp, pass_name, name, device, args.repeats)
                         for name, fn in impls.items()}
                scale = {"fwd": (1, 1), "fwd+bwd": (3, 3.5)}[pass_name]
                flops = {name: scale[0] * flash_flops(args, seqlen) for name in impls}
                for name in impls:
                    if name.startswith("sdpa"):
                        flops[name] = scale[1] * sdpa_flops(args, seqlen, causal)
                row = {"mode": mode, "seqlen": seqlen, "batch": args.tokens // seqlen, "pass": pass_name,
                       "flops": flops, **h.comparison(timed, flops, peak)}
                rows.append(row)
                print(f"{seqlen:>6} {row['batch']:>4} {pass_name:<7} {h.comparison_cells(row, impls)}", flush=True)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    growth = {}
    for mode in MODES:
        for pass_name in PASSES:
            by_len = {r["seqlen"]: r["ms"] for r in rows if r["pass"] == pass_name and r["mode"] == mode}
            lens = sorted(by_len)
            if len(lens) < 2:
                continue
            key = f"{mode} {pass_name}"
            growth[key] = {name: None if by_len[lens[-1]][name] is None or by_len[lens[-2]][name] is None
                           else by_len[lens[-1]][name] / by_len[lens[-2]][name] for name in by_len[lens[-1]]}
            cells = " ".join(f"{name}={h.fmt(v, '.2f')}" for name, v in growth[key].items())
            print(f"t({lens[-1]}) / t({lens[-2]}) {key}: {cells}")
    for row in rows:
        for name, err in row["errors"].items():
            print(f"!!! {name} failed at L={row['seqlen']} {row['mode']} {row['pass']}: {err}")
    h.write_json(args.out, {
        "benchmark": "flash", "env": env,
        "config": {k: getattr(args, k) for k in ("tokens", "d_model", "s", "chunk_size", "seqlen", "dtype",
                                                  "repeats", "quick")} | {"e": 2 * args.d_model,
                                                                           "sdpa_headdims": SDPA_HEADDIMS},
        "peak": {"matmul_tflops": peak},
        "checks": {"subq_vs_reference_fp64": correctness, "growth_last_two_lengths": growth,
                   "all_ok": correctness["ok"]},
        "rows": rows,
    })
    print(f"wrote {args.out}")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seqlen", type=int, nargs="+", help=f"default {FULL['seqlen']}; --quick {QUICK['seqlen']}")
    parser.add_argument("--tokens", type=int, help="batch * seqlen per row (default 65536)")
    parser.add_argument("--d-model", dest="d_model", type=int)
    parser.add_argument("--s", type=int, help="query/key feature size")
    parser.add_argument("--chunk-size", dest="chunk_size", type=int, choices=(64, 128, 256, 512))
    parser.add_argument("--dtype", choices=list(h.DTYPES), default="bf16")
    parser.add_argument("--device", default=h.default_device())
    parser.add_argument("--repeats", type=int, help="minimum timed calls (default 20 on GPU, 3 on CPU)")
    parser.add_argument("--out", type=Path, help="JSON path (default bench/results/flash_<device>.json)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke run")
    args = parser.parse_args()
    sizes = QUICK if args.quick else FULL
    for key in ("tokens", "d_model", "s", "chunk_size", "seqlen"):
        if getattr(args, key) is None:
            setattr(args, key, sizes[key])
    bad = [L for L in args.seqlen if L > args.tokens or args.tokens % L]
    if bad:
        parser.error(f"every seqlen must divide --tokens ({args.tokens}); got {bad}")
    if args.d_model % max(SDPA_HEADDIMS):
        parser.error(f"--d-model must be a multiple of {max(SDPA_HEADDIMS)} (the SDPA head dims)")
    args.device = torch.device(args.device)
    args.repeats = args.repeats or (20 if args.device.type == "cuda" else 3)
    args.out = args.out or h.default_out("flash", args.device)
    return args


if __name__ == "__main__":
    main()
