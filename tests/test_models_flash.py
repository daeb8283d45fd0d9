"""subq.models.FlashLM (FLASH and FLASH-Quad): forward/backward and causality on the tiny preset, prefill and
token-by-token decoding against the full forward, generation, save/load, preset sizes, bad configs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import max_err
from subq.models import FlashLM, FlashLMConfig
from test_flash_nn import randomize

KINDS = ["flash", "flash-quad"]
VOCAB = 256  # the tiny preset's


def tiny(layer: str, dtype=torch.float64, **overrides) -> FlashLM:
    return FlashLM.from_preset("tiny", layer=layer, **overrides).to(dtype)


@pytest.mark.parametrize("layer", KINDS)
def test_forward_backward(layer):
    model = tiny(layer, torch.float32)
    ids = torch.randint(0, VOCAB, (2, 150))
    logits = model(ids)
    assert logits.shape == (2, 150, VOCAB)
    F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1)).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert model.lm_head.weight is model.embedding.weight


@pytest.mark.parametrize("layer", KINDS)
def test_causal(layer):
    """Changing token t leaves every earlier logit exactly as it was (positions 64.. share t's FLASH chunk)."""
    model = randomize(tiny(layer))
    ids = torch.randint(0, VOCAB, (1, 150))
    moved = ids.clone()
    moved[0, 90] = (ids[0, 90] + 1) % VOCAB
    with torch.no_grad():
        logits, logits_moved = model(ids), model(moved)
    assert torch.equal(logits[:, :90], logits_moved[:, :90]) and not torch.equal(logits[:, 90:], logits_moved[:, 90:])


@pytest.mark.parametrize("layer", KINDS)
@pytest.mark.parametrize("prefill", [0, 64, 100])
def test_stepping_equals_forward(layer, prefill):
    """A prefill of the first tokens (none, a whole chunk, a chunk and a half) then one step per token equals the
    full forward: the fixed 1/max_seq_len scales make every prefix's outputs final."""
    model = randomize(tiny(layer))
    ids = torch.randint(0, VOCAB, (2, 150))
    with torch.no_grad():
        full = model(ids)
        caches = model.allocate_inference_cache(2, 150)
        logits = [model(ids[:, :prefill], caches=caches)] if prefill else []
        logits += [model.step(ids[:, t], caches)[:, None] for t in range(prefill, 150)]
    assert max_err(torch.cat(logits, dim=1), full) < 1e-9 * max(1.0, full.abs().max().item())


@pytest.mark.parametrize("layer", KINDS)
def test_greedy_generation_is_consistent(layer):
    model = tiny(layer)
    prompt = torch.randint(0, VOCAB, (2, 10))
    out = model.generate(prompt, max_new_tokens=8)
    assert out.shape == (2, 18) and torch.equal(out[:, :10], prompt)
    with torch.no_grad():
        logits = model(out[:, :-1])
    assert torch.equal(logits[:, 9:].argmax(-1), out[:, 10:])


def test_sampling_is_reproducible():
    model = tiny("flash", torch.float32)
    prompt = torch.randint(0, VOCAB, (3, 5))
    runs = [model.generate(prompt, 6, temperature=1.0, top_k=10, generator=torch.Generator().manual_seed(7))
            for _ in range(2)]
    assert torch.equal(runs[0], runs[1]) and runs[0].shape == (3, 11)
    assert torch.equal(model.generate(prompt, 0), prompt)


@pytest.mark.parametrize("layer", KINDS)
def test_save_load_round_trip(tmp_path, layer):
    model = tiny(layer, torch.float32, norm="layernorm")
    model.save_pretrained(tmp_path / "m")
    loaded = FlashLM.from_pretrained(tmp_path / "m")
    ids = torch.randint(0, VOCAB, (1, 30))
    assert loaded.config == model.config
    assert torch.equal(model(ids), loaded(ids))
    assert loaded.lm_head.weight is loaded.embedding.weight


# The sizes stated in flash_lm.py's PRESETS comment.
STATED_PARAMS = {("110m", "flash"): 112.6e6, ("110m", "flash-quad"): 112.6e6}


@pytest.mark.parametrize("name,layer", list(STATED_PARAMS))
def test_preset_parameter_counts(name, layer):
    with torch.device("meta"):  # no memory, no init: instant even for the full size
        model = FlashLM.from_preset(name, layer=layer)
    count = sum(p.numel() for p in model.parameters())  # the tied embedding once
    assert abs(count - STATED_PARAMS[name, layer]) <= 0.1 * STATED_PARAMS[name, layer]
    assert len(model.layers) == 24 and model.layers[0].e == 2 * 768 and model.layers[0].s == 128


def test_bad_config():
    with pytest.raises(ValueError, match="unknown preset"):
        FlashLM.from_preset("huge")
    with pytest.raises(ValueError, match="layer must be one of \\('flash', 'flash-quad'\\), got 'mamba'"):
        FlashLMConfig(layer="mamba")
    for name in ("n_layer", "vocab_size", "max_seq_len"):
        with pytest.raises(ValueError, match=f"{name} must be a positive int, got 0"):
            FlashLMConfig(**{name: 0})
    with pytest.raises(ValueError, match="chunk_size must be one of"):
        FlashLM.from_preset("tiny", chunk_size=100)
    with pytest.raises(ValueError, match="norm must be one of"):
        FlashLM.from_preset("tiny", layer="flash-quad", norm="rmsnorm")
    with pytest.raises(ValueError, match="expansion must be a positive int"):
        FlashLM.from_preset("tiny", expansion=0)


@pytest.mark.parametrize("layer", KINDS)
def test_bad_arguments(layer):
    model = tiny(layer, torch.float32)
    with pytest.raises(ValueError, match="seqlen \\(257\\) exceeds max_seq_len \\(256\\)"):
        model(torch.zeros(1, 257, dtype=torch.long))
    with pytest.raises(ValueError, match="input_ids must be \\(batch, seqlen\\)"):
        model(torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="max_seqlen \\(260\\) exceeds max_seq_len \\(256\\)"):
        model.generate(torch.zeros(1, 250, dtype=torch.long), max_new_tokens=10)
    with pytest.raises(ValueError, match="prompt must be \\(batch, prompt_len\\) with prompt_len >= 1"):
        model.generate(torch.zeros(1, 0, dtype=torch.long), max_new_tokens=3)
