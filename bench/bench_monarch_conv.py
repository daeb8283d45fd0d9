"""Monarch long convolution, side by side in one process: subq.ops.monarch_conv, by default and with its FFT-free
Monarch DFT forced, vs the usual torch.fft convolution (rfft/irfft at n = 2L, as HazyResearch's fftconv_ref) with the
same gating and skip, in the same dtype:

    y = postgate * (conv(pregate * u, k) + D * (pregate * u))      u, gates (B, H, L); k (, k_rev) (H, L) float32

    python bench/bench_monarch_conv.py                         # B=64, H=768, L 256..1M (smaller B from 16K), bf16
    python bench/bench_monarch_conv.py --bidirectional         # M2-BERT's two-sided filter
    python bench/bench_monarch_conv.py --quick --device cpu    # smoke run

Implementations: subq (the default, algorithm="auto": ATen's FFT on CPU, the Monarch DFT on CUDA), subq_monarch
(algorithm="monarch" on either device: batched small DFT matmuls, no FFT library), subq_fused (the default with
SUBQ_EXPERIMENTAL_CONV_KERNELS=1 around its forward and backward calls: on CUDA the fused Monarch-DFT forward and
backward kernels for M <= 32K where the device's shared memory holds a row (the backward also needs its workspace,
B H (M/2 + 1) complex, within 8 GiB), the composite beyond; on CPU the same as subq) and torch_fft. Reports per length
and pass (fwd, fwd+bwd): time of each, the speedup of each subq one over torch_fft (torch_fft ms / its ms), the peak
memory each allocates beyond its inputs (GPU only) and its ratio to torch_fft's. All run transforms in float32
(torch.fft has no bfloat16 and only power-of-two float16); subq pads to fft_size(L) >= 2L, torch_fft to exactly 2L.
Without the flag, subq on CUDA is the ATen composite with Monarch-DFT matmuls, so there subq and subq_monarch run
the same code.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Callable
from pathlib import Path

import torch

import _harness as h
from subq.ops import monarch_conv
from subq.reference import monarch_conv_fft_ref

FULL = {"batch": 64, "heads": 768, "seqlen": [256, 1024, 4096, 16384, 65536, 262144, 1048576]}
QUICK = {"batch": 2, "heads": 8, "seqlen": [256, 1000, 4097]}
MAX_TOKENS = 64 * 16384  # batch * seqlen cap: the batch shrinks from L = 16K on (B = 1 at L = 1M)
PASSES = ("fwd", "fwd+bwd")
GRAD_INPUTS = ("u", "k", "k_rev", "pregate", "postgate", "D")
SUBQ_IMPLS = ("subq", "subq_monarch", "subq_fused")
FUSED_IMPL = "subq_fused"


def batch_for(args, seqlen: int) -> int:
    return max(1, min(args.batch, MAX_TOKENS // seqlen))


def make_inputs(args, batch: int, seqlen: int, dtype, device) -> dict:
    kw = dict(device=device, requires_grad=True)
    decay = torch.exp(-torch.arange(seqlen, device=device) / (seqlen / 4))
    inp = {
        "u": torch.randn(batch, args.heads, seqlen, dtype=dtype, **kw),
        "k": (torch.randn(args.heads, seqlen, device=device) * decay).requires_grad_(),
        "pregate": torch.randn(batch, args.heads, seqlen, dtype=dtype, **kw),
        "postgate": torch.randn(batch, args.heads, seqlen, dtype=dtype, **kw),
        "D": torch.randn(args.heads, **kw),
    }
    if args.bidirectional:
        inp["k_rev"] = (torch.randn(args.heads, seqlen, device=device) * decay).requires_grad_()
    return inp


def implementations() -> dict[str, Callable]:
    def subq_fn(algorithm):
        def run(inp):
            return monarch_conv(inp["u"], inp["k"], k_rev=inp.get("k_rev"), pregate=inp["pregate"],
                                postgate=inp["postgate"], D=inp["D"], algorithm=algorithm)
        return run

    def torch_fft(inp):
        return monarch_conv_fft_ref(inp["u"], inp["k"], inp.get("k_rev"), inp["pregate"], inp["postgate"], inp["D"])

    return {"subq": subq_fn("auto"), "subq_monarch": subq_fn("monarch"), FUSED_IMPL: subq_fn("auto"),
            "torch_fft": torch_fft}


def fused_flag(name: str) -> contextlib.AbstractContextManager[None]:
    """For subq_fused, the fused kernels' opt-in flag set over the whole call, forward and backward; for the
    others, the environment as it is."""
    return h.opt_in("monarch_conv", on=name == FUSED_IMPL)


def make_call(name, fn, inp, pass_name):
    if pass_name == "fwd":
        def forward():
            with fused_flag(name), torch.no_grad():
                return fn(inp)
        return forward
    leaves = [inp[k] for k in GRAD_INPUTS if k in inp]

    def forward_backward():
        with fused_flag(name):
            out = fn(inp)
            return torch.autograd.grad(out, leaves, torch.ones_like(out))
    return forward_backward


def peak_extra_bytes(call, device) -> int | None:
    """Peak memory one call allocates beyond what was already allocated (GPU; None on CPU)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    call()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base


