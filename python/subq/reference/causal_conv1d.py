"""The short depthwise causal convolution of Mamba / Mamba-2, in plain PyTorch."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def causal_conv1d_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    seq_idx: torch.Tensor | None = None,
    initial_states: torch.Tensor | None = None,
    return_final_states: bool = False,
    activation: str | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """y[b, d, t] = act(bias[d] + sum_k weight[d, k] x[b, d, t - (W-1) + k]), computed in x's dtype.

    x (B, D, L) is extended to negative times by initial_states (B, D, W-1) or zeros. Without seq_idx this is a
    grouped F.conv1d over the extended input; with seq_idx (B, L) each tap is written out and masked to the
    output's own sequence. final_states are the last W-1 columns of the extended input.
    """
    batch, dim, seqlen = x.shape
    width = weight.shape[1]
    weight, bias = weight.to(x.dtype), None if bias is None else bias.to(x.dtype)
    head = initial_states if initial_states is not None else x.new_zeros(batch, dim, width - 1)
    xs = torch.cat([head.to(x.dtype), x], dim=-1)  # (B, D, W-1+L): tap k of output t reads column t + k
    if seqlen == 0:  # F.conv1d and unfold reject an input shorter than the kernel
        y = xs[..., :0] * weight.sum() + (0 if bias is None else bias[:, None])
    elif seq_idx is None:
        y = F.conv1d(xs, weight.unsqueeze(1), bias, groups=dim)
    else:
        taps = xs.unfold(-1, width, 1)  # (B, D, L, W)
        seq = torch.cat([seq_idx.new_full((batch, width - 1), -1), seq_idx], dim=-1).unfold(-1, width, 1)
        same = (seq == seq_idx.unsqueeze(-1)).unsqueeze(1)  # (B, 1, L, W)
        y = (taps * same.to(x.dtype) * weight[:, None, :]).sum(-1)
        if bias is not None:
            y = y + bias[:, None]
    if activation in ("silu", "swish"):
        y = F.silu(y)
    if return_final_states:
        return y, xs[..., seqlen:]
    return y


def causal_conv1d_update_ref(
    x: torch.Tensor,
    conv_state: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
) -> torch.Tensor:
    """Decoding: x (B, D) or (B, D, T) new tokens after conv_state (B, D, S >= W-1), the latest inputs oldest first.

    Returns the forward's outputs at the new tokens and shifts conv_state left by T in place, appending x.
    """
    squeeze = x.dim() == 2
    tokens = x.unsqueeze(-1) if squeeze else x
    width, state_len, steps = weight.shape[1], conv_state.shape[-1], tokens.shape[-1]
    xs = torch.cat([conv_state.to(x.dtype), tokens], dim=-1)
    y = causal_conv1d_ref(xs[..., state_len - (width - 1) :], weight, bias, activation=activation)[..., width - 1 :]
    conv_state.copy_(xs[..., steps:])
    return y.squeeze(-1) if squeeze else y
