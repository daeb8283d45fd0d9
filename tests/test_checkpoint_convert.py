"""Checkpoints in other projects' formats (subq.models.convert): transformers and mamba_ssm Mamba-2, HazyResearch's
M2-BERT, MoM with its routers; and the one error every checkpoint that does not fit raises.

Foreign models are built here from small random configs (nothing is downloaded) and compared against the loaded
subq model and against float64 references written from the other projects' equations and tensor names.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re

import pytest
import torch
import torch.nn.functional as F

from subq.models import M2BertForMaskedLM, Mamba2LM, MoM
from subq.models.convert import CheckpointError

transformers = pytest.importorskip("transformers")

DEVICE = "cpu"


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


# ---- Mamba-2: a float64 reference on the transformers / mamba_ssm tensor names -------------------------------------


def rmsnorm(x, weight, eps, groups=1):
    shape = x.shape
    x = x.reshape(*shape[:-1], groups, -1)
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return x.reshape(shape) * weight


def mamba2_reference(sd: dict, hf: dict, ids: torch.Tensor) -> torch.Tensor:
    """Mamba2ForCausalLM's logits, token by token (the SSM as its recurrence), in float64, from a state dict in
    transformers' names and a *complete* transformers config dict."""
    sd = {k: v.double() for k, v in sd.items()}
    d_inner = hf["expand"] * hf["hidden_size"]
    H, P, G, N = hf["num_heads"], hf["head_dim"], hf["n_groups"], hf["state_size"]
    eps, (dt_lo, dt_hi) = hf["layer_norm_epsilon"], hf["time_step_limit"]
    batch, seqlen = ids.shape
    x = sd["backbone.embeddings.weight"][ids]
    for i in range(hf["num_hidden_layers"]):
        p = f"backbone.layers.{i}."
        h = rmsnorm(x, sd[p + "norm.weight"], eps)
        zxbcdt = F.linear(h, sd[p + "mixer.in_proj.weight"], sd.get(p + "mixer.in_proj.bias"))
        z, xbc, dt = zxbcdt.split([d_inner, d_inner + 2 * G * N, H], dim=-1)
        w = sd[p + "mixer.conv1d.weight"][:, 0]                          # (channels, K)
        K = w.shape[1]
        padded = F.pad(xbc, (0, 0, K - 1, 0))
        conv = sum(padded[:, j:j + seqlen] * w[:, j] for j in range(K)) + sd.get(p + "mixer.conv1d.bias", 0)
        xs, B, C = F.silu(conv).split([d_inner, G * N, G * N], dim=-1)
        dt = F.softplus(dt + sd[p + "mixer.dt_bias"]).clamp(dt_lo, dt_hi)
        A = -torch.exp(sd[p + "mixer.A_log"])
        xs = xs.reshape(batch, seqlen, H, P)
        head_group = torch.arange(H) // (H // G)
        B = B.reshape(batch, seqlen, G, N)[:, :, head_group]
        C = C.reshape(batch, seqlen, G, N)[:, :, head_group]
        state = torch.zeros(batch, H, P, N, dtype=torch.float64)
        ys = []
        for t in range(seqlen):
            decay = torch.exp(dt[:, t] * A)[:, :, None, None]
            state = state * decay + (dt[:, t, :, None] * xs[:, t])[..., None] * B[:, t, :, None, :]
            ys.append((state * C[:, t, :, None, :]).sum(-1) + sd[p + "mixer.D"][:, None] * xs[:, t])
        y = torch.stack(ys, dim=1).reshape(batch, seqlen, d_inner) * F.silu(z)
        y = rmsnorm(y, sd[p + "mixer.norm.weight"], eps, groups=G)
        x = x + F.linear(y, sd[p + "mixer.out_proj.weight"], sd.get(p + "mixer.out_proj.bias"))
    head = sd.get("lm_head.weight", sd["backbone.embeddings.weight"])
    return F.linear(rmsnorm(x, sd["backbone.norm_f.weight"], eps), head)


