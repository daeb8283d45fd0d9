"""The Mamba-2 layer (Dao and Gu, 2024) on subq's fused ops, with a recurrent step for generation.

Parameter names and initialisation follow state-spaces/mamba's ``Mamba2`` (in_proj, conv1d, dt_bias, A_log, D,
norm, out_proj), so its checkpoints load with ``load_state_dict``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from subq import distributed
from subq._utils import check_bool, check_int, check_int_choice, check_positive_ints, check_real
from subq.distributed import tensor_parallel
from subq.distributed._comm import check_group, copy_to_parallel
from subq.ops import causal_conv1d, causal_conv1d_update, rmsnorm_gated, ssd_chunk_scan, ssd_step
from subq.ops.ssd import CHUNK_SIZES as SSD_CHUNK_SIZES
from subq.ops.ssd import MAX_DSTATE as SSD_MAX_DSTATE
from subq.ops.ssd import MAX_HEADDIM as SSD_MAX_HEADDIM


class RMSNormGated(nn.Module):
    """``norm(x) * silu(z)`` (``norm_before_gate``) or ``norm(x * silu(z))``, normalised over groups of
    ``group_size`` features: Mamba-2's gated RMSNorm on ``subq.ops.rmsnorm_gated``."""

    def __init__(self, hidden_size: int, eps: float = 1e-5, group_size: int | None = None,
                 norm_before_gate: bool = True, device=None, dtype=None):
        super().__init__()
        check_positive_ints(hidden_size=hidden_size)
        # The op's own checks (eps, group_size) run at forward; made here too so a bad layer fails where it is built.
        eps = check_real(eps, "eps", finite=True)
        if eps < 0:
            raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
        if group_size is not None:
            check_positive_ints(group_size=group_size)
            group_size = check_int(group_size, "group_size")
            if hidden_size % group_size:
                raise ValueError(f"group_size ({group_size}) must divide hidden_size ({hidden_size})")
        self.eps, self.norm_before_gate = eps, check_bool(norm_before_gate, "norm_before_gate")
        self.group_size = group_size
        self.weight = nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        return rmsnorm_gated(x, self.weight, z, eps=self.eps, group_size=self.group_size,
                             norm_before_gate=self.norm_before_gate)


@dataclass
class Mamba2Cache:
    """Decoding state of one layer: the last ``d_conv - 1`` conv inputs and the SSM state (float32)."""

    conv_state: torch.Tensor   # (batch, conv_dim, d_conv - 1)
    ssm_state: torch.Tensor    # (batch, nheads, headdim, d_state)


