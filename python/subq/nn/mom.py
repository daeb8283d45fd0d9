"""The routed pieces of Mixture-of-Modules (Gong et al. 2024, "Mixture-of-Modules: Reinventing Transformers as
Dynamic Assemblies of Modules"): pools of GPT-2 attention and FFN modules addressed per token, the routers that
address them, and the switch-style load-balancing loss.

A pool holds G modules as stacked weights (G, in, out). Each token picks K of G + 1 options per routing decision;
option G is SKIP, a zero update. The (token, slot) rows are sorted by module on the device (argsort, and group
sizes counted with scatter_add) so every routed projection is one :func:`grouped_matmul` over all rows: no host
synchronisation and no Python loop over modules. SKIP rows sort last, outside every group, and so come out of
the grouped GEMM as zeros. That one permutation per decision is the only layout change: the normalised tokens
are gathered into it, the projected rows scatter into the per-slot attention sequences (one index_select, q/k/v
stay strided views), the attention output is gathered back, and the updates are added to the residual stream with
one index_add.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from subq._utils import check_positive_ints
from subq.nn.attention import KVCache, causal_attention
from subq.ops.grouped_matmul import grouped_matmul


class ModuleDispatch:
    """The rows (token, slot) of ``ids (batch, seqlen, K)`` sorted by the module they chose (``n_modules`` = SKIP).

    One stable argsort gives the permutation; every gather and scatter of the step is an index into it (a row's
    token, its slot's attention sequence, its position), so no per-module work and no copy between layouts."""

    def __init__(self, ids: torch.Tensor, n_modules: int):
        batch, seqlen, slots = ids.shape
        flat = ids.reshape(-1)
        self.slots, self.batch = slots, batch
        self.order = torch.argsort(flat, stable=True)
        rows = torch.arange(flat.numel(), device=flat.device)
        self.inverse = torch.empty_like(self.order).scatter_(0, self.order, rows)
        self.token = torch.div(self.order, slots, rounding_mode="floor")   # sorted row -> token (batch * seqlen)
        slot = self.order - self.token * slots
        self.position = self.token % seqlen
        # Slot k of sequence b is attention sequence k * batch + b: the K attentions run as one batched call.
        self.sequence = slot * batch + torch.div(self.token, seqlen, rounding_mode="floor")
        self.sequence_rows = torch.empty_like(self.order).scatter_(0, self.sequence * seqlen + self.position, rows)
        # SKIP rows borrow the last module's LayerNorm affine: the grouped GEMM zeroes them whatever they hold.
        self.module_of_row = flat.index_select(0, self.order).clamp(max=n_modules - 1)
        # Not torch.bincount: on CUDA it reads the largest id back to the host to size its output.
        counts = torch.zeros(n_modules + 1, dtype=torch.int64, device=flat.device)
        self.group_sizes = counts.scatter_add_(0, flat, torch.ones_like(flat))[:n_modules]
        self.key_visible = ids < n_modules

    def gather_tokens(self, per_token: torch.Tensor) -> torch.Tensor:
        """``per_token (batch * seqlen, ...)`` -> one row per (token, slot), in sorted order."""
        return per_token.index_select(0, self.token)

    def gather_sequences(self, per_sequence: torch.Tensor) -> torch.Tensor:
        """``per_sequence (slots * batch, seqlen, ...)`` -> the sorted rows' entries."""
        return per_sequence[self.sequence, self.position]

    def scatter_sequences(self, rows: torch.Tensor, seqlen: int) -> torch.Tensor:
        """Sorted rows -> ``(slots * batch, seqlen, ...)``, each at its slot's sequence and its position."""
        return rows.index_select(0, self.sequence_rows).view(self.slots * self.batch, seqlen, *rows.shape[1:])

    def per_row(self, param: torch.Tensor) -> torch.Tensor:
        return param.index_select(0, self.module_of_row)

    def matmul(self, rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return grouped_matmul(rows, weight, self.group_sizes, bias)

    def updates(self, rows: torch.Tensor, seqlen: int) -> torch.Tensor:
        """Sorted rows -> per-slot updates ``(batch, seqlen, K, d)``."""
        return rows.index_select(0, self.inverse).view(self.batch, seqlen, self.slots, -1)

    def add_to(self, x: torch.Tensor, rows: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
        """``x + Σ_k w_k · update_k``: each sorted row, weighted, added to its token in one index_add (SKIP rows
        are zeros). ``weights`` None: every weight is exactly 1 (top-1), so the product is skipped."""
        if weights is not None:
            rows = rows * weights.reshape(-1).index_select(0, self.order)[:, None]
        # x + updates promotes (under autocast: a float32 stream, bfloat16 updates); index_add needs one dtype
        dtype = torch.promote_types(x.dtype, rows.dtype)
        return x.reshape(-1, x.shape[-1]).to(dtype).index_add(0, self.token, rows.to(dtype)).view(x.shape)


class DenseDispatch:
    """Every token to module 0 of a one-module pool: the plain layers below and above the routed block."""

    def matmul(self, rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return torch.addmm(bias[0], rows, weight[0])


DENSE = DenseDispatch()


class _ModulePool(nn.Module):
    """G modules, each with GPT-2's own pre-LayerNorm, stored as stacked parameters."""

    def __init__(self, n_modules: int, d_model: int, eps: float, device, dtype):
        super().__init__()
        check_positive_ints(n_modules=n_modules, d_model=d_model)
        self.n_modules, self.d_model, self.eps = n_modules, d_model, eps
        self._factory = dict(device=device, dtype=dtype)
        self.ln_weight = nn.Parameter(torch.ones(n_modules, d_model, **self._factory))
        self.ln_bias = nn.Parameter(torch.zeros(n_modules, d_model, **self._factory))

    def _weight(self, *shape: int) -> nn.Parameter:
        return nn.Parameter(torch.randn(self.n_modules, *shape, **self._factory) * 0.02)  # GPT-2's init

    def _bias(self, n: int) -> nn.Parameter:
        return nn.Parameter(torch.zeros(self.n_modules, n, **self._factory))

    def normed_rows(self, x: torch.Tensor, dispatch) -> torch.Tensor:
        """Each (token, slot) row normalised by its module's LayerNorm, rows in dispatch order. The
        normalisation is the same for every module, so it runs once per token; only the affine is per row."""
        d = x.shape[-1]
        if dispatch is DENSE:
            return F.layer_norm(x, (d,), self.ln_weight[0], self.ln_bias[0], self.eps).view(-1, d)
        rows = dispatch.gather_tokens(F.layer_norm(x, (d,), eps=self.eps).view(-1, d))
        return torch.addcmul(dispatch.per_row(self.ln_bias), rows, dispatch.per_row(self.ln_weight))

    def forward(self, x: torch.Tensor, dispatch, *args) -> torch.Tensor:
        """The per-slot updates ``(batch, seqlen, K, d_model)`` (SKIP: zeros)."""
        rows = self.sorted_updates(x, dispatch, *args)
        if dispatch is DENSE:
            return rows.view(*x.shape[:2], 1, -1)
        return dispatch.updates(rows, x.shape[1])

    def residual(self, x: torch.Tensor, dispatch, weights: torch.Tensor | None, *args) -> torch.Tensor:
        """``x + Σ_k w_k · update_k`` for router weights ``(batch, seqlen, K)`` (None: top-1, weight 1)."""
        rows = self.sorted_updates(x, dispatch, *args)
        if dispatch is DENSE:
            return x + rows.view(x.shape)
        return dispatch.add_to(x, rows, weights)


class AttentionModules(_ModulePool):
    """A pool of GPT-2 attention modules (c_attn, c_proj with biases; no positional rotation).

    Each token projects its Q/K/V with the module it chose, then one causal attention runs over all tokens. With
    K routing slots there is one such attention per slot k, over every token's k-th choice, each token reading
    only earlier tokens' k-th choices: exact and causal, and the K attentions run as one batched call. A token
    that chose SKIP in slot k is no key of slot k, and its own output is zero (outside every group).
    ``forward`` returns the per-slot updates ``(batch, seqlen, K, d_model)``.
    """

    def __init__(self, n_modules: int, d_model: int, n_head: int, eps: float = 1e-5, device=None, dtype=None):
        super().__init__(n_modules, d_model, eps, device, dtype)
        check_positive_ints(n_head=n_head)
        if d_model % n_head:
            raise ValueError(f"d_model ({d_model}) must be a multiple of n_head ({n_head})")
        self.n_head, self.headdim = n_head, d_model // n_head
        self.c_attn_weight = self._weight(d_model, 3 * d_model)
        self.c_attn_bias = self._bias(3 * d_model)
        self.c_proj_weight = self._weight(d_model, d_model)
        self.c_proj_bias = self._bias(d_model)

    def allocate_inference_cache(self, batch_size: int, max_seqlen: int, slots: int, dtype=None) -> KVCache:
        return KVCache.allocate(slots * batch_size, self.n_head, max_seqlen, self.headdim, self.c_attn_weight.device,
                                dtype or self.c_attn_weight.dtype, hidden_keys=True)

    def sorted_updates(self, x: torch.Tensor, dispatch, cache: KVCache | None = None) -> torch.Tensor:
        batch, seqlen, d = x.shape
        qkv = dispatch.matmul(self.normed_rows(x, dispatch), self.c_attn_weight, self.c_attn_bias)
        if dispatch is DENSE:
            qkv = qkv.view(batch, seqlen, 3 * d)
            visible = None
        else:
            qkv = dispatch.scatter_sequences(qkv, seqlen)  # (slot * batch, seqlen, 3d): slots batch like sequences
            visible = dispatch.key_visible.permute(2, 0, 1).reshape(-1, seqlen)
        # Views, not copies: the attention reads q, k, v with their strides.
        q, k, v = qkv.view(qkv.shape[0], seqlen, 3, self.n_head, self.headdim).permute(2, 0, 3, 1, 4)
        start = 0
        if cache is not None:
            start, k, v, visible = cache.append(k, v, visible)
        out = causal_attention(q, k, v, visible, start).transpose(1, 2)  # (sequences, seqlen, heads, hd)
        rows = out.reshape(-1, d) if dispatch is DENSE else dispatch.gather_sequences(out).view(-1, d)
        return dispatch.matmul(rows, self.c_proj_weight, self.c_proj_bias)


class FFNModules(_ModulePool):
    """A pool of GPT-2 MLP modules: ``c_proj(gelu_tanh(c_fc(LN(x))))``, position-wise, so all K slots of all
    tokens go through one grouped GEMM per projection. Returns ``(batch, seqlen, K, d_model)``."""

    def __init__(self, n_modules: int, d_model: int, d_ffn: int, eps: float = 1e-5, device=None, dtype=None):
        super().__init__(n_modules, d_model, eps, device, dtype)
        check_positive_ints(d_ffn=d_ffn)
        self.c_fc_weight = self._weight(d_model, d_ffn)
        self.c_fc_bias = self._bias(d_ffn)
        self.c_proj_weight = self._weight(d_ffn, d_model)
        self.c_proj_bias = self._bias(d_model)

    def sorted_updates(self, x: torch.Tensor, dispatch) -> torch.Tensor:
        # GELU's tanh form is GPT-2's "gelu_new"; gelu(0) = 0 keeps SKIP rows at zero.
        hidden = F.gelu(dispatch.matmul(self.normed_rows(x, dispatch), self.c_fc_weight, self.c_fc_bias),
                        approximate="tanh")
        return dispatch.matmul(hidden, self.c_proj_weight, self.c_proj_bias)


class TransformerLayer(nn.Module):
    """A plain GPT-2 block, ``x + attn(ln_1 x)`` then ``x + mlp(ln_2 x)``, made of one-module pools."""

    def __init__(self, d_model: int, n_head: int, d_ffn: int, eps: float = 1e-5, device=None, dtype=None):
        super().__init__()
        self.attn = AttentionModules(1, d_model, n_head, eps, device=device, dtype=dtype)
        self.ffn = FFNModules(1, d_model, d_ffn, eps, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        x = self.attn.residual(x, DENSE, None, cache)
        return self.ffn.residual(x, DENSE, None)


class MLPRouter(nn.Module):
    """Router logits ``W₂ gelu(W₁ LN(x))`` per token; it keeps no state across assembly steps. The LayerNorm
    keeps the router's input scale fixed while the residual stream grows step by step."""

    def __init__(self, d_model: int, hidden: int, n_options: int, eps: float = 1e-5, device=None, dtype=None):
        super().__init__()
        factory = dict(device=device, dtype=dtype)
        self.norm = nn.LayerNorm(d_model, eps=eps, **factory)
        self.fc = nn.Linear(d_model, hidden, **factory)
        self.head = nn.Linear(hidden, n_options, **factory)

    def forward(self, x: torch.Tensor, state: None = None) -> tuple[torch.Tensor, None]:
        return self.head(F.gelu(self.fc(self.norm(x)))), None


class GRURouter(nn.Module):
    """Router logits ``W s_h`` with ``s_h = GRU(LN(x_h), s_{h-1})`` per token: the state carries across the
    assembly steps (not across tokens), so a decision can depend on the ones before it."""

    def __init__(self, d_model: int, hidden: int, n_options: int, eps: float = 1e-5, device=None, dtype=None):
        super().__init__()
        factory = dict(device=device, dtype=dtype)
        self.norm = nn.LayerNorm(d_model, eps=eps, **factory)
        self.cell = nn.GRUCell(d_model, hidden, **factory)
        self.head = nn.Linear(hidden, n_options, **factory)

    def forward(self, x: torch.Tensor, state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        state = self.cell(self.norm(x).reshape(-1, x.shape[-1]), state)  # None: the zero initial state
        return self.head(state).view(*x.shape[:-1], -1), state


ROUTERS = {"mlp": MLPRouter, "gru": GRURouter}


def load_balancing_loss(probs: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Switch Transformer's auxiliary loss for one routing decision: ``E · Σ_i f_i · P_i`` over the E options,
    with ``f_i`` the fraction of the (token, slot) picks ``ids (N, K)`` that went to option i and ``P_i`` the mean
    router probability ``probs (N, E)`` of option i. It is 1 for uniform routing; only ``P`` carries gradient."""
    n_options = probs.shape[-1]
    picks = ids.reshape(-1)
    counts = probs.new_zeros(n_options).scatter_add_(0, picks, probs.new_ones(picks.shape))
    return n_options * (counts / picks.numel() * probs.mean(0)).sum()


@dataclass
class ModuleChoice:
    ids: torch.Tensor            # (batch, seqlen, K) chosen option per slot; n_modules = SKIP
    weights: torch.Tensor        # (batch, seqlen, K) router probabilities renormalised over the K chosen
    load_balance: torch.Tensor   # scalar, this decision's load_balancing_loss


def choose_modules(logits: torch.Tensor, top_k: int, forced: torch.Tensor | None = None) -> ModuleChoice:
    """Top-K of the router's softmax (or the ``forced`` ids), with their probabilities renormalised to sum to 1.
    With K = 1 the weight is exactly 1, so the router learns from the load-balancing loss only."""
    probs = logits.to(torch.promote_types(logits.dtype, torch.float32)).softmax(-1)
    if forced is None:
        picked, ids = probs.topk(top_k, dim=-1)
    else:
        ids = forced
        picked = probs.gather(-1, ids)
    weights = (picked / picked.sum(-1, keepdim=True)).to(logits.dtype)
    loss = load_balancing_loss(probs.reshape(-1, probs.shape[-1]), ids.reshape(-1, ids.shape[-1]))
    return ModuleChoice(ids, weights, loss)