HF_SMALL = dict(hidden_size=32, num_hidden_layers=2, vocab_size=67, state_size=16, head_dim=16, expand=2, num_heads=4,
                n_groups=2, chunk_size=64, conv_kernel=4, residual_in_fp32=False, eos_token_id=None,
                pad_token_id=None, bos_token_id=None)


def hf_mamba2(dtype=torch.float32, **overrides):
    """A random transformers Mamba2ForCausalLM (every parameter perturbed, so none sits at its init value)."""
    config = transformers.Mamba2Config(**{**HF_SMALL, **overrides})
    model = transformers.Mamba2ForCausalLM(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.2 * torch.randn_like(param))
    return model.to(dtype)


def hf_greedy(model, prompt: torch.Tensor, n: int) -> torch.Tensor:
    """transformers' greedy generation. Its one-token step skips time_step_limit (its full forward applies it, as
    subq's step does), so with a limit set, greedy decoding by repeated full forwards is the comparison."""
    if tuple(model.config.time_step_limit) == (0.0, math.inf):
        return model.generate(prompt, max_new_tokens=n, do_sample=False)
    tokens = prompt
    with torch.no_grad():
        for _ in range(n):
            tokens = torch.cat([tokens, model(tokens).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return tokens


def full_hf_config(model) -> dict:
    config = model.config
    return {k: getattr(config, k) for k in ("hidden_size", "num_hidden_layers", "expand", "num_heads", "head_dim",
                                            "n_groups", "state_size", "layer_norm_epsilon", "time_step_limit")}


MAMBA2_CASES = [
    dict(tie_word_embeddings=False),
    dict(tie_word_embeddings=True, layer_norm_epsilon=1e-3, time_step_limit=(0.01, 0.3), use_bias=True,
         conv_kernel=3, n_groups=1),
]


@pytest.mark.parametrize("overrides", MAMBA2_CASES, ids=["untied", "tied-bias-dtlimit"])
def test_hf_mamba2_loads_into_subq(tmp_path, overrides):
    torch.manual_seed(0)
    ids = torch.randint(0, 67, (2, 23))
    # float64: the loaded model against the reference on the saved tensors.
    hf64 = hf_mamba2(torch.float64, **overrides)
    hf64.save_pretrained(tmp_path / "hf64")
    ours64 = Mamba2LM.from_pretrained(tmp_path / "hf64").eval()
    assert ours64.lm_head.weight.dtype == torch.float64
    assert (ours64.lm_head.weight is ours64.embedding.weight) == overrides["tie_word_embeddings"]
    with torch.no_grad():
        expected = mamba2_reference(hf64.state_dict(), full_hf_config(hf64), ids)
        assert rel_err(ours64(ids), expected) <= 1e-10
    # older transformers files: pytorch_model.bin, the embedding under its old name
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "config.json").write_text((tmp_path / "hf64" / "config.json").read_text())
    torch.save({k.replace("embeddings", "embedding"): v for k, v in hf64.state_dict().items()},
               legacy / "pytorch_model.bin")
    hf64.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    with torch.no_grad():
        assert torch.equal(Mamba2LM.from_pretrained(legacy).eval()(ids), ours64(ids))
        assert torch.equal(Mamba2LM.from_pretrained(tmp_path / "sharded").eval()(ids), ours64(ids))
    # float32: against transformers itself, logits and greedy generation.
    hf32 = hf_mamba2(torch.float32, **overrides)
    hf32.save_pretrained(tmp_path / "hf32")
    ours32 = Mamba2LM.from_pretrained(tmp_path / "hf32").eval()
    with torch.no_grad():
        theirs = hf32(ids).logits
        assert rel_err(ours32(ids), theirs) <= 1e-5
    prompt = ids[:, :6]
    assert torch.equal(ours32.generate(prompt, 12), hf_greedy(hf32, prompt, 12))


def test_subq_mamba2_saves_for_transformers(tmp_path):
    torch.manual_seed(1)
    ids = torch.randint(0, 67, (2, 19))
    for dtype, tie in ((torch.float64, True), (torch.float32, False)):
        ours = Mamba2LM.from_preset("tiny", vocab_size=67, ngroups=2, chunk_size=64, norm_eps=1e-4,
                                    mixer_norm_eps=1e-4, dt_limit=(0.001, 0.5), tie_embeddings=tie).to(dtype).eval()
        with torch.no_grad():
            for param in ours.parameters():
                param.add_(0.2 * torch.randn_like(param))
        path = ours.save_pretrained(tmp_path / f"out-{dtype}", format="hf")
        theirs = transformers.Mamba2ForCausalLM.from_pretrained(path, dtype=dtype).eval()
        sd = theirs.state_dict()
        assert torch.equal(sd["backbone.embeddings.weight"], ours.embedding.weight)
        assert torch.equal(sd["backbone.layers.1.mixer.A_log"], ours.layers[1].mixer.A_log)
        assert torch.equal(sd["lm_head.weight"], ours.lm_head.weight)
        with torch.no_grad():
            if dtype == torch.float64:
                assert rel_err(ours(ids), mamba2_reference(sd, full_hf_config(theirs), ids)) <= 1e-10
            else:
                assert rel_err(theirs(ids).logits, ours(ids)) <= 1e-5
                prompt = ids[:, :5]
                assert torch.equal(hf_greedy(theirs, prompt, 10), ours.generate(prompt, 10))
        # and back: the same tensors, the same config
        again = Mamba2LM.from_pretrained(path)
        # attn_num_heads means nothing without attention layers, and HF has no field for it
        assert again.config == dataclasses.replace(ours.config, attn_num_heads=again.config.attn_num_heads)
        assert again.state_dict().keys() == ours.state_dict().keys()
        assert all(torch.equal(again.state_dict()[k], v) for k, v in ours.state_dict().items())


def mamba_ssm_folder(path, hf_model, vocab_size: int, pad_multiple: int, **ssm_overrides):
    """The folder MambaLMHeadModel.save_pretrained writes, built from a transformers model's tensors."""
    c = hf_model.config
    ssm_cfg = {"layer": "Mamba2", "d_state": c.state_size, "d_conv": c.conv_kernel, "expand": c.expand,
               "headdim": c.head_dim, "ngroups": c.n_groups, "chunk_size": c.chunk_size,
               "dt_limit": list(c.time_step_limit), "A_init_range": [1, 16], **ssm_overrides}
    config = {"d_model": c.hidden_size, "d_intermediate": 0, "n_layer": c.num_hidden_layers, "vocab_size": vocab_size,
              "ssm_cfg": ssm_cfg, "attn_layer_idx": [], "attn_cfg": {}, "rms_norm": True, "residual_in_fp32": True,
              "fused_add_norm": True, "pad_vocab_size_multiple": pad_multiple,
              "tie_embeddings": c.tie_word_embeddings}
    state = {k.replace("backbone.embeddings.", "backbone.embedding."): v.clone()
             for k, v in hf_model.state_dict().items()}
    path.mkdir()
    (path / "config.json").write_text(json.dumps(config))
    torch.save(state, path / "pytorch_model.bin")
    return path


def test_mamba_ssm_folder_loads_and_saves(tmp_path):
    torch.manual_seed(2)
    # vocabulary 61 padded to a multiple of 8: the embedding holds 64 rows, as mamba_ssm stores it
    hf = hf_mamba2(torch.float64, vocab_size=64, tie_word_embeddings=True, layer_norm_epsilon=1e-5)
    path = mamba_ssm_folder(tmp_path / "ms", hf, vocab_size=61, pad_multiple=8)
    ours = Mamba2LM.from_pretrained(path).eval()
    assert ours.config.vocab_size == 64 and ours.lm_head.weight is ours.embedding.weight
    ids = torch.randint(0, 61, (2, 17))
    with torch.no_grad():
        assert rel_err(ours(ids), mamba2_reference(hf.state_dict(), full_hf_config(hf), ids)) <= 1e-10
    out = ours.save_pretrained(tmp_path / "back", format="mamba_ssm")
    saved = torch.load(out / "pytorch_model.bin", weights_only=True)
    original = torch.load(path / "pytorch_model.bin", weights_only=True)
    assert saved.keys() == original.keys()
    assert all(torch.equal(saved[k], original[k]) for k in original)
    assert Mamba2LM.from_pretrained(out).config == ours.config


# ---- one clear error for a checkpoint that does not fit ------------------------------------------------------------


def test_checkpoint_errors_name_file_format_and_key(tmp_path):
    torch.manual_seed(3)
    hf = hf_mamba2()
    good = tmp_path / "good"
    hf.save_pretrained(good)

    def expect(path, *fragments, cls=Mamba2LM):
        with pytest.raises(CheckpointError) as info:
            cls.from_pretrained(path)
        for fragment in fragments:
            assert fragment in str(info.value), (fragment, str(info.value))

    expect(tmp_path / "nothing", "config.json", "no such file", "model_type 'mamba2'", "mamba_ssm")
    unknown = tmp_path / "unknown"
    unknown.mkdir()
    (unknown / "config.json").write_text(json.dumps({"hidden_size": 8}))
    expect(unknown, str(unknown / "config.json"), "expected one of", "subq", "model_type 'mamba2'", "ssm_cfg")

    def variant(name, config_change=None, state_change=None):
        path = tmp_path / name
        path.mkdir()
        config = json.loads((good / "config.json").read_text())
        (path / "config.json").write_text(json.dumps({**config, **(config_change or {})}))
        from safetensors.torch import load_file, save_file
        state = load_file(str(good / "model.safetensors"))
        if state_change:
            state_change(state)
        save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
        return path

    expect(variant("missing", state_change=lambda s: s.pop("backbone.layers.1.mixer.D")),
           "model.safetensors", "hf", "missing key 'backbone.layers.1.mixer.D'")
    expect(variant("unexpected", state_change=lambda s: s.update({"backbone.extra.weight": torch.ones(3)})),
           "model.safetensors", "unexpected key 'backbone.extra.weight'")
    expect(variant("shape", state_change=lambda s: s.update(
        {"backbone.layers.0.mixer.dt_bias": torch.ones(5)})),
           "key 'backbone.layers.0.mixer.dt_bias' has shape (5,)", "expects (4,)")
    expect(variant("tied", {"tie_word_embeddings": True}), "keys 'backbone.embeddings.weight' and 'lm_head.weight'",
           "differ")
    expect(variant("act", {"hidden_act": "gelu"}), "hidden_act='gelu'")
    expect(variant("heads", {"num_heads": 8}), "num_heads=8")
    expect(variant("chunk", {"chunk_size": 100}), "chunk_size")
    expect(variant("no-weights", state_change=lambda s: s.clear()), "missing key")

    # mamba_ssm options without a subq equivalent
    for name, change in (("mamba1", {"ssm_cfg": {}}), ("layernorm", {"rms_norm": False}),
                         ("mlp", {"d_intermediate": 64}), ("attn", {"attn_layer_idx": [1]}),
                         ("init", {"ssm_cfg": {"layer": "Mamba2", "learnable_init_states": True}})):
        path = tmp_path / name
        path.mkdir()
        config = {"d_model": 32, "n_layer": 2, "vocab_size": 64, "ssm_cfg": {"layer": "Mamba2"}, **change}
        (path / "config.json").write_text(json.dumps(config))
        field = next(iter(change))
        expect(path, str(path / "config.json"), "mamba_ssm", field)

    # a Mamba-2 folder is not an M2-BERT
    expect(good, "expected one of", "m2", cls=M2BertForMaskedLM)

    # saving what the target format cannot express
    model = Mamba2LM.from_preset("tiny", norm_before_gate=True)
    with pytest.raises(ValueError, match="norm_before_gate=True"):
        model.save_pretrained(tmp_path / "nbg", format="hf")
    with pytest.raises(ValueError, match="format must be 'subq' or one of"):
        model.save_pretrained(tmp_path / "x", format="gguf")


# ---- MoM: a trained model with its routers -------------------------------------------------------------------------


def test_trained_mom_round_trip_keeps_routing(tmp_path):
    torch.manual_seed(4)
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=32, n_layer=4, n_head=4, vocab_size=97,
                                                                n_positions=64)).double()
    model = MoM.from_gpt2(gpt2, top_k=2, router="gru", router_dim=16)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(3):  # move the routers (and everything else) off their initial values
        ids = torch.randint(0, 97, (4, 24))
        out = model(ids)
        loss = F.cross_entropy(out.logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()) + out.aux_loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    model.save_pretrained(tmp_path / "mom")
    loaded = MoM.from_pretrained(tmp_path / "mom").eval()
    assert loaded.config == model.config and loaded.wte.weight.dtype == torch.float64
    ids = torch.randint(0, 97, (3, 30))
    with torch.no_grad():
        a, b = model(ids), loaded(ids)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.route, b.route) and torch.equal(a.aux_loss, b.aux_loss)
    assert len(a.route.unique()) > 1
    assert torch.equal(model.generate(ids[:, :4], 8), loaded.generate(ids[:, :4], 8))


