"""The emulated cases: every hand-written CUDA kernel, forward and backward, every dtype it takes, shapes that reach
the tile and remainder paths, called through the public ops (tests/emu_support.py). `cases()` is the full set
(tests/test_emulated_kernels.py runs each in three schedules); `tiny_cases()` one small case per kernel for the
ASan+UBSan and TSan runners. Inputs are fresh random values from a seeded generator (never zeros)."""
from __future__ import annotations

import torch

import subq
from emu_support import Case
from subq.reference.causal_conv1d import causal_conv1d_ref, causal_conv1d_update_ref
from subq.reference.flash import flash_chunked_ref
from subq.reference.grouped_matmul import grouped_matmul_ref
from subq.reference.monarch_conv import monarch_conv_ref
from subq.reference.rmsnorm_gated import rmsnorm_gated_ref
from subq.reference.ssd import ssd_chunked_ref
from subq.reference.ssd_step import ssd_step_ref

LOW = (torch.float32, torch.float16, torch.bfloat16)
HALF = (torch.float16, torch.bfloat16)  # the SSD and FLASH kernels are 16-bit only (tensor cores)


def _g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(g, *shape, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape, generator=g) * scale).to(dtype)


def _tag(dtype) -> str:
    return str(dtype).replace("torch.", "")


# ---- causal_conv1d ------------------------------------------------------------------------------------------------

def _update_op(**kw):
    return subq.ops.causal_conv1d_update(**kw), kw["conv_state"]


def _causal_conv1d_update_ref(**kw):
    state = kw["conv_state"].clone()
    return causal_conv1d_update_ref(**{**kw, "conv_state": state}), state


def conv1d_cases(batch, dim, seqlen, width, dtype, seed, variant="plain") -> list[Case]:
    g = _g(seed)
    x = _randn(g, batch, dim, seqlen, dtype=dtype)
    if variant == "channels_last":
        x = x.transpose(1, 2).contiguous().transpose(1, 2)
    inputs = dict(x=x, weight=_randn(g, dim, width, scale=0.5), bias=_randn(g, dim), activation="silu")
    if variant == "seq_idx":
        inputs["seq_idx"] = torch.sort(torch.randint(0, 3, (batch, seqlen), generator=g), dim=1).values.int()
    else:
        inputs["return_final_states"] = True
    if variant == "initial_states":
        inputs["initial_states"] = _randn(g, batch, dim, width - 1, dtype=dtype)
    name = f"conv1d_{variant}_b{batch}_d{dim}_l{seqlen}_w{width}_{_tag(dtype)}"
    grads = [k for k in ("x", "weight", "bias", "initial_states") if k in inputs]
    out = [Case(name, subq.ops.causal_conv1d, causal_conv1d_ref, inputs, grads,
                ["causal_conv1d_fwd_kernel", "causal_conv1d_bwd_kernel", "reduce_weight_grads_kernel"])]
    if variant == "plain":
        update = dict(x=_randn(g, batch, dim, 3, dtype=dtype), conv_state=_randn(g, batch, dim, width + 1, dtype=dtype),
                      weight=inputs["weight"], bias=inputs["bias"], activation="silu")
        out.append(Case(f"{name}_update", _update_op, _causal_conv1d_update_ref, update, [],
                        ["causal_conv1d_update_kernel"]))
    return out


# ---- rmsnorm_gated ------------------------------------------------------------------------------------------------

def rmsnorm_cases(rows, dim, group, dtype, seed, gated=True, before=False, offset=0) -> list[Case]:
    g = _g(seed)
    inputs = dict(x=_randn(g, rows, dim + offset, dtype=dtype)[:, offset:], weight=_randn(g, dim, scale=0.5) + 1,
                  eps=1e-5, group_size=group, norm_before_gate=before)
    if gated:
        inputs["z"] = _randn(g, rows, dim, dtype=dtype)
    name = f"rmsnorm_r{rows}_d{dim}_g{group}_{'z' if gated else 'noz'}{'_before' if before else ''}" \
           f"{'_misaligned' if offset else ''}_{_tag(dtype)}"
    grads = ["x", "weight"] + (["z"] if gated else [])
    return [Case(name, subq.ops.rmsnorm_gated, rmsnorm_gated_ref, inputs, grads,
                 ["rmsnorm_gated_fwd_kernel", "rmsnorm_gated_bwd_kernel", "reduce_row_chunks_kernel"])]


