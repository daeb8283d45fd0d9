"""subq.models.MoM and its routed pieces (subq.nn.mom): module pools against a per-token loop, forward/backward,
causality, cached generation, GPT-2 decomposition, the load-balancing loss, save/load, bad arguments, no host
synchronisation in the routed forward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import subq.nn.mom as mom_nn
from conftest import max_err
from subq.models import MoM, MoMConfig
from subq.nn.mom import AttentionModules, FFNModules, ModuleDispatch, choose_modules, load_balancing_loss


def tiny(dtype=torch.float64, **overrides) -> MoM:
    return MoM.from_preset("tiny", **overrides).to(dtype)


def random_route(model: MoM, batch: int, seqlen: int) -> torch.Tensor:
    """Per-token forced routing that uses every module and SKIP."""
    c = model.config
    shape = (batch, seqlen, c.assembly_steps, c.top_k)
    return torch.stack([torch.randint(0, c.n_attn_modules + 1, shape), torch.randint(0, c.n_ffn_modules + 1, shape)],
                       dim=3)


def randomize(pool: torch.nn.Module) -> None:
    """Non-trivial LayerNorm affines and biases (they start at ones and zeros)."""
    with torch.no_grad():
        for p in pool.parameters():
            p.copy_(torch.randn_like(p) * 0.3)


def module_loop_ref(pool, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """The pools written token by token in float64: (batch, seqlen, K, d) updates for ``ids (batch, seqlen, K)``."""
    batch, seqlen, slots = ids.shape
    d, skip = x.shape[-1], pool.n_modules
    out = torch.zeros(batch, seqlen, slots, d, dtype=torch.float64)

    def ln(m, v):
        return F.layer_norm(v, (d,), pool.ln_weight[m], pool.ln_bias[m], pool.eps)

    for b in range(batch):
        for k in range(slots):
            if isinstance(pool, FFNModules):
                for t in range(seqlen):
                    m = ids[b, t, k]
                    if m != skip:
                        h = F.gelu(ln(m, x[b, t]) @ pool.c_fc_weight[m] + pool.c_fc_bias[m], approximate="tanh")
                        out[b, t, k] = h @ pool.c_proj_weight[m] + pool.c_proj_bias[m]
                continue
            qkv = {t: ln(ids[b, t, k], x[b, t]) @ pool.c_attn_weight[ids[b, t, k]] + pool.c_attn_bias[ids[b, t, k]]
                   for t in range(seqlen) if ids[b, t, k] != skip}
            for t, own in qkv.items():
                q = own[:d].view(pool.n_head, -1)
                keys = [s for s in qkv if s <= t]
                kk = torch.stack([qkv[s][d:2 * d].view(pool.n_head, -1) for s in keys], dim=1)
                vv = torch.stack([qkv[s][2 * d:].view(pool.n_head, -1) for s in keys], dim=1)
                att = torch.softmax((kk @ q[:, :, None])[..., 0] / pool.headdim**0.5, dim=-1)
                y = (att[:, :, None] * vv).sum(1).reshape(d)
                out[b, t, k] = y @ pool.c_proj_weight[ids[b, t, k]] + pool.c_proj_bias[ids[b, t, k]]
    return out


@pytest.mark.parametrize("pool_cls", [AttentionModules, FFNModules])
@pytest.mark.parametrize("slots", [1, 2])
def test_pools_match_per_token_loop(pool_cls, slots):
    extra = 4 if pool_cls is AttentionModules else 48
    pool = pool_cls(3, 16, extra, dtype=torch.float64)
    randomize(pool)
    x = torch.randn(2, 7, 16, dtype=torch.float64)
    ids = torch.randint(0, 4, (2, 7, slots))  # 3 = SKIP
    out = pool(x, ModuleDispatch(ids, 3))
    assert out.shape == (2, 7, slots, 16)
    assert max_err(out, module_loop_ref(pool, x, ids)) < 1e-12
    assert torch.all(out[ids == 3] == 0), "SKIP must be a zero update"


def mom_ref(model: MoM, ids: torch.Tensor, route: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole model in float64 with every module run token by token (module_loop_ref) and the chosen updates
    mixed as ``x + Σ_k w_k · update_k``: the formulation before the fused gather / index_add path. Returns the
    logits and the routing."""
    c = model.config
    x = model.wte(ids) + model.wpe(torch.arange(ids.shape[1]))

    def plain(layer, x):
        dense = torch.zeros(*x.shape[:2], 1, dtype=torch.long)
        x = x + module_loop_ref(layer.attn, x, dense)[:, :, 0]
        return x + module_loop_ref(layer.ffn, x, dense)[:, :, 0]

    for layer in model.bottom:
        x = plain(layer, x)
    states, chosen = [None, None], []
    for step in range(c.assembly_steps):
        for kind, (router, pool) in enumerate(((model.attn_router, model.attn_modules),
                                               (model.ffn_router, model.ffn_modules))):
            logits, states[kind] = router(x, states[kind])
            choice = choose_modules(logits, c.top_k, None if route is None else route[:, :, step, kind])
            x = x + (module_loop_ref(pool, x, choice.ids) * choice.weights[..., None]).sum(2)
            chosen.append(choice.ids)
    for layer in model.top:
        x = plain(layer, x)
    return model.lm_head(model.ln_f(x)), torch.stack(chosen, 2).unflatten(2, (c.assembly_steps, 2))


