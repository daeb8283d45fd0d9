"""Small forward and backward calls of every CUDA kernel, for compute-sanitizer (memcheck, racecheck).

Sizes are chosen to hit partial tiles, the token padding of the Monarch intermediate and the strided epilogue.
"""

import torch

from subq.ops import blockdiag_matmul, monarch_matmul


def run(dtype: torch.dtype, tf32: bool) -> None:
    torch.backends.cuda.matmul.allow_tf32 = tf32
    x = torch.randn(37, 64, device="cuda", dtype=dtype, requires_grad=True)
    w1 = torch.randn(4, 24, 16, device="cuda", dtype=dtype, requires_grad=True)
    w2 = torch.randn(8, 16, 12, device="cuda", dtype=dtype, requires_grad=True)
    w = torch.randn(4, 24, 16, device="cuda", dtype=dtype, requires_grad=True)
    y = monarch_matmul(x, w1, w2)
    y.backward(torch.randn_like(y))
    z = blockdiag_matmul(x, w)
    z.backward(torch.randn_like(z))
    torch.cuda.synchronize()


def run_causal_conv1d(dtype: torch.dtype) -> None:
    """Partial channel and time tiles (37 channels, 70 steps), both layouts, states, seq_idx, decoding."""
    from subq.ops import causal_conv1d, causal_conv1d_update

    channels_first = torch.randn(2, 37, 70, device="cuda", dtype=dtype)
    channels_last = torch.randn(2, 70, 37, device="cuda", dtype=dtype).transpose(1, 2)
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


if __name__ == "__main__":
    for dtype, tf32 in ((torch.bfloat16, False), (torch.float16, False), (torch.float32, True), (torch.float32, False)):
        run(dtype, tf32)
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        run_causal_conv1d(dtype)
    print("sanitize cases ran")