# ---- ssd_step -------------------------------------------------------------------------------------------------------

def _step_op(**kw):
    return subq.ops.ssd_step(**kw), kw["state"]


def ssd_step_cases(batch, heads, P, N, groups, dtype, seed, full=True) -> list[Case]:
    g = _g(seed)
    inputs = dict(state=_randn(g, batch, heads, P, N), x=_randn(g, batch, heads, P, dtype=dtype),
                  dt=_randn(g, batch, heads, scale=0.5, dtype=dtype), A=-torch.rand(heads, generator=g) - 0.5,
                  B=_randn(g, batch, groups, N, dtype=dtype), C=_randn(g, batch, groups, N, dtype=dtype),
                  dt_softplus=True)
    if full:
        inputs.update(D=_randn(g, heads), z=_randn(g, batch, heads, P, dtype=dtype),
                      dt_bias=_randn(g, heads, scale=0.5))
    name = f"ssd_step_b{batch}_h{heads}_p{P}_n{N}_g{groups}_{'full' if full else 'bare'}_{_tag(dtype)}"
    return [Case(name, _step_op, ssd_step_ref, inputs, [], ["ssd_step_kernel"])]


# ---- ssd_chunk_scan -------------------------------------------------------------------------------------------------

def ssd_cases(batch, seqlen, heads, P, N, groups, chunk, dtype, seed, variant="full") -> list[Case]:
    g = _g(seed)
    # dt is a step size: positive as given, or any real number when dt_softplus maps it to one.
    softplus = variant in ("full", "seq_idx")
    if softplus:
        dt = _randn(g, batch, seqlen, heads, scale=0.5) - 1
    else:
        dt = torch.rand(batch, seqlen, heads, generator=g) * 0.2
    inputs = dict(x=_randn(g, batch, seqlen, heads, P, dtype=dtype), dt=dt, A=-torch.rand(heads, generator=g) - 0.5,
                  B=_randn(g, batch, seqlen, groups, N, dtype=dtype, scale=0.5),
                  C=_randn(g, batch, seqlen, groups, N, dtype=dtype, scale=0.5), chunk_size=chunk)
    if softplus:
        inputs.update(D=_randn(g, heads), z=_randn(g, batch, seqlen, heads, P, dtype=dtype),
                      dt_bias=_randn(g, heads, scale=0.5), dt_softplus=True)
    if variant == "full":
        inputs["initial_states"] = _randn(g, batch, heads, P, N)
    if variant == "seq_idx":
        inputs["seq_idx"] = torch.sort(torch.randint(0, 3, (batch, seqlen), generator=g), dim=1).values.int()
    name = f"ssd_{variant}_b{batch}_l{seqlen}_h{heads}_p{P}_n{N}_g{groups}_c{chunk}_{_tag(dtype)}"
    grads = [k for k in ("x", "dt", "A", "B", "C", "D", "z", "dt_bias", "initial_states") if k in inputs]
    kernels = ["chunk_cumsum_kernel", "chunk_cb_kernel", "chunk_state_kernel", "state_passing_kernel",
               "chunk_scan_kernel", "entering_state_grad_kernel", "state_passing_backward_kernel", "chunk_dcb_kernel",
               "chunk_dx_kernel", "chunk_dc_kernel", "chunk_db_kernel", "chunk_dt_backward_kernel"]
    if "z" in inputs:
        kernels.append("gate_skip_backward_kernel")

    def op(**kw):
        return subq.ops.ssd_chunk_scan(**kw, return_final_states=True)

    return [Case(name, op, ssd_chunked_ref, inputs, grads, kernels)]


# ---- flash_chunk_attention ------------------------------------------------------------------------------------------