@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("forced", [False, True])
def test_model_matches_the_per_token_formulation(top_k, forced):
    model = tiny(top_k=top_k, router="gru")
    for module in (model.attn_modules, model.ffn_modules, *model.bottom, *model.top):
        randomize(module)
    ids = torch.randint(0, 256, (2, 11))
    route = random_route(model, 2, 11) if forced else None
    with torch.no_grad():
        out = model(ids, route=route)
        logits, chosen = mom_ref(model, ids, route)
    assert torch.equal(out.route, chosen)
    assert max_err(out.logits, logits) < 1e-12


@pytest.mark.parametrize("pool_cls", [AttentionModules, FFNModules])
def test_pool_gradcheck(pool_cls):
    pool = pool_cls(2, 4, 2 if pool_cls is AttentionModules else 6, dtype=torch.float64)
    randomize(pool)
    names = [name for name, _ in pool.named_parameters()]
    ids = torch.randint(0, 3, (1, 5, 2))
    dispatch = ModuleDispatch(ids, 2)

    def f(x, *params):
        return torch.func.functional_call(pool, dict(zip(names, params, strict=True)), (x, dispatch))

    x = torch.randn(1, 5, 4, dtype=torch.float64, requires_grad=True)
    params = [p.detach().clone().requires_grad_() for p in pool.parameters()]
    assert torch.autograd.gradcheck(f, (x, *params), fast_mode=True)


@pytest.mark.parametrize("router", ["mlp", "gru"])
@pytest.mark.parametrize("top_k", [1, 2])
def test_forward_backward(router, top_k):
    model = tiny(torch.float32, router=router, top_k=top_k)
    ids = torch.randint(0, 256, (2, 33))
    out = model(ids)
    c = model.config
    assert out.logits.shape == (2, 33, 256) and out.aux_loss.shape == ()
    assert out.route.shape == (2, 33, c.assembly_steps, 2, top_k)
    lm_loss = F.cross_entropy(out.logits[:, :-1].reshape(-1, 256), ids[:, 1:].reshape(-1))
    routers = [*model.attn_router.parameters(), *model.ffn_router.parameters()]
    if top_k > 1:  # renormalised top-1 weights are exactly 1: the LM loss alone does not reach the routers
        grads = torch.autograd.grad(lm_loss, routers, retain_graph=True, allow_unused=True)
        assert all(g is not None and g.abs().sum() > 0 for g in grads)
    (lm_loss + out.aux_loss).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert all(p.grad.abs().sum() > 0 for p in routers)


def test_forced_route_reproduces_the_routers_choice():
    model = tiny()
    ids = torch.randint(0, 256, (2, 20))
    out = model(ids)
    again = model(ids, route=out.route)
    assert torch.equal(again.logits, out.logits) and torch.equal(again.aux_loss, out.aux_loss)


@pytest.mark.parametrize("forced", [False, True])
def test_causality(forced):
    model = tiny()
    ids = torch.randint(0, 256, (2, 24))
    route = random_route(model, 2, 24) if forced else None
    t = 13
    changed = ids.clone()
    changed[:, t] = (ids[:, t] + 1) % 256
    a, b = model(ids, route=route), model(changed, route=route)
    assert max_err(a.logits[:, :t], b.logits[:, :t]) == 0
    assert torch.equal(a.route[:, :t], b.route[:, :t])
    assert max_err(a.logits[:, t:], b.logits[:, t:]) > 1e-6


