"""Grouped matmul (the routed projections of Mixture-of-Modules / MoE), side by side in one process: subq's one-launch
CUTLASS grouped GEMM vs a per-group torch loop vs ``torch._grouped_mm`` (when this torch and GPU have it) vs one
dense matmul of the same FLOPs (the ceiling a grouped GEMM aims at), forward and forward+backward.

    python bench/bench_grouped_matmul.py                  # 16K routed rows, 8/32/128 groups, up and down projections
    python bench/bench_grouped_matmul.py --quick          # small sizes

Routing: "balanced" splits the rows evenly, "skewed" draws group shares from a Dirichlet(0.3) (some groups near
empty, a few large). The per-group loop gets its sizes as a Python list (in real use reading them costs a host
sync, not counted here). FLOPs: 2*T*K*N per forward over the routed rows, 3x that with the backward (dx and dw).
GPU only: on a CPU the script prints why it skips and exits 0. The CUTLASS kernels are opt-in until verified on a
GPU (SUBQ_EXPERIMENTAL_GROUPED_GEMM=1); this script sets that flag for its whole run, so "subq" is always them.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

import _harness as h
import subq
from subq.reference import grouped_matmul_ref

FULL = {"tokens": 16384, "groups": [8, 32, 128], "shapes": [(2048, 5632), (5632, 2048)]}
QUICK = {"tokens": 2048, "groups": [8, 32], "shapes": [(512, 1024)]}
ROUTINGS = ("balanced", "skewed")
PASSES = ("fwd", "fwd+bwd")
IMPLS = ("subq", "torch_loop", "torch_grouped_mm", "dense")


@dataclass
class Inputs:
    x: torch.Tensor            # (T, K), rows sorted by group
    w: torch.Tensor            # (G, K, N)
    w_t: torch.Tensor          # (G, N, K) contiguous: torch._grouped_mm wants the K-major weight, used transposed
    dense_w: torch.Tensor      # (K, N)
    group_sizes: torch.Tensor  # (G,) int64 on the device
    offsets: torch.Tensor      # (G,) int32 cumulative ends, torch._grouped_mm's format
    sizes: list[int]           # the same sizes on the host, for the loop
    dy: torch.Tensor           # fixed random upstream gradient

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.x, self.w, self.w_t, self.dense_w, self.dy))


def route(tokens: int, groups: int, routing: str) -> list[int]:
    if routing == "balanced":
        return [tokens // groups + (g < tokens % groups) for g in range(groups)]
    shares = torch.distributions.Dirichlet(torch.full((groups,), 0.3)).sample()
    return torch.multinomial(shares, tokens, replacement=True).bincount(minlength=groups).tolist()


def make_inputs(tokens: int, groups: int, k: int, n: int, routing: str, dtype: torch.dtype,
                device: torch.device) -> Inputs:
    sizes = route(tokens, groups, routing)

    def leaf(*shape: int, fan_in: int = 1) -> torch.Tensor:
        return (torch.randn(*shape, device=device) / fan_in**0.5).to(dtype).requires_grad_()

    w = leaf(groups, k, n, fan_in=k)
    return Inputs(
        x=leaf(tokens, k), w=w, w_t=w.detach().transpose(1, 2).contiguous().requires_grad_(),
        dense_w=leaf(k, n, fan_in=k),
        group_sizes=torch.tensor(sizes, device=device),
        offsets=torch.tensor(sizes, device=device).cumsum(0).to(torch.int32),
        sizes=sizes, dy=torch.randn(tokens, n, device=device).to(dtype))


def torch_loop(x: torch.Tensor, w: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    return torch.cat([x_g @ w[g] for g, x_g in enumerate(x.split(sizes))])


def implementations(inp: Inputs) -> dict[str, tuple[Callable[[], torch.Tensor], tuple[torch.Tensor, ...]]]:
    """Each implementation's forward call and the leaves its backward differentiates."""
    impls = {
        "subq": (lambda: subq.ops.grouped_matmul(inp.x, inp.w, inp.group_sizes), (inp.x, inp.w)),
        "torch_loop": (lambda: torch_loop(inp.x, inp.w, inp.sizes), (inp.x, inp.w)),
        "dense": (lambda: inp.x @ inp.dense_w, (inp.x, inp.dense_w)),
    }
    if hasattr(torch, "_grouped_mm"):
        impls["torch_grouped_mm"] = (lambda: torch._grouped_mm(inp.x, inp.w_t.transpose(1, 2), offs=inp.offsets),
                                     (inp.x, inp.w_t))
    return impls


def make_call(fn: Callable[[], torch.Tensor], leaves: tuple[torch.Tensor, ...], dy: torch.Tensor,
              pass_name: str) -> Callable[[], object]:
    if pass_name == "fwd":
        def forward() -> torch.Tensor:
            with torch.no_grad():
                return fn()
        return forward
    return lambda: torch.autograd.grad(fn(), leaves, dy)


