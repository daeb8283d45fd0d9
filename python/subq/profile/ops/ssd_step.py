"""``ssd_step``: one Mamba-2 decoding step (the selective state update, state updated in place), against the plain
PyTorch step in the same dtype (``subq.reference.ssd_step_ref``, its new state copied back into the state) and
against mamba_ssm's PyTorch step (``Mamba2.step`` without its Triton kernel: two einsums). The inputs are the state,
x, dt (x's dtype, as ssd_step requires), A (fp32), B and C; no D, z or dt processing, as in ops/ssd.py. Forward only.

Size: b ``batch`` (the sequences decoded together), H ``nheads``, P ``headdim``, N ``dstate``, G ``ngroups``; the
state is (b, H, P, N) in fp32 whatever the dtype (ops/base.py STATE_DTYPE), x (b, H, P), dt (b, H), B and C (b, G, N).

FLOPs: the recurrence of ops/ssd.py for one token, b H P (5 N + 1) (the decay exp(dt A), one per (b, h), not
  counted). No matrix product worth the name runs: the einsum form's contractions are size-1 outer products and
  length-N dot products, the same arithmetic, so the "matmul" field holds this count for every callable too (the
  matmul peak is only a loose ceiling; %bandwidth is the figure to read).
Minimum bytes, per step: the state read and written, 2 x 4 b H P N, which dominates; x, dt, B, C, A in and y out.
"""

from __future__ import annotations

import torch

import subq
from subq.profile.ops.base import STATE_DTYPE, Impl, Inputs, OpSpec, Size, normal
from subq.profile.ops.ssd import mamba2_A, mamba2_dt, recurrence_flops
from subq.reference import ssd_step_ref

_TOKEN = ("x", "dt", "A", "B", "C")


def _state_elements(size: Size) -> int:
    return size["batch"] * size["nheads"] * size["headdim"] * size["dstate"]


def _state_bytes(size: Size) -> int:
    return 2 * _state_elements(size) * STATE_DTYPE.itemsize


def _flops(size: Size, pass_name: str) -> float:
    return recurrence_flops(size)


def _invalid(size: Size) -> str | None:
    if min(size.values()) < 1:
        return "every size must be at least 1"
    if size["nheads"] % size["ngroups"]:
        return f"ngroups={size['ngroups']} must divide nheads={size['nheads']}"
    return None


def _inputs(size: Size, dtype: torch.dtype, device: torch.device) -> Inputs:
    """Mamba-2's dt and A ranges (ops/ssd.py); B, C scaled so C.B is O(1); a unit-scale state, as after many tokens."""
    b, H, P, N, G = (size[k] for k in ("batch", "nheads", "headdim", "dstate", "ngroups"))
    return {
        "state": normal(b, H, P, N, dtype=STATE_DTYPE, device=device),
        "x": normal(b, H, P, dtype=dtype, device=device), "dt": mamba2_dt(b, H, device=device).to(dtype),
        "A": mamba2_A(H, device), "B": normal(b, G, N, dtype=dtype, device=device, scale=N**-0.5),
        "C": normal(b, G, N, dtype=dtype, device=device, scale=N**-0.5),
        "dy": torch.empty(b, H, P, device=device, dtype=dtype),  # only its shape is read: the output's bytes
    }


def _reference_step(i: Inputs) -> torch.Tensor:
    y, new_state = ssd_step_ref(i["state"], *(i[n] for n in _TOKEN))
    i["state"].copy_(new_state)  # a decoder keeps its state in place, as subq's op does
    return y


def mamba_einsum_step(state: torch.Tensor, x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                      C: torch.Tensor) -> torch.Tensor:
    """mamba_ssm's ``Mamba2.step`` PyTorch path (mamba_ssm/modules/mamba2.py) without D, z and dt processing. It
    supports one group; here the heads are viewed as (G, H / G) so that B and C broadcast over their group's heads,
    which is the same code for G = 1."""
    b, H, P = x.shape
    G, N = B.shape[1:]
    dA = torch.exp(dt * A)
    dBx = torch.einsum("bgh,bgn,bghp->bghpn", dt.view(b, G, H // G), B, x.view(b, G, H // G, P))
    state.copy_(state * dA[:, :, None, None] + dBx.reshape(b, H, P, N))
    y = torch.einsum("bghpn,bgn->bghp", state.view(b, G, H // G, P, N).to(x.dtype), C)
    return y.reshape(b, H, P)


def _work_bytes(size: Size, dtype: torch.dtype) -> int:
    """The new state and its products (dA state, dt x B, the state cast to x's dtype), the check's two copies of the
    state: a generous 8 fp32 states."""
    return 8 * _state_elements(size) * STATE_DTYPE.itemsize


SSD_STEP = OpSpec(
    name="ssd_step",
    summary="Mamba-2 decoding step (memory-bound, forward only); baselines: subq.reference.ssd_step_ref, "
            "mamba_ssm's einsum step",
    full={"batch": [1, 16, 128], "nheads": [32], "headdim": [64], "dstate": [128], "ngroups": [1]},
    quick={"batch": [2], "nheads": [4], "headdim": [32], "dstate": [32], "ngroups": [1]},
    make_inputs=_inputs,
    impls=(
        Impl("subq", lambda i, s: subq.ops.ssd_step(i["state"], *(i[n] for n in _TOKEN)), _TOKEN, _flops, _flops),
        Impl("ssd_step_ref", lambda i, s: _reference_step(i), _TOKEN, _flops, _flops),
        Impl("mamba_einsum", lambda i, s: mamba_einsum_step(i["state"], *(i[n] for n in _TOKEN)), _TOKEN,
             _flops, _flops),
    ),
    check_against="ssd_step_ref",
    work_bytes=_work_bytes,
    invalid=_invalid,
    abbrev={"batch": "b", "nheads": "H", "headdim": "P", "dstate": "N", "ngroups": "G"},
    passes=("fwd",),
    state=("state",),
    state_bytes=_state_bytes,
)