# ---- M2-BERT: HazyResearch/m2 bert/ state dicts --------------------------------------------------------------------

M2_SMALL = dict(hidden_size=16, num_hidden_layers=2, intermediate_size=32, vocab_size=50, type_vocab_size=2,
                max_position_embeddings=32, long_conv_l_max=32, layer_norm_eps=1e-12, hidden_act="gelu",
                monarch_mixer_sequence_mixing=True, bidirectional=True, residual_long_conv=True, use_glu_mlp=True,
                use_monarch_mlp=True, monarch_mlp_nblocks=4, use_positional_encodings=True, hyena_filter_order=8,
                hyena_emb_dim=5, hyena_w=10, hyena_w_mod=1, hyena_lr_pos_emb=1e-5, hyena_filter_dropout=0.2,
                hyena_training_additions=False)
M2_CASES = [M2_SMALL, {**M2_SMALL, "use_monarch_mlp": False, "residual_long_conv": False, "hyena_w_mod": 2,
                       "use_positional_encodings": False, "hyena_emb_dim": 3}]


def m2_state_dict(c: dict, dtype=torch.float64) -> dict[str, torch.Tensor]:
    """A random state dict with the names and shapes of m2's BertForMaskedLM (MonarchMixerSequenceMixing layers,
    BertGatedLinearUnitMLP, BlockdiagLinear or nn.Linear, HyenaFilter with trained positional features)."""
    d, inner, L, E, order = (c[k] for k in ("hidden_size", "intermediate_size", "long_conv_l_max", "hyena_emb_dim",
                                           "hyena_filter_order"))
    nb = c["monarch_mlp_nblocks"] if c["use_monarch_mlp"] else 1

    def r(*shape, scale=0.3):
        return scale * torch.randn(*shape, dtype=torch.float64)

    sd = {"bert.embeddings.word_embeddings.weight": r(c["vocab_size"], d),
          "bert.embeddings.token_type_embeddings.weight": r(2, d),
          "bert.embeddings.LayerNorm.weight": 1 + r(d), "bert.embeddings.LayerNorm.bias": r(d)}
    if c["use_positional_encodings"]:
        sd["bert.embeddings.position_embeddings.weight"] = r(L, d)
        sd["bert.embeddings.position_ids"] = torch.arange(L)[None]
    t = torch.linspace(0, 1, L)[None, :, None]
    bands = (E - 1) // 2
    w = 2 * math.pi * torch.linspace(0, L - 1, L)[None, :, None] / L
    z = torch.exp(-1j * torch.linspace(1e-4, bands - 1, bands)[None, None] * w)
    z = torch.cat([t, z.real, z.imag], dim=-1)
    deltas = torch.linspace(math.log(1e-2) / 1.5, math.log(1e-2) / 0.3, d)[None, None]
    for i in range(c["num_hidden_layers"]):
        p = f"bert.encoder.layer.{i}."
        sd |= {p + "attention.in_linear.weight": r(3 * d, d), p + "attention.in_linear.bias": r(3 * d),
               p + "attention.out_linear.weight": r(d, d), p + "attention.out_linear.bias": r(d),
               p + "attention.short_filter.weight": r(3 * d, 1, 3), p + "attention.short_filter.bias": r(3 * d)}
        for filt in ("filter_fn", "filter_fn2") if c["residual_long_conv"] else ("filter_fn",):
            f = p + f"attention.{filt}."
            sd |= {f + "bias": r(d), f + "pos_emb.z": z.double() + r(*z.shape, scale=0.01), f + "pos_emb.t": t.double(),
                   f + "modulation.deltas": deltas.double()}
            freq = 10 + r(1, order)    # one Sin module shared by every activation of both banks
            for bank in ("implicit_filter", "implicit_filter_rev"):
                b = f + bank + "."
                sd |= {b + "0.weight": r(order, E, scale=1.0), b + "0.bias": r(order), b + "2.weight": r(order, order),
                       b + "2.bias": r(order), b + "4.weight": r(order, order), b + "4.bias": r(order),
                       b + "6.weight": r(d, order)}
                sd |= {b + f"{j}.freq": freq for j in (1, 3, 5)}
        gated, wo = (r(nb, 2 * inner // nb, d // nb), r(nb, d // nb, inner // nb)) if nb > 1 else (
            r(2 * inner, d), r(d, inner))
        sd |= {p + "mlp.gated_layers.weight": gated, p + "mlp.wo.weight": wo, p + "mlp.wo.bias": r(d),
               p + "mlp.layernorm.weight": 1 + r(d), p + "mlp.layernorm.bias": r(d)}
    sd |= {"cls.predictions.transform.dense.weight": r(d, d), "cls.predictions.transform.dense.bias": r(d),
           "cls.predictions.transform.LayerNorm.weight": 1 + r(d), "cls.predictions.transform.LayerNorm.bias": r(d),
           "cls.predictions.decoder.weight": sd["bert.embeddings.word_embeddings.weight"],
           "cls.predictions.decoder.bias": r(c["vocab_size"])}
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}