def flash_cases(batch, seqlen, S, E, chunk, causal, dtype, seed, gated=True, rel_bias=True) -> list[Case]:
    g = _g(seed)
    inputs = {k: _randn(g, batch, seqlen, S, dtype=dtype, scale=0.5) for k in ("q_quad", "k_quad", "q_lin", "k_lin")}
    inputs.update(v=_randn(g, batch, seqlen, E, dtype=dtype), chunk_size=chunk, causal=causal)
    if gated:
        inputs["u"] = _randn(g, batch, seqlen, E, dtype=dtype)
    if rel_bias:
        inputs["rel_bias"] = _randn(g, 2 * chunk - 1, scale=0.1)
    name = f"flash_{'causal' if causal else 'bidir'}_b{batch}_l{seqlen}_s{S}_e{E}_c{chunk}" \
           f"{'_u' if gated else ''}{'_bias' if rel_bias else ''}_{_tag(dtype)}"
    grads = [k for k in ("q_quad", "k_quad", "q_lin", "k_lin", "v", "u", "rel_bias") if k in inputs]
    kernels = ["chunk_states_kernel", "state_prefix_kernel", "chunk_output_kernel", "score_gradient_kernel",
               "value_gradient_kernel", "feature_gradient_kernel"]
    if gated:
        kernels += ["gate_gradient_kernel", "output_gradient_kernel"]
    return [Case(name, subq.ops.flash_chunk_attention, flash_chunked_ref, inputs, grads, kernels)]


# ---- monarch_conv (the fused kernels) -------------------------------------------------------------------------------

def _conv_op(**kw):
    return subq.ops.monarch_conv(**kw, algorithm="monarch")


def monarch_conv_cases(batch, heads, seqlen, dtype, seed, bidirectional=True, gates=True) -> list[Case]:
    g = _g(seed)
    # Filters and D in u's dtype: the reference's einsum takes one dtype.
    inputs = dict(u=_randn(g, batch, heads, seqlen, dtype=dtype),
                  k=_randn(g, heads, seqlen, scale=seqlen ** -0.5, dtype=dtype))
    if bidirectional:
        inputs["k_rev"] = _randn(g, heads, seqlen, scale=seqlen ** -0.5, dtype=dtype)
    if gates:
        inputs.update(pregate=_randn(g, batch, heads, seqlen, dtype=dtype),
                      postgate=_randn(g, batch, heads, seqlen, dtype=dtype), D=_randn(g, heads, dtype=dtype))
    name = f"monarch_conv_{'bidir' if bidirectional else 'causal'}_b{batch}_h{heads}_l{seqlen}" \
           f"{'_gates' if gates else ''}_{_tag(dtype)}"
    grads = [k for k in ("u", "k", "k_rev", "pregate", "postgate", "D") if k in inputs]
    return [Case(name, _conv_op, monarch_conv_ref, inputs, grads,
                 ["monarch_conv_fused_fwd_kernel", "monarch_conv_fused_bwd_rows_kernel",
                  "monarch_conv_fused_bwd_filter_kernel"])]


# ---- grouped_matmul (the helper kernels; the GEMMs run on the emulator's host stand-in for CUTLASS) ---------------

def grouped_cases(sizes, tail, k, n, dtype, seed, bias=True, sizes_dtype=torch.int64) -> list[Case]:
    """Rows sorted into groups of `sizes`, then `tail` rows past the total (outputs and dx zero there)."""
    g = _g(seed)
    tokens, groups = sum(sizes) + tail, len(sizes)
    inputs = dict(x=_randn(g, tokens, k, dtype=dtype), w=_randn(g, groups, k, n, dtype=dtype, scale=k ** -0.5),
                  group_sizes=torch.tensor(sizes, dtype=sizes_dtype))
    if bias:
        inputs["bias"] = _randn(g, groups, n, dtype=dtype)
    shown = "_".join(map(str, sizes)) if len(sizes) <= 6 else f"{groups}groups"
    name = f"grouped_s{shown}_t{tail}_k{k}_n{n}{'_bias' if bias else ''}_{_tag(sizes_dtype)}_{_tag(dtype)}"
    grads = ["x", "w"] + (["bias"] if bias else [])
    # Every product runs the setup kernel; the bias gradient needs a bias and a group.
    kernels = ["setup_problems"] + (["bias_grad"] if bias and groups else [])
    return [Case(name, subq.ops.grouped_matmul, grouped_matmul_ref, inputs, grads, kernels)]