@pytest.mark.parametrize("router", ["mlp", "gru"])
@pytest.mark.parametrize("forced", [False, True])
def test_stepping_equals_forward(router, forced):
    model = tiny(router=router)
    ids = torch.randint(0, 256, (2, 30))
    route = random_route(model, 2, 30) if forced else None
    full = model(ids, route=route).logits
    cache = model.allocate_inference_cache(2, 30)
    prefix = model(ids[:, :17], route=None if route is None else route[:, :17], cache=cache).logits
    steps = [model(ids[:, t:t + 1], route=None if route is None else route[:, t:t + 1], cache=cache).logits
             for t in range(17, 30)]
    assert max_err(torch.cat([prefix, *steps], dim=1), full) < 1e-12
    if not forced:
        cache = model.allocate_inference_cache(2, 30)
        model(ids[:, :17], cache=cache)
        stepped = torch.stack([model.step(ids[:, t], cache) for t in range(17, 30)], dim=1)
        assert max_err(stepped, full[:, 17:]) < 1e-12


def test_greedy_generation_is_consistent():
    model = tiny()
    prompt = torch.randint(0, 256, (2, 9))
    out = model.generate(prompt, max_new_tokens=7)
    assert out.shape == (2, 16) and torch.equal(out[:, :9], prompt)
    assert torch.equal(model(out[:, :-1]).logits[:, 8:].argmax(-1), out[:, 9:])


def small_gpt2(dtype):
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=4, n_embd=64, n_head=4, vocab_size=100, n_positions=64,
                                     bos_token_id=0, eos_token_id=0)
    gpt2 = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # larger than the 0.02 init, so the logits are far from zero and the comparison bites
        for p in gpt2.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return gpt2.to(dtype)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
@pytest.mark.parametrize("n_bottom, n_top", [(1, 1), (0, 2)])
def test_from_gpt2_forced_route_reproduces_gpt2(dtype, tol, n_bottom, n_top):
    gpt2 = small_gpt2(dtype)
    model = MoM.from_gpt2(gpt2, n_bottom=n_bottom, n_top=n_top, router="mlp")
    steps = model.config.assembly_steps
    assert steps == 4 - n_bottom - n_top and model.config.top_k == 1
    ids = torch.randint(0, 100, (2, 40))
    with torch.no_grad():
        expected = gpt2(ids).logits
        route = torch.arange(steps)[:, None, None].expand(steps, 2, 1)  # step h -> module h, for every token
        logits = model(ids, route=route).logits
    assert logits.dtype == dtype
    assert max_err(logits, expected) < tol * max(1.0, expected.abs().max().item())


def test_from_gpt2_bad_arguments():
    gpt2 = small_gpt2(torch.float32)
    with pytest.raises(ValueError, match="at least one"):
        MoM.from_gpt2(gpt2, n_bottom=2, n_top=2)
    with pytest.raises(TypeError, match="GPT2LMHeadModel"):
        MoM.from_gpt2(tiny())
    gpt2.config.activation_function = "relu"
    with pytest.raises(ValueError, match="gelu_new"):
        MoM.from_gpt2(gpt2)


def test_load_balancing_loss_on_a_hand_made_routing():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.5, 0.3, 0.2], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6]], dtype=torch.float64)
    ids = torch.tensor([[0], [0], [1], [2]])
    f, p = torch.tensor([0.5, 0.25, 0.25]), torch.tensor([1.5, 1.5, 1.0]) / 4
    assert load_balancing_loss(probs, ids).item() == pytest.approx(3 * (f * p).sum().item(), abs=1e-15)
    ids2 = torch.tensor([[0, 1], [0, 2], [1, 0], [2, 1]])  # top-2: f counts (token, slot) picks
    f2 = torch.tensor([3, 3, 2]) / 8
    assert load_balancing_loss(probs, ids2).item() == pytest.approx(3 * (f2 * p).sum().item(), abs=1e-15)


def test_aux_loss_is_the_coefficient_under_uniform_routers():
    """Uniform router probabilities give E · Σ f_i / E = 1 per decision, whatever the picks."""
    model = tiny(load_balance_coef=0.25)
    with torch.no_grad():
        for router in (model.attn_router, model.ffn_router):
            router.head.weight.zero_()
            router.head.bias.zero_()
    out = model(torch.randint(0, 256, (2, 10)), route=random_route(model, 2, 10))
    assert out.aux_loss.item() == pytest.approx(0.25, abs=1e-14)