class Mamba2(nn.Module):
    """in_proj → [z, x, B, C, dt]; causal depthwise conv + SiLU on [x, B, C]; SSD; gated RMSNorm with z; out_proj.

    ``forward(u (batch, seqlen, d_model), seq_idx=None, cache=None)``: with ``cache`` (from
    ``allocate_inference_cache``) the layer continues from the cached states and leaves its final states there,
    so a prompt can be prefilled and then extended token by token with ``step``.

    ``cp_group``: context parallelism: u (and seq_idx) is this rank's contiguous shard of the sequence, the
    conv and SSD pass states across the ranks (:func:`subq.distributed.ssd_chunk_scan`); parameter gradients are
    this shard's part, summed over the group by the caller (DDP). No inference cache.
    ``tp_group``: tensor parallelism (:mod:`subq.distributed.tensor_parallel`): this rank holds nheads/T heads and
    ngroups/T groups (ngroups a multiple of the group's size T); ``d_inner``, ``nheads``, ``ngroups`` and
    ``conv_dim`` are then this rank's, and the caches per rank. u and the output are whole on every rank. The
    layer is initialised whole, as one process would from the same seed, and cut to this rank's heads.
    """

    def __init__(self, d_model: int, d_state: int = 128, d_conv: int = 4, expand: int = 2, headdim: int = 64,
                 ngroups: int = 1, chunk_size: int = 256, A_init_range: tuple[float, float] = (1, 16),
                 dt_min: float = 0.001, dt_max: float = 0.1, dt_init_floor: float = 1e-4,
                 dt_limit: tuple[float, float] = (0.0, math.inf), D_has_hdim: bool = False, rmsnorm: bool = True,
                 norm_before_gate: bool = False, bias: bool = False, conv_bias: bool = True,
                 layer_idx: int | None = None, cp_group=None, tp_group=None, device=None, dtype=None):
        super().__init__()
        factory = dict(device=device, dtype=dtype)
        check_positive_ints(d_model=d_model, d_state=d_state, expand=expand, headdim=headdim, ngroups=ngroups)
        # causal_conv1d takes widths 2..4; checked here so the error names the layer's argument, not the weight's.
        d_conv = check_int_choice(d_conv, "d_conv", (2, 3, 4))
        chunk_size = check_int_choice(chunk_size, "chunk_size", SSD_CHUNK_SIZES)
        # ssd_chunk_scan's limits, here so a layer that cannot run fails where it is built, not at its first forward
        if d_state > SSD_MAX_DSTATE or headdim > SSD_MAX_HEADDIM:
            raise ValueError(f"d_state must be at most {SSD_MAX_DSTATE} and headdim at most {SSD_MAX_HEADDIM}, "
                             f"got {d_state} and {headdim}")
        D_has_hdim, rmsnorm, norm_before_gate, bias, conv_bias = (
            check_bool(value, name) for name, value in (("D_has_hdim", D_has_hdim), ("rmsnorm", rmsnorm),
                                                        ("norm_before_gate", norm_before_gate), ("bias", bias),
                                                        ("conv_bias", conv_bias)))
        self.d_model, self.d_state, self.d_conv, self.headdim = d_model, d_state, d_conv, headdim
        self.d_inner = expand * d_model
        if self.d_inner % headdim:
            raise ValueError(f"expand * d_model ({self.d_inner}) must be a multiple of headdim ({headdim})")
        if self.d_inner // headdim % ngroups:
            raise ValueError(f"ngroups ({ngroups}) must divide the number of heads ({self.d_inner // headdim})")
        self.cp_group, self.tp_group = check_group(cp_group, "cp_group"), check_group(tp_group, "tp_group")
        self.tp_rank, self.tp_size = tensor_parallel.split_heads(self.d_inner // headdim, ngroups, self.tp_group)
        self.nheads = self.d_inner // headdim
        self.ngroups, self.chunk_size, self.dt_limit = ngroups, chunk_size, tuple(dt_limit)
        self.rmsnorm, self.layer_idx = rmsnorm, layer_idx
        self.conv_dim = self.d_inner + 2 * ngroups * d_state

        self.in_proj = nn.Linear(d_model, 2 * self.d_inner + 2 * ngroups * d_state + self.nheads, bias=bias,
                                 **factory)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, d_conv, groups=self.conv_dim, padding=d_conv - 1,
                                bias=conv_bias, **factory)
        # dt_bias = softplus⁻¹(dt) for dt log-uniform in [dt_min, dt_max], so softplus(dt_bias) starts there.
        dt = torch.exp(torch.rand(self.nheads, **factory) * (math.log(dt_max) - math.log(dt_min))
                       + math.log(dt_min)).clamp(min=dt_init_floor)
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))
        self.dt_bias._no_weight_decay = True
        A = torch.empty(self.nheads, device=device, dtype=torch.float32).uniform_(*A_init_range)
        self.A_log = nn.Parameter(torch.log(A).to(dtype or torch.float32))
        self.A_log._no_weight_decay = True
        self.D = nn.Parameter(torch.ones(self.d_inner if D_has_hdim else self.nheads, device=device))
        self.D._no_weight_decay = True
        if rmsnorm:
            self.norm = RMSNormGated(self.d_inner, eps=1e-5, group_size=self.d_inner // ngroups,
                                     norm_before_gate=norm_before_gate, **factory)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias, **factory)
        if self.tp_size > 1:
            tensor_parallel.keep_shard_(self, self.tp_group)

    # ---- pieces shared by forward and step --------------------------------------------------------------------

    def _split(self, zxbcdt):
        return torch.split(zxbcdt, [self.d_inner, self.conv_dim, self.nheads], dim=-1)

    def _ssm_params(self, dtype):
        """A = -exp(A_log), D (per head or per (head, headdim)) and dt_bias, in float32 (float64 layers: float64)."""
        pdtype = torch.float64 if dtype == torch.float64 else torch.float32
        A = -torch.exp(self.A_log.to(pdtype))
        D = self.D.view(self.nheads, self.headdim) if self.D.numel() == self.d_inner else self.D
        return A, D.to(pdtype), self.dt_bias.to(pdtype)

    def _sequence_ops(self):
        """The conv and SSD over a whole sequence, or over this rank's shard of it under context parallelism."""
        if self.cp_group is None:
            return causal_conv1d, ssd_chunk_scan
        return (partial(distributed.causal_conv1d, group=self.cp_group),
                partial(distributed.ssd_chunk_scan, group=self.cp_group))

    def _check_no_cp(self, what: str) -> None:
        if self.cp_group is not None:
            raise ValueError(f"{what} is not supported on a context-parallel Mamba2 (cp_group): decode with a layer "
                             "built without cp_group from the same weights")

    def _in(self, u):
        if self.tp_size > 1:
            u = copy_to_parallel(u, self.tp_group)
        return self._split(self.in_proj(u))

    def _out(self, y, z):
        if self.rmsnorm:
            y = self.norm(y, z)
        if self.tp_size > 1:
            return tensor_parallel.row_parallel_linear(y, self.out_proj, self.tp_group)
        return self.out_proj(y)

    # ---- full sequence ------------------------------------------------------------------------------------------

    def forward(self, u: torch.Tensor, seq_idx: torch.Tensor | None = None,
                cache: Mamba2Cache | None = None) -> torch.Tensor:
        batch, seqlen, _ = u.shape
        if cache is not None:
            self._check_no_cp("an inference cache")
        conv_op, ssd_op = self._sequence_ops()
        z, xBC, dt = self._in(u)
        conv = conv_op(xBC.transpose(1, 2), self.conv1d.weight.squeeze(1), self.conv1d.bias,
                       seq_idx=seq_idx, activation="silu", initial_states=None if cache is None else cache.conv_state,
                       return_final_states=cache is not None)
        if cache is not None:
            conv, conv_state = conv
        xBC = conv.transpose(1, 2)
        x, B, C = torch.split(xBC, [self.d_inner, self.ngroups * self.d_state, self.ngroups * self.d_state], -1)
        A, D, dt_bias = self._ssm_params(x.dtype)
        y = ssd_op(
            x.reshape(batch, seqlen, self.nheads, self.headdim), dt, A,
            B.reshape(batch, seqlen, self.ngroups, self.d_state), C.reshape(batch, seqlen, self.ngroups, self.d_state),
            chunk_size=self.chunk_size, D=D, z=None if self.rmsnorm else z.reshape(x.shape[:2] + (self.nheads, -1)),
            dt_bias=dt_bias, dt_softplus=True, dt_limit=self.dt_limit, seq_idx=seq_idx,
            initial_states=None if cache is None else cache.ssm_state, return_final_states=cache is not None,
        )
        if cache is not None:
            y, ssm_state = y
            cache.conv_state.copy_(conv_state)
            cache.ssm_state.copy_(ssm_state)
        return self._out(y.reshape(batch, seqlen, self.d_inner), z)

    # ---- generation ---------------------------------------------------------------------------------------------

    def allocate_inference_cache(self, batch_size: int, dtype: torch.dtype | None = None,
                                 device: torch.device | None = None) -> Mamba2Cache:
        self._check_no_cp("an inference cache")
        device = device or self.in_proj.weight.device
        dtype = dtype or self.conv1d.weight.dtype
        state_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        return Mamba2Cache(
            conv_state=torch.zeros(batch_size, self.conv_dim, self.d_conv - 1, device=device, dtype=dtype),
            ssm_state=torch.zeros(batch_size, self.nheads, self.headdim, self.d_state, device=device,
                                  dtype=state_dtype),
        )

    def step(self, u: torch.Tensor, cache: Mamba2Cache) -> torch.Tensor:
        """One token, ``u (batch, d_model)`` or ``(batch, 1, d_model)``; updates ``cache`` in place."""
        self._check_no_cp("step")
        squeeze = u.dim() == 3
        if squeeze:
            if u.shape[1] != 1:
                raise ValueError(f"step takes one token, u (batch, 1, d_model); got shape {tuple(u.shape)}")
            u = u[:, 0]
        batch = u.shape[0]
        z, xBC, dt = self._in(u)
        xBC = causal_conv1d_update(xBC, cache.conv_state, self.conv1d.weight.squeeze(1), self.conv1d.bias,
                                   activation="silu")
        x, B, C = torch.split(xBC, [self.d_inner, self.ngroups * self.d_state, self.ngroups * self.d_state], -1)
        A, D, dt_bias = self._ssm_params(x.dtype)
        y = ssd_step(cache.ssm_state, x.reshape(batch, self.nheads, self.headdim), dt, A,
                     B.reshape(batch, self.ngroups, self.d_state), C.reshape(batch, self.ngroups, self.d_state),
                     D=D, z=None if self.rmsnorm else z.reshape(batch, self.nheads, self.headdim),
                     dt_bias=dt_bias, dt_softplus=True, dt_limit=self.dt_limit)
        out = self._out(y.reshape(batch, self.d_inner), z)
        return out[:, None] if squeeze else out


__all__ = ["Mamba2", "Mamba2Cache", "RMSNormGated"]