def m2_reference(sd: dict, c: dict, ids: torch.Tensor, dtype=torch.float64) -> torch.Tensor:
    """m2's BertForMaskedLM logits (float64 unless ``dtype``), written from its bert_layers.py / hyena_utils.py
    equations."""
    sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
    d, inner, eps = c["hidden_size"], c["intermediate_size"], c["layer_norm_eps"]
    seqlen = ids.shape[1]

    def ln(x, prefix, eps=eps):
        return F.layer_norm(x, (d,), sd[prefix + "weight"], sd[prefix + "bias"], eps)

    def blockdiag(x, weight):
        if weight.dim() == 2:
            return x @ weight.t()
        nb = weight.shape[0]
        y = torch.einsum("...kp,kqp->...kq", x.reshape(*x.shape[:-1], nb, -1), weight)
        return y.reshape(*x.shape[:-1], -1)

    def implicit(prefix, bank):
        z, t = sd[prefix + "pos_emb.z"][:, :seqlen], sd[prefix + "pos_emb.t"][:, :seqlen]
        h = z
        for j in (0, 2, 4):
            h = F.linear(h, sd[f"{prefix}{bank}.{j}.weight"], sd[f"{prefix}{bank}.{j}.bias"])
            h = torch.sin(c["hyena_w_mod"] * sd[f"{prefix}{bank}.{j + 1}.freq"] * h)
        h = F.linear(h, sd[f"{prefix}{bank}.6.weight"])
        h = h * torch.exp(-t * sd[prefix + "modulation.deltas"].abs())
        return h[0].t()                                                     # (d, L)

    def long_conv(u, prefix):                                               # u (B, d, L)
        k_fwd, k_rev = implicit(prefix, "implicit_filter"), implicit(prefix, "implicit_filter_rev")
        k = F.pad(k_fwd, (0, seqlen)) + F.pad(k_rev.flip(-1), (seqlen, 0))
        n = 2 * seqlen
        y = torch.fft.irfft(torch.fft.rfft(u, n=n) * (torch.fft.rfft(k, n=n) / n), n=n, norm="forward")[..., :seqlen]
        return y + u * sd[prefix + "bias"][None, :, None]

    x = sd["bert.embeddings.word_embeddings.weight"][ids] + sd["bert.embeddings.token_type_embeddings.weight"][0]
    if c["use_positional_encodings"]:
        x = x + sd["bert.embeddings.position_embeddings.weight"][:seqlen]
    x = ln(x, "bert.embeddings.LayerNorm.")
    for i in range(c["num_hidden_layers"]):
        p = f"bert.encoder.layer.{i}."
        u = x
        streams = F.linear(u, sd[p + "attention.in_linear.weight"], sd[p + "attention.in_linear.bias"]).transpose(1, 2)
        streams = F.conv1d(streams, sd[p + "attention.short_filter.weight"], sd[p + "attention.short_filter.bias"],
                           padding=2, groups=3 * d)[..., :seqlen]
        x1, x2, v = streams.split(d, dim=1)
        y = long_conv(v * x1, p + "attention.filter_fn.") * x2
        if c["residual_long_conv"]:
            y = y + long_conv(u.transpose(1, 2), p + "attention.filter_fn2.")
        h = F.linear(y.transpose(1, 2), sd[p + "attention.out_linear.weight"], sd[p + "attention.out_linear.bias"])
        g = blockdiag(h, sd[p + "mlp.gated_layers.weight"])
        a = F.gelu(g[..., :inner]) * g[..., inner:]
        o = blockdiag(a, sd[p + "mlp.wo.weight"]) + sd[p + "mlp.wo.bias"]
        x = ln(o + h, p + "mlp.layernorm.")
    h = F.gelu(F.linear(x, sd["cls.predictions.transform.dense.weight"], sd["cls.predictions.transform.dense.bias"]))
    h = ln(h, "cls.predictions.transform.LayerNorm.", 1e-12)
    return F.linear(h, sd["cls.predictions.decoder.weight"], sd["cls.predictions.decoder.bias"])


