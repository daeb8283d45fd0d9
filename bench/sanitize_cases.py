"""Small forward and backward calls of every CUDA kernel, for compute-sanitizer (memcheck, racecheck).

Sizes are chosen to hit partial tiles, the token padding of the Monarch intermediate and the strided epilogue.
"""

import torch

from subq.experimental import enabled
from subq.ops import blockdiag_matmul, monarch_matmul, rmsnorm_gated, ssd_step


def monarch_and_blockdiag(dtype: torch.dtype, tokens: int) -> None:
    """Monarch and block-diagonal products, forward and backward: partial tiles, 8 output blocks (the forward's
    transpose pass), and with tokens not a multiple of 8 the intermediate's token padding."""
    x = torch.randn(tokens, 64, device="cuda", dtype=dtype, requires_grad=True)
    w1 = torch.randn(4, 24, 16, device="cuda", dtype=dtype, requires_grad=True)
    w2 = torch.randn(8, 16, 12, device="cuda", dtype=dtype, requires_grad=True)
    w = torch.randn(4, 24, 16, device="cuda", dtype=dtype, requires_grad=True)
    y = monarch_matmul(x, w1, w2)
    y.backward(torch.randn_like(y))
    z = blockdiag_matmul(x, w)
    z.backward(torch.randn_like(z))


def run(dtype: torch.dtype, tf32: bool) -> None:
    torch.backends.cuda.matmul.allow_tf32 = tf32
    monarch_and_blockdiag(dtype, 37)
    torch.cuda.synchronize()


def run_monarch_sm90(dtype: torch.dtype) -> None:
    """The Hopper wgmma GEMMs (opt-in flag set; the portable kernels elsewhere): 40 tokens put every GEMM on them,
    37 sends the token-contiguous ones back to the portable kernels."""
    with enabled("monarch_matmul"):
        for tokens in (40, 37):
            monarch_and_blockdiag(dtype, tokens)
    torch.cuda.synchronize()


def run_grouped_matmul(dtype: torch.dtype, tf32: bool) -> None:
    """grouped_matmul forward and backward: partial tiles, empty groups (k = 0 problems in the weight gradient), a
    zero tail with a bias (the zero-row C), no groups at all, and K, N off the vector width (the padded path)."""
    from subq.ops import grouped_matmul

    torch.backends.cuda.matmul.allow_tf32 = tf32
    with enabled("grouped_matmul"):
        for sizes, tail, k, n in (([37, 0, 90, 13], 5, 24, 40), ([13, 29], 3, 7, 9), ([], 4, 16, 8)):
            x = torch.randn(sum(sizes) + tail, k, device="cuda", dtype=dtype, requires_grad=True)
            w = torch.randn(len(sizes), k, n, device="cuda", dtype=dtype, requires_grad=True)
            b = torch.randn(len(sizes), n, device="cuda", dtype=dtype, requires_grad=True)
            y = grouped_matmul(x, w, torch.tensor(sizes, device="cuda", dtype=torch.int64), b)
            y.backward(torch.randn_like(y))
    torch.cuda.synchronize()