# ---- correctness -----------------------------------------------------------------------------------------------------


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    want = want.double()
    return ((got.double() - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()


def check(inp: Inputs, dtype: torch.dtype) -> dict:
    """subq's output and gradients against the float64 reference on the same inputs."""
    tol = 1e-2 if dtype in (torch.bfloat16, torch.float16) else 1e-3
    try:
        y = subq.ops.grouped_matmul(inp.x, inp.w, inp.group_sizes)
        got = {"y": y, **dict(zip(("dx", "dw"), torch.autograd.grad(y, (inp.x, inp.w), inp.dy), strict=True))}
        x64, w64 = (t.detach().double().requires_grad_() for t in (inp.x, inp.w))
        ref = grouped_matmul_ref(x64, w64, inp.group_sizes)
        want = {"y": ref, **dict(zip(("dx", "dw"), torch.autograd.grad(ref, (x64, w64), inp.dy.double()),
                                     strict=True))}
    except RuntimeError as err:
        return {"ok": False, "tol": tol, "error": str(err).splitlines()[0][:200]}
    errs = {name: rel_err(got[name], want[name]) for name in got}
    return {"max_rel_err": errs, "tol": tol, "ok": max(errs.values()) <= tol}


# ---- the sweep -------------------------------------------------------------------------------------------------------

HEADER = h.comparison_header(f"{'G':>4} {'K':>5} {'N':>5} {'routing':<8} {'pass':<7}", IMPLS)


def bench_config(args: argparse.Namespace, groups: int, k: int, n: int, routing: str, peak: float) -> list[dict]:
    device, dtype = args.device, h.DTYPES[args.dtype]
    sets = [make_inputs(args.tokens, groups, k, n, routing, dtype, device)]
    count = h.input_set_count(sets[0].nbytes(), device)
    sets += [make_inputs(args.tokens, groups, k, n, routing, dtype, device) for _ in range(count - 1)]
    correctness = check(sets[0], dtype)
    if not correctness["ok"]:
        print(f"!!! CHECK FAILED subq vs float64 at G={groups} K={k} N={n} {routing}: {correctness} !!!")
    rows = []
    for pass_name in PASSES:
        scale = 1 if pass_name == "fwd" else 3
        per_set = [implementations(s) for s in sets]
        timed = {}
        for name in per_set[0]:
            calls = [make_call(*impls[name], s.dy, pass_name) for impls, s in zip(per_set, sets, strict=True)]
            timed[name] = h.timed_or_error(h.rotating(calls), device, args.repeats)
        flops = {name: scale * 2 * args.tokens * k * n for name in timed}
        row = {"groups": groups, "k": k, "n": n, "routing": routing, "pass": pass_name, "tokens": args.tokens,
               "max_group": max(sets[0].sizes), "empty_groups": sets[0].sizes.count(0), "input_sets": count,
               "flops": flops, **h.comparison(timed, flops, peak), "check_subq_vs_fp64": correctness}
        rows.append(row)
        print(f"{groups:>4} {k:>5} {n:>5} {routing:<8} {pass_name:<7} {h.comparison_cells(row, IMPLS)}", flush=True)
    del sets
    torch.cuda.empty_cache()
    return rows


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, help=f"routed rows (default {FULL['tokens']}; --quick {QUICK['tokens']})")
    parser.add_argument("--groups", type=int, nargs="+", help=f"default {FULL['groups']}")
    parser.add_argument("--dtype", choices=list(h.DTYPES), default="bf16")
    parser.add_argument("--device", default=h.default_device())
    parser.add_argument("--repeats", type=int, default=30, help="minimum timed calls per measurement")
    parser.add_argument("--out", type=Path, help="JSON path (default bench/results/grouped_matmul_<device>.json)")
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    args = parser.parse_args()
    sizes = QUICK if args.quick else FULL
    args.tokens = args.tokens or sizes["tokens"]
    args.groups = args.groups or sizes["groups"]
    args.shapes = sizes["shapes"]
    args.device = torch.device(args.device)
    return args


def main() -> None:
    args = parse_args()
    os.environ[subq.experimental.for_op("grouped_matmul").env] = "1"  # read by the op on every call
    if args.device.type != "cuda" or not torch.cuda.is_available():
        print(f"skip: bench_grouped_matmul compares CUDA grouped GEMMs and needs a CUDA device (device={args.device}, "
              f"torch.cuda.is_available()={torch.cuda.is_available()}); the CPU path is covered by the tests")
        return
    torch.manual_seed(0)
    device, dtype = args.device, h.DTYPES[args.dtype]
    torch.cuda.set_device(device)
    env = h.environment(device)
    peak = h.matmul_peak_tflops(dtype, device, args.repeats)
    print(f"{env['device_name']} | torch {env['torch']} CUDA {env['cuda']} | subq cuda_built={env['subq_cuda_built']} "
          f"archs='{env['subq_cuda_archs']}' | timer {env['timer']}")
    print(f"measured peak: matmul {peak:.1f} TFLOP/s ({args.dtype}); {args.tokens} routed rows; ms per call; "
          f"speedups are other_ms / subq_ms; torch._grouped_mm available: {hasattr(torch, '_grouped_mm')}")
    print(HEADER)
    rows = [row for k, n in args.shapes for groups in args.groups for routing in ROUTINGS
            for row in bench_config(args, groups, k, n, routing, peak)]
    failed = [r for r in rows if not r["check_subq_vs_fp64"]["ok"]]
    for row in rows:
        for name, err in row["errors"].items():
            print(f"!!! {name} failed at G={row['groups']} K={row['k']} N={row['n']} {row['routing']} "
                  f"{row['pass']}: {err}")
    if failed:
        print(f"!!! subq DISAGREES with the float64 reference in {len(failed) // len(PASSES)} configurations !!!")
    h.write_json(args.out or h.default_out("grouped_matmul", device), {
        "benchmark": "grouped_matmul", "env": env,
        "config": {"tokens": args.tokens, "groups": args.groups, "shapes": args.shapes, "routings": ROUTINGS,
                   "dtype": args.dtype, "repeats": args.repeats, "quick": args.quick},
        "peak": {"matmul_tflops": peak},
        "checks": {"all_ok": not failed},
        "rows": rows,
    })
    print(f"wrote {args.out or h.default_out('grouped_matmul', device)}")


if __name__ == "__main__":
    main()
