"""FLASH (Hua et al. 2022, "Transformer Quality in Linear Time"): the explicit quadratic formulas and a minimal
chunked form.

Scaling conventions (those of the paper's pseudo-code, which the ops follow):

* FLASH-Quad / GAU over the whole sequence of length L::

      out = relu(scale * Q Kᵀ + B)² V      (⊙ U when a gate is given),   scale = 1/L by default

  with B[i, j] = rel_bias[j - i + L - 1] (rel_bias of shape (2L-1,)), lower-triangular when causal.

* FLASH mixed-chunk attention with chunks of C positions (the last chunk may be short), chunk(i) = i // C::

      quad[i, j] = relu(quad_scale * q_quad_i . k_quad_j + rel_bias[j%C - i%C + C - 1])²
                   where chunk(j) == chunk(i) (and j <= i when causal), else 0;   quad_scale = 1/C by default
      lin[i, j]  = lin_scale * q_lin_i . k_lin_j
                   for every j (bidirectional) or where chunk(j) < chunk(i) (causal: strictly earlier chunks);
                   lin_scale = 1/L by default
      out = (quad + lin) V                 (⊙ U when a gate is given)

  Keys past L do not exist: they add nothing, not even relu(bias)².
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rel_bias_matrix(rel_bias: torch.Tensor, n: int) -> torch.Tensor:
    """(n, n) matrix with entry [i, j] = rel_bias[j - i + n - 1] (a Toeplitz matrix)."""
    pos = torch.arange(n, device=rel_bias.device)
    return rel_bias[pos[None, :] - pos[:, None] + n - 1]


def gau_attention_ref(q, k, v, u=None, rel_bias=None, causal=False, scale=None):
    """relu(scale QKᵀ + B)² V over the whole sequence, the L x L matrix written out. Pass float64."""
    seqlen = v.shape[1]
    scale = 1.0 / max(seqlen, 1) if scale is None else scale
    scores = scale * q @ k.transpose(-1, -2)
    if rel_bias is not None:
        scores = scores + rel_bias_matrix(rel_bias.to(scores.dtype), seqlen)
    kernel = F.relu(scores).square()
    if causal:
        kernel = kernel.tril()
    out = kernel @ v
    return out * u if u is not None else out


def flash_quadratic_ref(q_quad, k_quad, q_lin, k_lin, v, u=None, rel_bias=None, chunk_size=256, causal=False,
                        quad_scale=None, lin_scale=None):
    """FLASH mixed-chunk attention as one L x L matrix with masks (module docstring). Pass float64."""
    seqlen = v.shape[1]
    C = chunk_size
    quad_scale = 1.0 / C if quad_scale is None else quad_scale
    lin_scale = 1.0 / max(seqlen, 1) if lin_scale is None else lin_scale
    pos = torch.arange(seqlen, device=v.device)
    chunk, offset = pos // C, pos % C
    same_chunk = chunk[:, None] == chunk[None, :]
    earlier_chunk = chunk[None, :] < chunk[:, None]
    if causal:
        same_chunk = same_chunk & (pos[None, :] <= pos[:, None])
    scores = quad_scale * q_quad @ k_quad.transpose(-1, -2)
    if rel_bias is not None:
        scores = scores + rel_bias.to(scores.dtype)[offset[None, :] - offset[:, None] + C - 1]
    quad = torch.where(same_chunk, F.relu(scores).square(), 0)
    lin = lin_scale * q_lin @ k_lin.transpose(-1, -2)
    if causal:
        lin = torch.where(earlier_chunk, lin, 0)
    out = (quad + lin) @ v
    return out * u if u is not None else out


def flash_chunked_ref(q_quad, k_quad, q_lin, k_lin, v, u=None, rel_bias=None, chunk_size=256, causal=False,
                      quad_scale=None, lin_scale=None):
    """The chunk algorithm in plain PyTorch, in the inputs' dtype: relu² attention per chunk square, one
    k_linᵀV state per chunk, their total (bidirectional) or exclusive prefix sum (causal). Linear in L; also the
    "plain PyTorch" baseline of the tests and benchmarks."""
    batch, seqlen, _ = v.shape
    C = chunk_size
    quad_scale = 1.0 / C if quad_scale is None else quad_scale
    lin_scale = 1.0 / max(seqlen, 1) if lin_scale is None else lin_scale
    nchunks = -(-seqlen // C)
    pad = nchunks * C - seqlen

    def chunks(t):  # (b, L, D) -> (b, G, C, D), zero-padded
        return F.pad(t, (0, 0, 0, pad)).reshape(batch, nchunks, C, t.shape[-1])

    qq, kq, ql, kl, vc = (chunks(t) for t in (q_quad, k_quad, q_lin, k_lin, v))
    scores = quad_scale * qq @ kq.transpose(-1, -2)
    if rel_bias is not None:
        scores = scores + rel_bias_matrix(rel_bias, C).to(scores.dtype)
    mask = (torch.arange(nchunks * C, device=v.device) < seqlen).reshape(nchunks, 1, C)  # keys that exist
    if causal:
        mask = mask & torch.ones(C, C, dtype=torch.bool, device=v.device).tril()
    quad = (F.relu(scores).square() * mask) @ vc

    kv = kl.transpose(-1, -2) @ vc                                           # (b, G, S, E)
    if causal:
        state = F.pad(kv.cumsum(1)[:, :-1], (0, 0, 0, 0, 1, 0))             # strictly earlier chunks
    else:
        state = kv.sum(1, keepdim=True)
    out = (quad + lin_scale * ql @ state).reshape(batch, nchunks * C, -1)[:, :seqlen]
    return out * u if u is not None else out