def run_norm_step(dtype: torch.dtype) -> None:
    """rmsnorm_gated: vector and scalar paths, warp and block units, both gate orders; ssd_step: a partial P tile,
    a state row shorter than one team's vectors, fp32 and low-precision state, strided (scalar) state."""
    with enabled("rmsnorm_gated", "ssd_step"):
        for dim, group_size, offset in ((200, 40, 0), (2200, 1100, 0), (129, 43, 1)):
            base = torch.randn(37, dim + offset, device="cuda", dtype=dtype)
            x = base[:, offset:].requires_grad_()
            z = torch.randn(37, dim, device="cuda", dtype=dtype, requires_grad=True)
            w = torch.randn(dim, device="cuda", requires_grad=True)
            for before in (True, False):
                y = rmsnorm_gated(x, w, z, group_size=group_size, norm_before_gate=before)
                y.backward(torch.randn_like(y))
        for state_dtype, n, contiguous in ((torch.float32, 16, True), (dtype, 40, True), (torch.float32, 24, False)):
            batch, heads, head_dim, groups = 3, 4, 37, 2
            state = torch.randn(batch, heads, head_dim, n, device="cuda", dtype=state_dtype)
            if not contiguous:
                state = state.transpose(2, 3).contiguous().transpose(2, 3)
            x = torch.randn(batch, heads, head_dim, device="cuda", dtype=dtype)
            ssd_step(state, x, torch.rand(batch, heads, device="cuda", dtype=dtype), -torch.rand(heads, device="cuda"),
                     torch.randn(batch, groups, n, device="cuda", dtype=dtype),
                     torch.randn(batch, groups, n, device="cuda", dtype=dtype),
                     D=torch.randn(heads, head_dim, device="cuda"), z=torch.randn_like(x),
                     dt_bias=torch.randn(heads, device="cuda"), dt_softplus=True)


def run_causal_conv1d(dtype: torch.dtype) -> None:
    """Partial channel and time tiles (37 channels, 70 steps), both layouts, states, seq_idx, decoding."""
    from subq.ops import causal_conv1d, causal_conv1d_update

    channels_first = torch.randn(2, 37, 70, device="cuda", dtype=dtype)
    channels_last = torch.randn(2, 70, 37, device="cuda", dtype=dtype).transpose(1, 2)
    with enabled("causal_conv1d"):
        for x in (channels_first, channels_last):
            x.requires_grad_()
            w = torch.randn(37, 4, device="cuda", requires_grad=True)
            b = torch.randn(37, device="cuda", requires_grad=True)
            h = torch.randn(2, 37, 3, device="cuda", dtype=dtype, requires_grad=True)
            y, final = causal_conv1d(x, w, b, initial_states=h, return_final_states=True, activation="silu")
            torch.autograd.backward((y, final), (torch.randn_like(y), torch.randn_like(final)))
            seq_idx = torch.randint(0, 4, (2, 70), device="cuda").sort(dim=1).values.int()
            y = causal_conv1d(x, w[:, :3], b, seq_idx=seq_idx)
            y.backward(torch.randn_like(y))
            state = torch.randn(2, 37, 5, device="cuda", dtype=dtype)
            causal_conv1d_update(x.detach()[:, :, :3], state, w.detach(), b.detach(), activation="silu")
    torch.cuda.synchronize()


def run_flash_fused(dtype: torch.dtype) -> None:
    """The fused flash_chunk_attention forward and backward (opt-in flag set here): a short last chunk with a query
    tile wholly past L, L < C, S off the 32-feature step, E off the value tiles, with gate and bias (the first shape)
    and without (the second), both modes."""
    from subq.ops import flash_chunk_attention

    with enabled("flash_chunk_attention"):
        for batch, seqlen, s, e, chunk, gated in ((2, 150, 40, 130, 128, True), (1, 50, 8, 24, 64, False)):
            kw = dict(device="cuda", dtype=dtype, requires_grad=True)
            qk = [torch.randn(batch, seqlen, s, **kw) for _ in range(4)]
            v = torch.randn(batch, seqlen, e, **kw)
            u = torch.randn(batch, seqlen, e, **kw) if gated else None
            rel_bias = torch.randn(2 * chunk - 1, device="cuda", requires_grad=True) if gated else None
            for causal in (False, True):
                out = flash_chunk_attention(*qk, v, u, rel_bias, chunk_size=chunk, causal=causal)
                out.backward(torch.randn_like(out))
    torch.cuda.synchronize()


