"""The correctness check of one size, run before its timings: every subq callable (the default path and each opt-in
kernel variant) against the op's same-function baseline (``OpSpec.check_against``) run in float64 on the same
inputs: the forward output and, when the run times a backward, the gradients of the inputs both differentiate, for
the run's output gradient. The error is max |got - want| / max |want| (elementwise relative error blows up on
near-zero entries), the worst over the output and the gradients.

Tolerance, flash-attention's error budget: twice the baseline's own error in the run's dtype, and at least FLOOR
(two correct implementations in 16 bits differ by about one rounding; in fp32 by accumulation order). A failed
check means the timings beside it compare different computations; tests/ decide correctness."""

from __future__ import annotations

import torch

from subq.profile.flags import env_flag
from subq.profile.ops import Impl, OpSpec
from subq.profile.ops.base import Inputs, Size, leaves_of

FLOOR = {torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 1e-2, torch.float64: 1e-10}


def error_text(err: Exception) -> str:
    return f"{type(err).__name__}: {(str(err).splitlines() or [''])[0]}"


def own_state(spec: OpSpec, inputs: Inputs) -> Inputs:
    """The input set with a copy of a decode step's state: one callable's in-place update must not feed the next."""
    return inputs | {name: inputs[name].clone() for name in spec.state}


def in_float64(inputs: Inputs) -> Inputs:
    """The same values in float64, differentiable where they were; integer inputs (group sizes) as they are."""
    return {name: t.detach().double().requires_grad_(t.requires_grad) if t.is_floating_point() else t
            for name, t in inputs.items()}


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    if not want.numel():
        return 0.0
    return ((got.double() - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()


def outputs(impl: Impl, inputs: Inputs, size: Size, gradients: bool) -> dict[str, torch.Tensor]:
    """The forward output ("y") and, with ``gradients``, one "d<leaf>" per leaf for the output gradient inputs["dy"]."""
    with env_flag(impl.flag):
        if not gradients:
            with torch.no_grad():
                return {"y": impl.forward(inputs, size)}
        y = impl.forward(inputs, size)
        leaves = leaves_of(impl, inputs)
        grads = torch.autograd.grad(y, [inputs[n] for n in leaves], inputs["dy"].view(y.shape).to(y.dtype))
    return {"y": y.detach(), **{f"d{n}": g for n, g in zip(leaves, grads, strict=True)}}


def worst(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> float:
    return max(rel_err(got[k], want[k]) for k in got.keys() & want.keys())


def check(spec: OpSpec, inputs: Inputs, size: Size, dtype: torch.dtype, device: torch.device,
          gradients: bool) -> dict | None:
    if spec.check_against is None:
        return None
    baseline = spec.impl(spec.check_against)
    result = {"against": spec.check_against, "reference_dtype": "float64", "gradients": gradients}
    try:
        want = outputs(baseline, own_state(spec, in_float64(inputs)), size, gradients)
        baseline_err = worst(outputs(baseline, own_state(spec, inputs), size, gradients), want)
    except RuntimeError as err:  # the float64 reference itself failed (out of memory at a large size)
        return result | {"max_rel_err": None, "ok": False, "error": error_text(err)}
    tol = max(2 * baseline_err, FLOOR[dtype])
    by_impl, errors = {}, {}
    for impl in spec.impls_on(device):
        if not impl.name.startswith("subq"):
            continue
        try:
            by_impl[impl.name] = worst(outputs(impl, own_state(spec, inputs), size, gradients), want)
        except RuntimeError as err:  # a failing kernel is reported with the timings, not allowed to end the sweep
            errors[impl.name] = error_text(err)
    max_err = max(by_impl.values(), default=None)
    return result | {"max_rel_err": max_err, "by_impl": by_impl, "baseline_rel_err": baseline_err, "tol": tol,
                     "ok": not errors and max_err is not None and max_err <= tol, "errors": errors}