def measure(name, fn, inp, pass_name, device, repeats):
    call = make_call(name, fn, inp, pass_name)
    try:
        return h.median_ms(call, device, repeats), peak_extra_bytes(call, device), None
    except (RuntimeError, torch.OutOfMemoryError) as err:
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return None, None, str(err).splitlines()[0][:200]


def check(args, device) -> dict:
    """Each subq implementation in the benchmarked dtype against the float64 torch.fft form, smallest size, all
    gates: the output, and the gradients of every input (the worst relative error of the six) for one random dy."""
    seqlen = min(args.seqlen)
    inp = make_inputs(args, batch_for(args, seqlen), seqlen, h.DTYPES[args.dtype], device)
    tol = 1e-2 if args.dtype in ("bf16", "fp16") else 1e-4
    names = [k for k in GRAD_INPUTS if k in inp]
    inp64 = {k: inp[k].detach().double().requires_grad_() for k in names}
    ref = monarch_conv_fft_ref(*(inp64.get(k) for k in ("u", "k", "k_rev", "pregate", "postgate", "D")))
    dy = torch.randn_like(ref)
    grads_ref = torch.autograd.grad(ref, [inp64[k] for k in names], dy)
    impls = implementations()
    out = {}
    for name in SUBQ_IMPLS:
        with fused_flag(name):
            y = impls[name](inp)
            grads = torch.autograd.grad(y, [inp[k] for k in names], dy.to(y.dtype))
        rel = ((y.double() - ref).norm() / ref.norm()).item()
        grad_rel = max(((g.double() - g_ref).norm() / g_ref.norm()).item()
                       for g, g_ref in zip(grads, grads_ref, strict=True))
        out[name] = {"rel_err": rel, "grad_rel_err": grad_rel, "tol": tol, "ok": max(rel, grad_rel) <= tol}
    return out


def ratio(num, den):
    return None if num is None or den is None or den == 0 else num / den


