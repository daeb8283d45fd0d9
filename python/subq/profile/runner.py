"""The sweep: for each op and size, make rotated input sets, check subq against its float64 baseline (check.py), then
time subq, its opt-in variants and every baseline that runs on the device in each pass, and turn times into the row
that the report, JSON and plot read."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from subq.profile.check import check, error_text
from subq.profile.flags import env_flag
from subq.profile.ops import Impl, OpSpec
from subq.profile.ops.base import Inputs, Size, leaves_of
from subq.profile.progress import Progress
from subq.profile.timing import gbs, input_set_count, median_ms, rotating, tflops


@dataclass
class Plan:
    specs: list[OpSpec]
    sizes: dict[str, list[Size]]  # op name -> its sizes
    dtype: torch.dtype
    device: torch.device
    passes: tuple[str, ...]
    repeats: int

    def passes_of(self, spec: OpSpec) -> tuple[str, ...]:
        return tuple(p for p in self.passes if p in spec.passes)

    def steps(self) -> int:
        return sum(len(self.sizes[s.name]) * len(self.passes_of(s)) * len(s.impls_on(self.device))
                   for s in self.specs)


def make_call(impl: Impl, inputs: Inputs, size: Size, pass_name: str) -> Callable[[], object]:
    if pass_name == "fwd":
        def forward() -> torch.Tensor:
            with torch.no_grad(), env_flag(impl.flag):
                return impl.forward(inputs, size)
        return forward
    leaves = tuple(inputs[name] for name in leaves_of(impl, inputs))

    def forward_backward() -> tuple[torch.Tensor, ...]:
        with env_flag(impl.flag):
            out = impl.forward(inputs, size)
            return torch.autograd.grad(out, leaves, inputs["dy"].view(out.shape))
    return forward_backward


def time_impl(impl: Impl, sets: list[Inputs], size: Size, pass_name: str,
              plan: Plan) -> tuple[float | None, str | None]:
    """Median ms, or the error: one failing shape must not lose the rest of an unattended sweep."""
    try:
        calls = [make_call(impl, inputs, size, pass_name) for inputs in sets]
        return median_ms(rotating(calls), plan.device, plan.repeats), None
    except RuntimeError as err:  # kernel checks (TORCH_CHECK) and CUDA OOM both raise RuntimeError
        if plan.device.type == "cuda":
            torch.cuda.empty_cache()
        return None, error_text(err)


def peak_extra_bytes(call: Callable[[], object], device: torch.device) -> int | None:
    """Memory one call allocates beyond what is already allocated (CUDA's allocator statistics; None on a CPU)."""
    if device.type != "cuda":
        return None
    try:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        call()
        torch.cuda.synchronize(device)
    except RuntimeError:  # the timing recorded the error already
        return None
    return torch.cuda.max_memory_allocated(device) - base


def _ratio(num: float | None, den: float | None) -> float | None:
    return None if num is None or den is None else num / den


def _pct(value: float | None, ceiling: float) -> float | None:
    return None if value is None else 100 * value / ceiling


def measure_size(spec: OpSpec, size: Size, plan: Plan, peak: dict, progress: Progress) -> list[dict]:
    progress.begin(f"{spec.name} {spec.label(size)}")
    count = input_set_count(spec.set_bytes(size, plan.dtype), plan.device)
    sets = [spec.make_inputs(size, plan.dtype, plan.device) for _ in range(count)]
    passes = plan.passes_of(spec)
    checked = check(spec, sets[0], size, plan.dtype, plan.device, gradients="fwd+bwd" in passes)
    impls = spec.impls_on(plan.device)
    rows = []
    for pass_name in passes:
        timed, memory = {}, {}
        for impl in impls:
            progress.step(f"{spec.name} {spec.label(size)} {pass_name} {impl.name}")
            timed[impl.name] = time_impl(impl, sets, size, pass_name, plan)
            memory[impl.name] = peak_extra_bytes(make_call(impl, sets[0], size, pass_name), plan.device)
        ms = {name: t[0] for name, t in timed.items()}
        flops = {i.name: i.matmul_flops(size, pass_name) for i in impls}
        useful = {i.name: i.useful_flops(size, pass_name) for i in impls}
        nbytes = {i.name: spec.min_bytes(i, size, plan.dtype, pass_name) for i in impls}
        tf = {name: tflops(flops[name], ms[name]) for name in ms}
        bw = {name: gbs(nbytes[name], ms[name]) for name in ms}
        rows.append({
            "op": spec.name, **size, "size_label": spec.label(size), "pass": pass_name, "input_sets": count,
            "impls": [i.name for i in impls], "skipped": spec.skipped_on(plan.device),
            "ms": ms, "tflops": tf,
            "pct_peak": {name: _pct(v, peak["matmul_tflops"]) for name, v in tf.items()},
            "useful_tflops": {name: tflops(useful[name], ms[name]) for name in ms},
            "gbs": bw,
            "pct_bandwidth": {name: _pct(v, peak["copy_gbs"]) for name, v in bw.items()},
            "matmul_flops": flops, "useful_flops": useful, "min_bytes": nbytes,
            "intensity": {name: flops[name] / nbytes[name] for name in ms},
            "speedup_subq_vs": {i.name: _ratio(ms[i.name], ms[spec.subq.name]) for i in impls[1:]},
            "peak_extra_bytes": memory,
            "errors": {name: t[1] for name, t in timed.items() if t[1] is not None},
            "check_subq_vs": checked,
        })
    del sets
    if plan.device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def run(plan: Plan, peak: dict, progress: Progress) -> list[dict]:
    rows = []
    try:
        for spec in plan.specs:
            for size in plan.sizes[spec.name]:
                rows += measure_size(spec, size, plan, peak, progress)
    finally:
        progress.close()
    return rows
