"""subq.models.Mamba2LM: forward/backward on the tiny preset, generation from cached state, save/load."""

from __future__ import annotations

import pytest
import torch

from conftest import max_err
from subq.models import Mamba2LM


def tiny(dtype=torch.float64, **overrides) -> Mamba2LM:
    return Mamba2LM.from_preset("tiny", **overrides).to(dtype)


@pytest.mark.parametrize("attn_layer_idx", [(), (1,)])
def test_forward_backward(attn_layer_idx):
    model = tiny(torch.float32, attn_layer_idx=attn_layer_idx)
    ids = torch.randint(0, 256, (2, 70))
    logits = model(ids)
    assert logits.shape == (2, 70, 256)
    torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 256), ids[:, 1:].reshape(-1)).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("attn_layer_idx", [(), (0,)])
def test_stepping_equals_forward(attn_layer_idx):
    model = tiny(attn_layer_idx=attn_layer_idx, n_layer=3)
    ids = torch.randint(0, 256, (2, 40))
    full = model(ids)
    caches = model.allocate_inference_cache(2, 40)
    prefix = model(ids[:, :25], caches=caches)
    steps = torch.stack([model.step(ids[:, t], caches) for t in range(25, 40)], dim=1)
    assert max_err(torch.cat([prefix, steps], dim=1), full) < 1e-9


def test_greedy_generation_is_consistent():
    model = tiny(attn_layer_idx=(1,))
    prompt = torch.randint(0, 256, (2, 10))
    out = model.generate(prompt, max_new_tokens=8)
    assert out.shape == (2, 18) and torch.equal(out[:, :10], prompt)
    logits = model(out[:, :-1])
    assert torch.equal(logits[:, 9:].argmax(-1), out[:, 10:])


def test_save_load_round_trip(tmp_path):
    model = tiny(torch.float32, attn_layer_idx=(1,))
    model.save_pretrained(tmp_path / "m")
    loaded = Mamba2LM.from_pretrained(tmp_path / "m")
    ids = torch.randint(0, 256, (1, 30))
    assert torch.equal(model(ids), loaded(ids))
    assert loaded.config == model.config
    assert loaded.lm_head.weight is loaded.embedding.weight


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown preset"):
        Mamba2LM.from_preset("huge")
    model = tiny(attn_layer_idx=(1,))
    with pytest.raises(ValueError, match="seq_idx"):
        model(torch.zeros(1, 5, dtype=torch.long), seq_idx=torch.zeros(1, 5, dtype=torch.int32))
