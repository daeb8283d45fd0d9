"""``flash_step``: one step of causal FLASH decoding (no gate u or relative bias, quad_scale 1/C, lin_scale 1/(t + 1)),
its ``FlashDecodeState`` updated in place, against the same step in plain PyTorch ops (``flash_step_plain`` below:
subq has no reference for the step, whose contract is equality with causal flash_chunk_attention). Forward only.

No full-recompute baseline: recomputing the token's output from the whole prefix is flash_chunk_attention's forward
at L = t + 1, which its own entry profiles; a row here would time that again under another name.

Size (ops/flash_sizes.py): b ``batch``, S ``qk_dim``, E ``value_dim``, C ``chunk_size``, t ``position`` (the
token's index in the sequence). What a step does depends on i = t mod C: it attends to the i + 1 keys of its chunk so
far, and the first token of a chunk (i = 0, t > 0) first folds the finished chunk's K_linᵀV into the linear state.
The grids take the first and the last token of a chunk. The state is fp32 (FlashDecodeState): lin_state and
chunk_kv (b, S, E), k_quad_cache (b, C, S), v_cache (b, C, E); its values are random (they do not change the work).

matmul FLOPs, both callables: scores K_quad q_quad 2 (i + 1) S, relu(.)² V 2 (i + 1) E, the linear output
  q_lin lin_state 2 S E: 2 b ((i + 1)(S + E) + S E). (The chunk state update k_lin ⊗ v is elementwise.)
useful FLOPs: the same plus that update, 2 S E: 2 b ((i + 1)(S + E) + 2 S E), one token's share of
  flash_chunk_attention's useful FLOPs.
Minimum bytes, per step: the token's q_quad, k_quad, q_lin, k_lin, v in and the output out; of the state, chunk_kv
  read and written (S E each), lin_state read (S E) and, at a chunk's first token, added to and written (S E more),
  the new cache row written and the i rows before it read ((i + 1)(S + E)), all fp32:
  4 b ((3 + [i = 0 < t]) S E + (i + 1)(S + E)).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import subq
from subq.ops import FlashDecodeState
from subq.profile.ops.base import STATE_DTYPE, Impl, Inputs, OpSpec, Size, normal
from subq.profile.ops.flash_sizes import ABBREV, invalid

_TOKEN = ("q_quad", "k_quad", "q_lin", "k_lin", "v")
_STATE = ("lin_state", "chunk_kv", "k_quad_cache", "v_cache")


def flash_step_plain(state: FlashDecodeState, q_quad: torch.Tensor, k_quad: torch.Tensor, q_lin: torch.Tensor,
                     k_lin: torch.Tensor, v: torch.Tensor, *, lin_scale: float) -> torch.Tensor:
    """``subq.ops.flash_step`` (no gate or bias, quad_scale 1/C) for (b, S) / (b, E) tokens, in PyTorch ops: the
    token's inputs cast to the state's fp32, the output in v's dtype."""
    C, position = state.chunk_size, state.position
    i = position % C
    if i == 0 and position > 0:  # the finished chunk joins the linear state: causal reads strictly earlier chunks
        state.lin_state += state.chunk_kv
        state.chunk_kv.zero_()
    ct = state.lin_state.dtype
    k_quad, v32 = k_quad.to(ct), v.to(ct)
    state.k_quad_cache[:, i] = k_quad
    state.v_cache[:, i] = v32
    state.chunk_kv += k_lin.to(ct)[:, :, None] * v32[:, None, :]
    kernel = F.relu(state.k_quad_cache[:, : i + 1] @ q_quad.to(ct)[:, :, None] / C).square()  # (b, i + 1, 1)
    quad = kernel.transpose(1, 2) @ state.v_cache[:, : i + 1]                                   # (b, 1, E)
    lin = q_lin.to(ct)[:, None] @ state.lin_state                                              # (b, 1, E)
    state.position += 1
    return (quad + lin_scale * lin)[:, 0].to(v.dtype)


def _in_chunk(size: Size) -> int:
    return size["position"] % size["chunk_size"]


def _matmul_flops(size: Size, pass_name: str) -> float:
    b, S, E = size["batch"], size["qk_dim"], size["value_dim"]
    return 2 * b * ((_in_chunk(size) + 1) * (S + E) + S * E)


def _useful_flops(size: Size, pass_name: str) -> float:
    return _matmul_flops(size, pass_name) + 2 * size["batch"] * size["qk_dim"] * size["value_dim"]


def _state_bytes(size: Size) -> int:
    b, S, E, i = size["batch"], size["qk_dim"], size["value_dim"], _in_chunk(size)
    folds = i == 0 and size["position"] > 0
    return STATE_DTYPE.itemsize * b * ((4 if folds else 3) * S * E + (i + 1) * (S + E))


def _inputs(size: Size, dtype: torch.dtype, device: torch.device) -> Inputs:
    b, S, E, C = size["batch"], size["qk_dim"], size["value_dim"], size["chunk_size"]
    inputs = {name: normal(b, S, dtype=dtype, device=device) for name in _TOKEN[:-1]}
    inputs["v"] = normal(b, E, dtype=dtype, device=device)
    for name, shape in zip(_STATE, ((b, S, E), (b, S, E), (b, C, S), (b, C, E)), strict=True):
        inputs[name] = normal(*shape, dtype=STATE_DTYPE, device=device)
    inputs["dy"] = torch.empty(b, E, device=device, dtype=dtype)  # only its shape is read: the output's bytes
    return inputs


def _work_bytes(size: Size, dtype: torch.dtype) -> int:
    """The check's two copies of the state, the k_lin ⊗ v product, fp32 casts: a generous 4 states."""
    b, S, E, C = size["batch"], size["qk_dim"], size["value_dim"], size["chunk_size"]
    return 4 * STATE_DTYPE.itemsize * b * (2 * S * E + C * (S + E))


def _step(i: Inputs, s: Size, fn) -> torch.Tensor:
    state = FlashDecodeState(*(i[n] for n in _STATE), position=s["position"])
    return fn(state, *(i[n] for n in _TOKEN), lin_scale=1 / (s["position"] + 1))


FLASH_STEP = OpSpec(
    name="flash_step",
    summary="FLASH causal decoding step (memory-bound, forward only); baseline: the step in plain PyTorch ops",
    full={"batch": [1, 16, 64], "qk_dim": [128], "value_dim": [1536], "chunk_size": [256], "position": [256, 511]},
    quick={"batch": [2], "qk_dim": [32], "value_dim": [64], "chunk_size": [64], "position": [64, 127]},
    make_inputs=_inputs,
    impls=(
        Impl("subq", lambda i, s: _step(i, s, subq.ops.flash_step), _TOKEN, _matmul_flops, _useful_flops),
        Impl("flash_step_plain", lambda i, s: _step(i, s, flash_step_plain), _TOKEN, _matmul_flops, _useful_flops),
    ),
    check_against="flash_step_plain",
    work_bytes=_work_bytes,
    invalid=invalid,
    abbrev=ABBREV,
    passes=("fwd",),
    state=_STATE,
    state_bytes=_state_bytes,
)