def run_monarch_conv_fused(dtype: torch.dtype) -> None:
    """The fused Monarch-DFT forward and backward (opt-in flag set): 1, 2 and 3 stages (L = 2, 100, 4097), odd
    lengths, stages on tensor cores and on CUDA cores in one row (L = 2048: 8 16 16), filters shorter than L, both
    filter forms, with and without gates and D (the backward's first pass for the filter gradient alone, or
    skipped), a precomputed spectrum (no filter gradient)."""
    from subq.ops import monarch_conv, monarch_conv_filter

    with enabled("monarch_conv"):
        for seqlen, filter_len, bidirectional, gated in ((2, 1, True, True), (100, 60, False, False),
                                                          (2048, 1500, False, True), (4097, 4097, True, True)):
            u = torch.randn(2, 3, seqlen, device="cuda", dtype=dtype, requires_grad=True)
            k = torch.randn(3, filter_len, device="cuda", requires_grad=True)
            k_rev = torch.randn(3, filter_len, device="cuda", requires_grad=True) if bidirectional else None
            gates = [torch.randn(2, 3, seqlen, device="cuda", dtype=dtype, requires_grad=True) if gated else None
                     for _ in range(2)]
            D = torch.randn(3, device="cuda", requires_grad=True) if gated else None
            y = monarch_conv(u, k, k_rev=k_rev, pregate=gates[0], postgate=gates[1], D=D)
            y.backward(torch.randn_like(y))
            spectrum = monarch_conv_filter(k, seqlen, k_rev=k_rev)
            y = monarch_conv(u, filter_spectrum=spectrum, pregate=gates[0], postgate=gates[1], D=D)
            y.backward(torch.randn_like(y))
    torch.cuda.synchronize()


def run_ssd_fused(dtype: torch.dtype) -> None:
    """The fused SSD chunk scan forward and backward (opt-in flag set): a short last chunk, P and N off the tiles,
    groups, per-channel D, z, the dt chain, initial and final states, seq_idx; then a case without D or z."""
    from subq.ops import ssd_chunk_scan

    with enabled("ssd_chunk_scan"):
        batch, seqlen, heads, head_dim, groups, dstate = 2, 150, 4, 40, 2, 24
        kw = dict(device="cuda", dtype=dtype, requires_grad=True)
        x, z = (torch.randn(batch, seqlen, heads, head_dim, **kw) for _ in range(2))
        B, C = (torch.randn(batch, seqlen, groups, dstate, **kw) for _ in range(2))
        dt = torch.rand(batch, seqlen, heads, **kw)
        A = -torch.rand(heads, device="cuda").add(0.1).requires_grad_()
        D = torch.randn(heads, head_dim, device="cuda", requires_grad=True)
        dt_bias = torch.randn(heads, device="cuda", requires_grad=True)
        h0 = torch.randn(batch, heads, head_dim, dstate, device="cuda", requires_grad=True)
        seq_idx = torch.zeros(batch, seqlen, device="cuda", dtype=torch.int32)
        seq_idx[:, 70:] = 1
        y, final = ssd_chunk_scan(x, dt, A, B, C, chunk_size=64, D=D, z=z, dt_bias=dt_bias, dt_softplus=True,
                                  dt_limit=(0.01, 2.0), initial_states=h0, seq_idx=seq_idx,
                                  return_final_states=True)
        torch.autograd.backward((y, final), (torch.randn_like(y), torch.randn_like(final)))
        y = ssd_chunk_scan(x, dt, A, B, C, chunk_size=128)
        y.backward(torch.randn_like(y))
    torch.cuda.synchronize()


if __name__ == "__main__":
    for dtype, tf32 in ((torch.bfloat16, False), (torch.float16, False), (torch.float32, True), (torch.float32, False)):
        run(dtype, tf32)
        run_grouped_matmul(dtype, tf32)
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        run_norm_step(dtype)
        run_causal_conv1d(dtype)
        run_monarch_conv_fused(dtype)
    for dtype in (torch.bfloat16, torch.float16):
        run_monarch_sm90(dtype)
        run_flash_fused(dtype)
        run_ssd_fused(dtype)
    print("sanitize cases ran")