def m2_folder(path, config: dict, sd: dict):
    path.mkdir()
    (path / "config.json").write_text(json.dumps(config))
    torch.save(sd, path / "pytorch_model.bin")
    return path


@pytest.mark.parametrize("case", range(len(M2_CASES)), ids=["monarch-mlp", "dense-mlp-wmod-nopos"])
def test_m2_checkpoint_loads_into_subq(tmp_path, case):
    torch.manual_seed(5 + case)
    c = M2_CASES[case]
    sd = m2_state_dict(c)
    ours = M2BertForMaskedLM.from_pretrained(m2_folder(tmp_path / "m2", c, sd)).eval()
    assert ours.config.mixer_residual is False and ours.config.learned_filter_features
    # a few tensors at known places
    layer = ours.bert.encoder.layers[1]
    assert torch.equal(layer.mixer.filter.rev.mlp[4].bias,
                       sd["bert.encoder.layer.1.attention.filter_fn.implicit_filter_rev.4.bias"])
    assert torch.equal(layer.mixer.in_proj.weight, sd["bert.encoder.layer.1.attention.in_linear.weight"])
    assert torch.equal(layer.mixer.D, sd["bert.encoder.layer.1.attention.filter_fn.bias"])
    assert torch.equal(layer.mlp.out_proj.bias, sd["bert.encoder.layer.1.mlp.wo.bias"])
    assert ours.decoder.weight is ours.bert.word_embeddings.weight
    ids = torch.randint(0, c["vocab_size"], (2, 29))
    # subq's own format keeps the learned features and the loaded decay rates
    ours.save_pretrained(tmp_path / "subq")
    again = M2BertForMaskedLM.from_pretrained(tmp_path / "subq").eval()
    with torch.no_grad():
        expected = m2_reference(sd, c, ids)
        assert rel_err(ours(ids).logits, expected) <= 1e-10
        assert rel_err(again(ids).logits, expected) <= 1e-10
        # float32: the error budget of m2's own code run in float32 (the sine filters amplify rounding)
        budget = rel_err(m2_reference(sd, c, ids, torch.float32), expected)
        assert rel_err(ours.float()(ids).logits, expected) <= 2 * budget + 1e-6


