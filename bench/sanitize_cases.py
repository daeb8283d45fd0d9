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


if __name__ == "__main__":
    for dtype, tf32 in ((torch.bfloat16, False), (torch.float16, False), (torch.float32, True), (torch.float32, False)):
        run(dtype, tf32)
    print("sanitize cases ran")
