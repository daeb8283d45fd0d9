"""subq-profile: FLOP and bandwidth utilization of every subq op and its baselines over a size grid, against the
device's matmul peak and copy bandwidth measured in the same run. Writes a table, JSON, CSV and a roofline PNG.

    subq-profile                                # every op, full grid, on the GPU if there is one
    subq-profile --quick --device cpu           # the small grid (under 2 minutes on a 2-core CPU)
    subq-profile --ops ssd_chunk_scan --seqlen 2048 8192 --bwd
    subq-profile --compare A.json B.json        # B's time / A's time per row: GPUs, commits, settings

A bad request (unknown op, a dtype the device cannot run, a size that would not fit) is one line on stderr and
exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from subq.profile import ceilings, report, roofline
from subq.profile.device import (
    DTYPES,
    check_dtype,
    default_device,
    default_dtype,
    device_name,
    environment,
    free_bytes,
    resolve_device,
    slug,
)
from subq.profile.errors import ProfileError
from subq.profile.ops import OPS, PASSES
from subq.profile.progress import Progress
from subq.profile.runner import Plan, run

MEMORY_HEADROOM = 0.9  # of the free memory: the allocator's fragmentation and the ceilings' buffers need the rest


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not argparse's usage block
        raise ProfileError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="subq-profile", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ops", nargs="+", metavar="OP", help=f"ops to profile (default all: {', '.join(OPS)})")
    parser.add_argument("--device", help="cuda, cuda:N or cpu (default: the GPU when there is one, else the CPU)")
    parser.add_argument("--dtype", help=f"one of {', '.join(DTYPES)} (default bf16 on a GPU, fp32 on a CPU)")
    parser.add_argument("--seqlen", type=int, nargs="+", help="sequence lengths, replacing each op's grid's")
    parser.add_argument("--batch", type=int, nargs="+", help="batch sizes, replacing each op's grid's")
    parser.add_argument("--grid", nargs="+", default=[], metavar="AXIS=V[,V...]",
                        help="replace any grid axis, e.g. n=1024,4096 nblocks=4 (see --list for the axes)")
    parser.add_argument("--fwd", action="store_true", help="forward pass only")
    parser.add_argument("--bwd", action="store_true", help="forward+backward only (with --fwd: both, the default)")
    parser.add_argument("--quick", action="store_true", help="the small grid: a smoke run in minutes on a CPU")
    parser.add_argument("--repeats", type=int, help="minimum timed calls per measurement (default 50 on a GPU, "
                                                    "where at least 100 ms is also timed; 5 on a CPU)")
    parser.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's); 1 on a shared machine, "
                                                    "where threads competing with other jobs time the scheduler")
    parser.add_argument("--out", type=Path, help="output folder (default bench/results/ inside the subq repo, "
                                                 "else ./subq-profile-results/); files profile_<device>.{json,csv,png}"
                                                 ", or <op>_<device>.* for --ops with one op")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    parser.add_argument("--list", action="store_true", help="list the ops, their callables and grids, and exit")
    parser.add_argument("--compare", nargs=2, type=Path, metavar=("A.json", "B.json"),
                        help="print B's time / A's time for every row the two runs share, and exit")
    return parser


def parse_grid(items: list[str]) -> dict[str, list[int]]:
    grid = {}
    for item in items:
        axis, sep, values = item.partition("=")
        try:
            grid[axis] = [int(v) for v in values.split(",")]
        except ValueError:
            sep = ""
        if not sep or not axis:
            raise ProfileError(f"--grid {item!r}: expected AXIS=V[,V...] with integer values, e.g. n=1024,4096")
    return grid


def default_out_dir() -> Path:
    """bench/results/ of the subq checkout the command runs in, else ./subq-profile-results/."""
    cwd = Path.cwd()
    for folder in (cwd, *cwd.parents):
        if (folder / "bench" / "results").is_dir() and (folder / "python" / "subq").is_dir():
            return folder / "bench" / "results"
    return cwd / "subq-profile-results"


def _gib(nbytes: float) -> str:
    return f"{nbytes / 2**30:.1f} GiB"


def make_plan(args: argparse.Namespace) -> tuple[Plan, str]:
    """Everything checked before anything large is allocated: names, device, dtype, sizes and their memory."""
    names = args.ops or list(OPS)
    unknown = [name for name in names if name not in OPS]
    if unknown:
        raise ProfileError(f"unknown op {unknown[0]!r}; known ops: {', '.join(OPS)}")
    passes = tuple(p for p, wanted in zip(PASSES, (args.fwd, args.bwd), strict=True) if wanted) or PASSES
    specs = [OPS[name] for name in dict.fromkeys(names)]
    passless = [spec.name for spec in specs if not set(spec.passes) & set(passes)]
    if passless and args.ops:
        raise ProfileError(f"{passless[0]} has no backward (a decode step): drop --bwd or the op")
    specs = [spec for spec in specs if spec.name not in passless]  # the default "every op" skips them silently
    device = resolve_device(args.device or default_device())
    dtype_name = args.dtype or default_dtype(device)
    dtype = check_dtype(dtype_name, device)

    # "is None", not "or": --repeats 0 is a bad request, not a request for the default.
    repeats = args.repeats if args.repeats is not None else (50 if device.type == "cuda" else 5)
    if repeats < 1:
        raise ProfileError(f"--repeats must be at least 1, got {repeats}")
    if args.threads is not None and args.threads < 1:
        raise ProfileError(f"--threads must be at least 1, got {args.threads}")

    overrides = parse_grid(args.grid)
    for axis in ("batch", "seqlen"):
        if getattr(args, axis):
            overrides[axis] = getattr(args, axis)
    axes = {axis for spec in specs for axis in spec.full}
    stray = [axis for axis in overrides if axis not in axes]
    if stray:
        raise ProfileError(f"--grid {stray[0]}: no selected op has that axis (axes: {', '.join(sorted(axes))})")
    sizes = {spec.name: spec.sizes(args.quick, overrides) for spec in specs}

    free = free_bytes(device)
    for spec in specs:
        for size in sizes[spec.name]:
            need = spec.memory_bytes(size, dtype, device)
            if need > MEMORY_HEADROOM * free:
                raise ProfileError(f"{spec.name} at {spec.label(size)} ({dtype_name}) needs about {_gib(need)}, "
                                   f"{device} has {_gib(free)} free: choose smaller sizes (--seqlen, --batch, --grid)")

    return Plan(specs, sizes, dtype, device, passes, repeats), dtype_name


def list_ops() -> str:
    lines = []
    for spec in OPS.values():
        lines.append(f"{spec.name}: {spec.summary}")
        lines.append(f"  callables: {', '.join(i.name for i in spec.impls)}; passes: {', '.join(spec.passes)}")
        lines.append(f"  grid:  {' '.join(f'{k}={v}' for k, v in spec.full.items())}")
        lines.append(f"  quick: {' '.join(f'{k}={v}' for k, v in spec.quick.items())}")
    return "\n".join(lines)


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    if args.compare:
        print(report.compare(*args.compare))
        return 0
    if args.list:
        print(list_ops())
        return 0
    plan, dtype_name = make_plan(args)
    out = args.out or default_out_dir()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ProfileError(f"--out {out}: cannot create the folder ({err.strerror})") from None

    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = plan.device
    if device.type == "cuda":
        torch.cuda.set_device(device)
    env = environment(device)
    print(f"{env['device_name']} | torch {env['torch']} CUDA {env['cuda']} | subq cuda_built={env['subq_cuda_built']} "
          f"archs='{env['subq_cuda_archs']}' | timer {env['timer']} | {dtype_name}")
    peak = ceilings.measure(plan.dtype, device, plan.repeats)
    print(f"measured ceilings: matmul {peak['matmul_tflops']:.4g} TFLOP/s ({dtype_name}, {peak['matmul_size']}^3), "
          f"copy {peak['copy_gbs']:.4g} GB/s (read + write)")

    progress = Progress(plan.steps(), enabled=not args.no_progress)
    rows = run(plan, peak, progress)
    print(report.table(rows))
    print(report.LEGEND)
    for line in report.skipped_lines(rows):
        print(line)
    checks = report.checks_summary(rows)
    verdict = "all ok" if checks["all_ok"] else f"{checks['failed']} FAILED"
    print(f"checks against the float64 baselines: {verdict}, worst max rel err {checks['max_rel_err']}")

    # One op's run has its own file, so it does not overwrite the every-op profile (and its plot) beside it.
    name = plan.specs[0].name if len(plan.specs) == 1 and args.ops else "profile"
    stem = out / f"{name}_{slug(device_name(device))}"
    payload = {
        "benchmark": "profile", "env": env,
        "config": {"ops": [s.name for s in plan.specs], "dtype": dtype_name, "passes": list(plan.passes),
                   "quick": args.quick, "overrides": parse_grid(args.grid) | {
                       k: v for k, v in (("batch", args.batch), ("seqlen", args.seqlen)) if v},
                   "repeats": plan.repeats, "threads": torch.get_num_threads()},
        "peak": peak,
        "checks": checks,
        "rows": rows,
    }
    report.write_json(stem.with_suffix(".json"), payload)
    report.write_csv(stem.with_suffix(".csv"), rows)
    written = [stem.with_suffix(".json"), stem.with_suffix(".csv")]
    try:
        roofline.plot(rows, peak, f"subq-profile: {env['device_name']}, {dtype_name}", stem.with_suffix(".png"))
        written.append(stem.with_suffix(".png"))
    except ImportError:
        print("subq-profile: no roofline plot: matplotlib is not installed (pip install matplotlib)", file=sys.stderr)
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


def main(argv: list[str] | None = None) -> int:
    """The console script's entry: the exit status (2 and one line on stderr for a bad request)."""
    try:
        return _main(argv)
    except ProfileError as err:
        print(f"subq-profile: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("subq-profile: interrupted", file=sys.stderr)
        return 130
