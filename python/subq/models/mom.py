"""Mixture-of-Modules (Gong et al. 2024): a transformer assembled per token from a pool of modules.

Token and position embeddings, ``n_bottom`` plain GPT-2 blocks, then H assembly steps: at each step the attention
router picks the top-K of the attention modules + SKIP for every token and the chosen updates, weighted by the
renormalised router probabilities, are added to the residual stream; then the FFN router does the same with the
FFN modules + SKIP. ``n_top`` plain blocks, a final LayerNorm and the LM head tied to the token embedding follow.
Every routing decision adds a switch-style load-balancing loss. ``MoM.from_gpt2`` decomposes a GPT-2 into these
modules (the paper's two-phase recipe: modules from a pretrained model, routers fresh).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from subq._utils import check_int
from subq.models._common import CachedGeneration, Pretrained
from subq.nn.attention import KVCache
from subq.nn.mom import (
    ROUTERS,
    AttentionModules,
    FFNModules,
    ModuleDispatch,
    TransformerLayer,
    choose_modules,
)


@dataclass
class MoMConfig:
    """``top_k`` of the ``n_*_modules + 1`` options (SKIP included) per token, assembly step and module type.
    With ``top_k = 1`` the renormalised weight is exactly 1, so the routers learn from the load-balancing loss
    alone; with ``top_k >= 2`` they also learn from the language-model loss."""

    d_model: int = 768
    n_head: int = 12
    vocab_size: int = 50257
    n_positions: int = 1024
    d_ffn: int = 3072
    n_attn_modules: int = 8
    n_ffn_modules: int = 8
    assembly_steps: int = 8      # H
    top_k: int = 2
    router: str = "gru"          # "mlp" | "gru"
    router_dim: int = 256
    n_bottom: int = 2
    n_top: int = 2
    load_balance_coef: float = 0.01
    layer_norm_eps: float = 1e-5

    def __post_init__(self):
        for name in ("d_model", "n_head", "vocab_size", "n_positions", "d_ffn", "n_attn_modules", "n_ffn_modules",
                     "assembly_steps", "top_k", "router_dim"):
            check_int(getattr(self, name), name, minimum=1)
        for name in ("n_bottom", "n_top"):
            check_int(getattr(self, name), name, minimum=0)
        if self.d_model % self.n_head:
            raise ValueError(f"d_model ({self.d_model}) must be a multiple of n_head ({self.n_head})")
        options = min(self.n_attn_modules, self.n_ffn_modules) + 1
        if self.top_k > options:
            raise ValueError(f"top_k ({self.top_k}) must be at most the smaller pool's options, modules + SKIP "
                             f"({options})")
        if self.router not in ROUTERS:
            raise ValueError(f"router must be one of {sorted(ROUTERS)}, got {self.router!r}")
        if not self.load_balance_coef >= 0:
            raise ValueError(f"load_balance_coef must be >= 0, got {self.load_balance_coef!r}")


# The paper's efficient recipe on GPT-2 small (Gong et al. 2024, arXiv 2407.06677v1, abstract: "MoM-large
# also enables an over 60% reduction in depth while involving more modules per layer, yielding a 16% reduction in
# TFLOPs and a 43% decrease in memory usage compared to GPT-2-large"; issue 22 calls them MoME). The
# per-size (H, K) table was not in the sources available here, so the numbers below are derived from that sentence:
# GPT-2 small's middle ten layers become the pools (n_bottom = n_top = 1, as MoM.from_gpt2 decomposes it), and the
# assembly runs H = 4 steps, 60 % fewer than the ten layers it replaces, each with a SKIP option. With K = 2 modules
# per step ("more modules per layer") the assembly touches at most 2 + 2·4 = 10 blocks' worth of modules against
# GPT-2's 12, the paper's ~16 % saving; K = 1 is the top-1 variant (at most 2 + 4 = 6). Fewer, SKIP-able steps also
# store fewer activations, the memory saving. ``MoM.from_gpt2(gpt2_small, assembly_steps=4, top_k=2)`` (or 1)
# builds the same structure with GPT-2's weights.
_EFFICIENT = dict(n_attn_modules=10, n_ffn_modules=10, assembly_steps=4, n_bottom=1, n_top=1, router="gru")

# GPT-2 small's sizes with its middle eight layers as the pools, the efficient presets above, and a tiny one for tests.
PRESETS = {
    "gpt2-small": dict(),
    "gpt2-small-e": dict(_EFFICIENT, top_k=2),
    "gpt2-small-e-top1": dict(_EFFICIENT, top_k=1),
    "tiny": dict(d_model=64, n_head=4, vocab_size=256, n_positions=128, d_ffn=256, n_attn_modules=3,
                 n_ffn_modules=3, assembly_steps=2, router_dim=32, n_bottom=1, n_top=1),
}

# Where each pool parameter comes from in a Hugging Face GPT2Block.
GPT2_ATTENTION = {"ln_weight": "ln_1.weight", "ln_bias": "ln_1.bias", "c_attn_weight": "attn.c_attn.weight",
                  "c_attn_bias": "attn.c_attn.bias", "c_proj_weight": "attn.c_proj.weight",
                  "c_proj_bias": "attn.c_proj.bias"}
GPT2_FFN = {"ln_weight": "ln_2.weight", "ln_bias": "ln_2.bias", "c_fc_weight": "mlp.c_fc.weight",
            "c_fc_bias": "mlp.c_fc.bias", "c_proj_weight": "mlp.c_proj.weight", "c_proj_bias": "mlp.c_proj.bias"}


@dataclass
class MoMOutput:
    logits: torch.Tensor     # (batch, seqlen, vocab)
    aux_loss: torch.Tensor   # scalar: load_balance_coef · the mean load-balancing loss of the 2H decisions
    route: torch.Tensor      # (batch, seqlen, H, 2, K) chosen options; [..., 0, :] attention, [..., 1, :] FFN


class MoM(CachedGeneration, Pretrained, nn.Module):
    config_class = MoMConfig
    presets = PRESETS

    def __init__(self, config: MoMConfig, device=None, dtype=None):
        super().__init__()
        self.config = c = config
        factory = dict(device=device, dtype=dtype)
        self.wte = nn.Embedding(c.vocab_size, c.d_model, **factory)
        self.wpe = nn.Embedding(c.n_positions, c.d_model, **factory)
        for embedding in (self.wte, self.wpe):
            nn.init.normal_(embedding.weight, std=0.02)

        def plain_layers(n):
            return nn.ModuleList(TransformerLayer(c.d_model, c.n_head, c.d_ffn, c.layer_norm_eps, **factory)
                                 for _ in range(n))

        self.bottom = plain_layers(c.n_bottom)
        self.attn_modules = AttentionModules(c.n_attn_modules, c.d_model, c.n_head, c.layer_norm_eps, **factory)
        self.ffn_modules = FFNModules(c.n_ffn_modules, c.d_model, c.d_ffn, c.layer_norm_eps, **factory)
        router = ROUTERS[c.router]
        self.attn_router = router(c.d_model, c.router_dim, c.n_attn_modules + 1, c.layer_norm_eps, **factory)
        self.ffn_router = router(c.d_model, c.router_dim, c.n_ffn_modules + 1, c.layer_norm_eps, **factory)
        self.top = plain_layers(c.n_top)
        self.ln_f = nn.LayerNorm(c.d_model, eps=c.layer_norm_eps, **factory)
        self.lm_head = nn.Linear(c.d_model, c.vocab_size, bias=False, **factory)
        self.lm_head.weight = self.wte.weight

    def forward(self, input_ids: torch.Tensor, route: torch.Tensor | None = None,
                cache: list[KVCache] | None = None) -> MoMOutput:
        """``input_ids (batch, seqlen)``. ``route`` forces the routing: option ids broadcastable to
        ``(batch, seqlen, H, 2, top_k)`` (per step and module type, or per token too; SKIP = the pool size); the
        weights stay the router's renormalised probabilities of the forced options. ``cache`` (from
        ``allocate_inference_cache``) continues from the cached positions and extends them (prefill)."""
        batch, seqlen = input_ids.shape
        start = 0 if cache is None else cache[0].length
        if start + seqlen > self.config.n_positions:
            raise ValueError(f"positions up to {start + seqlen} exceed n_positions ({self.config.n_positions})")
        caches = [None] * self.n_attention_calls if cache is None else cache
        bottom, steps, top = self._split(caches)
        x = self.wte(input_ids) + self.wpe(torch.arange(start, start + seqlen, device=input_ids.device))
        for layer, layer_cache in zip(self.bottom, bottom, strict=True):
            x = layer(x, layer_cache)
        x, aux_loss, chosen = self._assemble(x, None if route is None else self._forced(route, batch, seqlen), steps)
        for layer, layer_cache in zip(self.top, top, strict=True):
            x = layer(x, layer_cache)
        return MoMOutput(self.lm_head(self.ln_f(x)), aux_loss, chosen)

    def _assemble(self, x: torch.Tensor, forced: torch.Tensor | None, caches: list):
        """The H assembly steps; routers' states start at zero for every token and carry from step to step."""
        attn_state = ffn_state = None
        losses, chosen = [], []
        # Top-1 weights are exactly 1 (the pick renormalised by itself): the update is added unweighted.
        weighted = self.config.top_k > 1
        for step, cache in enumerate(caches):
            attn, attn_state = self._choose(self.attn_router, x, attn_state, forced, step, 0)
            x = self.attn_modules.residual(x, ModuleDispatch(attn.ids, self.config.n_attn_modules),
                                           attn.weights if weighted else None, cache)
            ffn, ffn_state = self._choose(self.ffn_router, x, ffn_state, forced, step, 1)
            x = self.ffn_modules.residual(x, ModuleDispatch(ffn.ids, self.config.n_ffn_modules),
                                          ffn.weights if weighted else None)
            losses += [attn.load_balance, ffn.load_balance]
            chosen.append(torch.stack([attn.ids, ffn.ids], dim=2))
        aux_loss = self.config.load_balance_coef * torch.stack(losses).mean()
        return x, aux_loss, torch.stack(chosen, dim=2)

    def _choose(self, router: nn.Module, x: torch.Tensor, state, forced, step: int, kind: int):
        logits, state = router(x, state)
        return choose_modules(logits, self.config.top_k, None if forced is None else forced[:, :, step, kind]), state

    def _forced(self, route: torch.Tensor, batch: int, seqlen: int) -> torch.Tensor:
        """``route`` broadcast to (batch, seqlen, H, 2, K) and checked; the range check reads values back to the
        host, which only forced routing (a test and analysis tool) pays."""
        c = self.config
        shape = (batch, seqlen, c.assembly_steps, 2, c.top_k)
        if not isinstance(route, torch.Tensor) or route.dtype.is_floating_point or route.dtype.is_complex \
                or route.dtype == torch.bool:
            got = route.dtype if isinstance(route, torch.Tensor) else type(route).__name__
            raise ValueError(f"route must be an integer tensor of module ids, got {got}")
        try:
            route = torch.broadcast_to(route.to(device=self.wte.weight.device, dtype=torch.long), shape)
        except RuntimeError:
            raise ValueError(f"route must broadcast to (batch, seqlen, H, 2, top_k) = {shape}, "
                             f"got shape {tuple(route.shape)}") from None
        for kind, n_modules in ((0, c.n_attn_modules), (1, c.n_ffn_modules)):
            ids = route[:, :, :, kind]
            if bool((ids < 0).any()) or bool((ids > n_modules).any()):
                raise ValueError(f"route[..., {kind}, :] must hold ids in [0, {n_modules}] ({n_modules} = SKIP), "
                                 f"got values in [{int(ids.min())}, {int(ids.max())}]")
        return route

    @property
    def n_attention_calls(self) -> int:
        return self.config.n_bottom + self.config.assembly_steps + self.config.n_top

    def _split(self, caches: list) -> tuple[list, list, list]:
        routed_end = self.config.n_bottom + self.config.assembly_steps
        return caches[:self.config.n_bottom], caches[self.config.n_bottom:routed_end], caches[routed_end:]

    def allocate_inference_cache(self, batch_size: int, max_seqlen: int, dtype=None) -> list[KVCache]:
        """One KV cache per attention call, in forward's order: the bottom layers', one per assembly step (a row
        per routing slot and sequence), the top layers'."""
        def plain(layers):
            return [layer.attn.allocate_inference_cache(batch_size, max_seqlen, 1, dtype) for layer in layers]

        routed = [self.attn_modules.allocate_inference_cache(batch_size, max_seqlen, self.config.top_k, dtype)
                  for _ in range(self.config.assembly_steps)]
        return plain(self.bottom) + routed + plain(self.top)

    def prefill(self, input_ids: torch.Tensor, caches) -> torch.Tensor:
        """The last position's logits (batch, vocab) of the prompt, leaving ``caches`` ready for ``step``."""
        return self(input_ids, cache=caches).logits[:, -1]

    def step(self, input_ids: torch.Tensor, cache: list[KVCache]) -> torch.Tensor:
        """Logits (batch, vocab) for one new token per sequence, ``input_ids (batch,)``; extends ``cache``."""
        return self(input_ids[:, None], cache=cache).logits[:, 0]

    @classmethod
    def from_gpt2(cls, gpt2, n_bottom: int = 1, n_top: int = 1, assembly_steps: int | None = None, top_k: int = 1,
                  router: str = "gru", router_dim: int = 256, load_balance_coef: float = 0.01) -> MoM:
        """Decompose a Hugging Face ``GPT2LMHeadModel``: its first ``n_bottom`` and last ``n_top`` blocks become the
        plain layers, the middle blocks' attention and MLP, in order, the attention and FFN pools (module i from
        middle block i, keeping its pre-LayerNorm and biases); embeddings and the final LayerNorm are copied, the
        routers freshly initialised. ``assembly_steps`` defaults to the number of middle blocks, so routing every
        token at step h to module h (and ``top_k = 1``) reproduces GPT-2's logits."""
        from transformers import GPT2LMHeadModel

        if not isinstance(gpt2, GPT2LMHeadModel):
            raise TypeError(f"gpt2 must be a transformers.GPT2LMHeadModel, got {type(gpt2).__name__}")
        g = gpt2.config
        if g.activation_function != "gelu_new":
            raise ValueError(f"the FFN modules compute GPT-2's gelu_new; got activation_function "
                             f"{g.activation_function!r}")
        if not g.scale_attn_weights or g.scale_attn_by_inverse_layer_idx:
            raise ValueError("the attention modules scale scores by 1/sqrt(headdim) only; this GPT-2 scales them "
                             "differently (scale_attn_weights / scale_attn_by_inverse_layer_idx)")
        wte = gpt2.transformer.wte.weight
        if not torch.equal(gpt2.lm_head.weight, wte):
            raise ValueError("MoM ties its LM head to the token embedding; this GPT-2's lm_head differs from wte")
        n_middle = g.n_layer - n_bottom - n_top
        if n_middle < 1:
            raise ValueError(f"n_bottom ({n_bottom}) + n_top ({n_top}) must leave at least one of GPT-2's "
                             f"{g.n_layer} layers for the module pools")
        config = MoMConfig(d_model=g.n_embd, n_head=g.n_head, vocab_size=g.vocab_size, n_positions=g.n_positions,
                           d_ffn=g.n_inner or 4 * g.n_embd, n_attn_modules=n_middle, n_ffn_modules=n_middle,
                           assembly_steps=assembly_steps or n_middle, top_k=top_k, router=router,
                           router_dim=router_dim, n_bottom=n_bottom, n_top=n_top,
                           load_balance_coef=load_balance_coef, layer_norm_eps=g.layer_norm_epsilon)
        model = cls(config, device=wte.device, dtype=wte.dtype)
        blocks = list(gpt2.transformer.h)
        with torch.no_grad():
            for ours, theirs in ((model.wte, gpt2.transformer.wte), (model.wpe, gpt2.transformer.wpe),
                                 (model.ln_f, gpt2.transformer.ln_f)):
                ours.load_state_dict(theirs.state_dict())
            plain = [*model.bottom, *model.top]
            for layer, block in zip(plain, blocks[:n_bottom] + blocks[n_bottom + n_middle:], strict=True):
                _copy_gpt2_blocks([block], layer.attn, layer.ffn)
            _copy_gpt2_blocks(blocks[n_bottom:n_bottom + n_middle], model.attn_modules, model.ffn_modules)
        return model


def _copy_gpt2_blocks(blocks: list[nn.Module], attn: AttentionModules, ffn: FFNModules) -> None:
    """Module i of both pools from ``blocks[i]``: GPT-2's Conv1D weights are already (in, out), the pools' layout."""
    for pool, names in ((attn, GPT2_ATTENTION), (ffn, GPT2_FFN)):
        for ours, theirs in names.items():
            getattr(pool, ours).copy_(torch.stack([block.get_parameter(theirs) for block in blocks]))