def test_save_load_round_trip(tmp_path):
    model = tiny(torch.float32, router="mlp")
    model.save_pretrained(tmp_path / "m")
    loaded = MoM.from_pretrained(tmp_path / "m")
    ids = torch.randint(0, 256, (1, 25))
    a, b = model(ids), loaded(ids)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.route, b.route)
    assert loaded.config == model.config
    assert loaded.lm_head.weight is loaded.wte.weight


@pytest.mark.parametrize("overrides, match", [
    (dict(n_head=5), "multiple of n_head"),
    (dict(top_k=10), "top_k"),
    (dict(top_k=0), "top_k"),
    (dict(router="lstm"), "router"),
    (dict(n_bottom=-1), "n_bottom"),
    (dict(assembly_steps=True), "assembly_steps"),
    (dict(n_attn_modules=2.0), "n_attn_modules"),
    (dict(load_balance_coef=float("nan")), "load_balance_coef"),
])
def test_bad_config(overrides, match):
    with pytest.raises(ValueError, match=match):
        MoMConfig(**{**MoMConfig().__dict__, **overrides})


def test_pool_bad_arguments():
    with pytest.raises(ValueError, match="n_head must be a positive int, got 0"):
        AttentionModules(2, 8, 0)
    with pytest.raises(ValueError, match="d_model \\(8\\) must be a multiple of n_head \\(3\\)"):
        AttentionModules(2, 8, 3)
    with pytest.raises(ValueError, match="n_modules must be a positive int, got 0"):
        FFNModules(0, 8, 16)
    with pytest.raises(ValueError, match="d_model must be a positive int, got -8"):
        AttentionModules(2, -8, 2)
    with pytest.raises(ValueError, match="d_ffn must be a positive int, got 0"):
        FFNModules(2, 8, 0)


def test_bad_forward_arguments():
    with pytest.raises(ValueError, match="unknown preset"):
        MoM.from_preset("huge")
    model = tiny()
    ids = torch.randint(0, 256, (2, 6))
    with pytest.raises(ValueError, match="integer tensor"):
        model(ids, route=torch.zeros(2, 2, 2))
    with pytest.raises(ValueError, match=r"route\[\.\.\., 1, :\] must hold ids in \[0, 3\]"):
        model(ids, route=torch.tensor([[0], [4]]))
    with pytest.raises(ValueError, match="broadcast"):
        model(ids, route=torch.zeros(3, 2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="n_positions"):
        model(torch.zeros(1, 129, dtype=torch.long))
    cache = model.allocate_inference_cache(2, 8)
    model(ids, cache=cache)
    with pytest.raises(ValueError, match="KV cache holds 8"):
        model(ids, cache=cache)


def sync_free_grouped_matmul(x, w, group_sizes, bias=None):
    """The grouped_matmul contract without reading group_sizes on the host (the reference stand-in does)."""
    ends = group_sizes.cumsum(0)
    group = torch.searchsorted(ends, torch.arange(x.shape[0], device=x.device), right=True)  # G past the groups
    w = torch.cat([w, w.new_zeros(1, *w.shape[1:])])
    y = torch.bmm(x[:, None], w[group])[:, 0]
    return y if bias is None else y + torch.cat([bias, bias.new_zeros(1, bias.shape[1])])[group]


def test_forward_makes_no_host_reads(monkeypatch):
    """CPU stand-in for the GPU check below: any Python-level read of a tensor value fails the forward."""
    model = tiny(top_k=2)
    ids = torch.randint(0, 256, (2, 12))
    expected = model(ids)
    monkeypatch.setattr(mom_nn, "grouped_matmul", sync_free_grouped_matmul)

    def host_read(*args, **kwargs):
        raise AssertionError("the routed forward read a tensor value on the host")

    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "cpu", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, host_read)
    out = model(ids)
    monkeypatch.undo()
    assert max_err(out.logits, expected.logits) < 1e-12


@pytest.mark.gpu
def test_routed_forward_does_not_synchronise():
    from subq.ops.grouped_matmul import grouped_matmul
    from subq.reference.grouped_matmul import grouped_matmul_ref

    model = tiny(torch.float32).cuda()
    ids = torch.randint(0, 256, (2, 64), device="cuda")
    model(ids)  # warm-up: first calls may allocate and query the device
    patch = pytest.MonkeyPatch()
    if grouped_matmul is grouped_matmul_ref:  # the reference reads group sizes on the host by design
        patch.setattr(mom_nn, "grouped_matmul", sync_free_grouped_matmul)
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = model(ids)
    finally:
        torch.cuda.set_sync_debug_mode(0)
        patch.undo()
    assert torch.isfinite(out.logits).all()