def cases() -> list[Case]:
    out: list[Case] = []
    for i, dtype in enumerate(LOW):
        for variant in ("plain", "channels_last", "seq_idx", "initial_states"):
            out += conv1d_cases(2, 40, 100, 4, dtype, 100 + i, variant)
        out += conv1d_cases(1, 33, 67, 2, dtype, 110 + i)
        out += conv1d_cases(3, 8, 5, 3, dtype, 120 + i, "initial_states")
        out += rmsnorm_cases(7, 256, 64, dtype, 200 + i)
        out += rmsnorm_cases(5, 96, 96, dtype, 210 + i, gated=False)
        out += rmsnorm_cases(6, 128, 64, dtype, 220 + i, before=True)
        out += rmsnorm_cases(4, 128, 128, dtype, 230 + i, offset=1)
        out += ssd_step_cases(3, 4, 64, 32, 2, dtype, 300 + i)
        out += ssd_step_cases(2, 3, 24, 40, 1, dtype, 310 + i, full=False)
        out += monarch_conv_cases(2, 3, 100, dtype, 600 + i)
        out += monarch_conv_cases(1, 2, 256, dtype, 610 + i, bidirectional=False, gates=False)
        out += monarch_conv_cases(1, 2, 2048, dtype, 620 + i)
        out += grouped_cases([37, 1, 90, 0, 13], 5, 24, 40, dtype, 700 + i)  # not tiles; K, N multiples of 8
        out += grouped_cases([0, 13, 29, 0], 3, 7, 9, dtype, 710 + i, sizes_dtype=torch.int32)  # K, N padded
        out += grouped_cases([7], 0, 16, 8, dtype, 720 + i, bias=False)
    # More groups than the setup kernel's 256 threads: its prefix sum carries across chunks.
    out += grouped_cases([(7 * g) % 5 for g in range(300)], 4, 8, 16, torch.bfloat16, 730)
    out += grouped_cases([0, 0], 0, 8, 8, torch.float16, 731)  # no rows: only the weight and bias gradients run
    out += grouped_cases([], 3, 8, 8, torch.float32, 732)  # no groups: every row is past the total
    for i, dtype in enumerate(HALF):
        out += ssd_cases(1, 256, 2, 64, 64, 1, 256, dtype, 400 + i)
        out += ssd_cases(2, 200, 4, 40, 48, 2, 64, dtype, 410 + i)
        out += ssd_cases(1, 150, 2, 16, 32, 1, 64, dtype, 420 + i, variant="seq_idx")
        out += ssd_cases(1, 70, 2, 32, 16, 2, 128, dtype, 430 + i, variant="bare")
        out += flash_cases(2, 128, 32, 48, 64, True, dtype, 500 + i)
        out += flash_cases(1, 192, 40, 24, 64, False, dtype, 510 + i, gated=False)
        out += flash_cases(1, 256, 16, 72, 128, True, dtype, 520 + i, rel_bias=False)
    return out


def tiny_cases() -> list[Case]:
    """One small case of every kernel (ASan+UBSan and TSan are 5-200x slower than the plain emulation)."""
    out = conv1d_cases(1, 34, 70, 4, torch.bfloat16, 1, "initial_states")
    out += conv1d_cases(1, 34, 12, 3, torch.float16, 2, "plain")
    out += rmsnorm_cases(3, 128, 64, torch.bfloat16, 3)
    out += ssd_step_cases(1, 2, 32, 16, 1, torch.bfloat16, 4)
    out += ssd_cases(1, 80, 2, 32, 32, 1, 64, torch.bfloat16, 5)
    out += flash_cases(1, 128, 16, 32, 64, True, torch.bfloat16, 6)
    out += monarch_conv_cases(1, 1, 100, torch.bfloat16, 7)
    out += grouped_cases([5, 0, 11], 2, 8, 40, torch.bfloat16, 8)
    return out