def test_m2_round_trip_is_identity(tmp_path):
    torch.manual_seed(7)
    sd = m2_state_dict(M2_SMALL)
    ours = M2BertForMaskedLM.from_pretrained(m2_folder(tmp_path / "m2", M2_SMALL, sd))
    out = ours.save_pretrained(tmp_path / "back", format="m2")
    back = torch.load(out / "pytorch_model.bin", weights_only=True)
    assert back.keys() == sd.keys() - {"bert.embeddings.position_ids"}
    for key, tensor in back.items():
        assert torch.equal(tensor, sd[key]), key
    config = json.loads((out / "config.json").read_text())
    assert {k: config[k] for k in config if k in M2_SMALL} == {k: M2_SMALL[k] for k in config if k in M2_SMALL}


def test_m2_options_without_subq_equivalent(tmp_path):
    sd = m2_state_dict(M2_SMALL)
    for i, (change, fragment) in enumerate([
        ({"monarch_mixer_sequence_mixing": False}, "monarch_mixer_sequence_mixing=False"),
        ({"use_glu_mlp": False}, "use_glu_mlp=False"),
        ({"bidirectional": False}, "bidirectional=False"),
        ({"hyena_training_additions": True}, "hyena_training_additions=True"),
        ({"hidden_act": "relu"}, "hidden_act='relu'"),
        ({"layer_norm_eps": 1e-5}, "layer_norm_eps=1e-05"),
        ({"max_position_embeddings": 64}, "max_position_embeddings=64"),
        ({"intermediate_size": 40}, "intermediate_size=40"),
    ]):
        path = m2_folder(tmp_path / f"bad{i}", {**M2_SMALL, **change}, sd)
        with pytest.raises(CheckpointError, match=re.escape(fragment)) as info:
            M2BertForMaskedLM.from_pretrained(path)
        assert str(path / "config.json") in str(info.value)
    broken = dict(sd)
    broken["bert.encoder.layer.0.attention.filter_fn.pos_emb.z"] = torch.zeros(1, 32, 7, dtype=torch.float64)
    path = m2_folder(tmp_path / "shape", M2_SMALL, broken)
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin.*m2.*'bert\.encoder\.layer\.0\.attention\."
                                              r"filter_fn\.pos_emb\.z' has shape \(32, 7\)"):
        M2BertForMaskedLM.from_pretrained(path)
    missing = {k: v for k, v in sd.items() if k != "bert.encoder.layer.1.mlp.wo.bias"}
    with pytest.raises(CheckpointError, match=r"missing key 'bert\.encoder\.layer\.1\.mlp\.wo\.bias'"):
        M2BertForMaskedLM.from_pretrained(m2_folder(tmp_path / "missing", M2_SMALL, missing))
    with pytest.raises(ValueError, match="mixer_residual=True"):
        M2BertForMaskedLM.from_preset("tiny").save_pretrained(tmp_path / "x", format="m2")