def main() -> None:
    args = parse_args()
    torch.manual_seed(0)
    device, dtype = args.device, h.DTYPES[args.dtype]
    env = h.environment(device)
    print(f"{env['device_name']} | torch {env['torch']} | subq cuda_built={env['subq_cuda_built']} | {env['timer']}")
    correctness = check(args, device)
    for name, c in correctness.items():
        print(f"check {name} vs float64 torch.fft: rel err {c['rel_err']:.2e}, gradients {c['grad_rel_err']:.2e} "
              f"({'ok' if c['ok'] else 'FAIL'}, tol {c['tol']})")
    impls = implementations()
    mode = "bidirectional" if args.bidirectional else "causal"
    print(f"{mode}, {args.dtype}, H={args.heads}; speedup = torch_fft ms / ms, mem = MiB / torch_fft MiB")
    print(f"{'L':>8} {'B':>3} {'pass':<7} " + " ".join(f"{name + ' ms':>15}" for name in impls) + " "
          + " ".join(f"{name + ' speedup':>20} {name + ' mem':>16}" for name in SUBQ_IMPLS))
    rows = []
    for seqlen in args.seqlen:
        batch = batch_for(args, seqlen)
        try:
            inp = make_inputs(args, batch, seqlen, dtype, device)
        except torch.OutOfMemoryError as err:
            print(f"!!! L={seqlen}: inputs do not fit: {str(err).splitlines()[0][:120]}")
            continue
        for pass_name in PASSES:
            timed = {name: measure(name, fn, inp, pass_name, device, args.repeats) for name, fn in impls.items()}
            ms = {name: t[0] for name, t in timed.items()}
            mem = {name: t[1] for name, t in timed.items()}
            row = {
                "seqlen": seqlen, "batch": batch, "heads": args.heads, "pass": pass_name, "ms": ms,
                "peak_extra_bytes": mem,
                "speedup_vs_torch_fft": {name: ratio(ms["torch_fft"], ms[name]) for name in SUBQ_IMPLS},
                "mem_ratio_over_torch_fft": {name: ratio(mem[name], mem["torch_fft"]) for name in SUBQ_IMPLS},
                "errors": {k: t[2] for k, t in timed.items() if t[2] is not None},
            }
            rows.append(row)
            print(f"{seqlen:>8} {batch:>3} {pass_name:<7} "
                  + " ".join(f"{h.fmt(ms[name], '.3f'):>15}" for name in impls) + " "
                  + " ".join(f"{h.fmt(row['speedup_vs_torch_fft'][name], '.2f'):>19}x "
                             f"{h.fmt(row['mem_ratio_over_torch_fft'][name], '.2f'):>16}" for name in SUBQ_IMPLS),
                  flush=True)
        del inp
        if device.type == "cuda":
            torch.cuda.empty_cache()
    for row in rows:
        for name, err in row["errors"].items():
            print(f"!!! {name} failed at L={row['seqlen']} {row['pass']}: {err}")
    h.write_json(args.out, {
        "benchmark": "monarch_conv", "env": env,
        "config": {k: getattr(args, k) for k in ("batch", "heads", "seqlen", "dtype", "repeats", "quick",
                                                  "bidirectional")}
        | {"max_tokens": MAX_TOKENS, "gating": "pregate, postgate, D", "filter_dtype": "float32"},
        "checks": {"vs_torch_fft_fp64": correctness, "all_ok": all(c["ok"] for c in correctness.values())},
        "rows": rows,
    })
    print(f"wrote {args.out}")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seqlen", type=int, nargs="+", help=f"default {FULL['seqlen']}; --quick {QUICK['seqlen']}")
    parser.add_argument("--batch", type=int, help=f"largest batch (capped so batch * seqlen <= {MAX_TOKENS})")
    parser.add_argument("--heads", type=int)
    parser.add_argument("--dtype", choices=list(h.DTYPES), default="bf16")
    parser.add_argument("--bidirectional", action="store_true", help="two-sided filter (M2-BERT); default causal")
    parser.add_argument("--device", default=h.default_device())
    parser.add_argument("--repeats", type=int, help="minimum timed calls (default 20 on GPU, 3 on CPU)")
    parser.add_argument("--out", type=Path, help="JSON path (default bench/results/monarch_conv_<device>.json)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke run")
    args = parser.parse_args()
    sizes = QUICK if args.quick else FULL
    for key in ("batch", "heads", "seqlen"):
        if getattr(args, key) is None:
            setattr(args, key, sizes[key])
    args.device = torch.device(args.device)
    args.repeats = args.repeats or (20 if args.device.type == "cuda" else 3)
    prefix = "monarch_conv_bidir" if args.bidirectional else "monarch_conv"
    args.out = args.out or h.default_out(prefix, args.device)
    return args


if __name__ == "__main__":
    main()
