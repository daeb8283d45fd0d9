"""subq.models M2-BERT (masked LM), M2-ViT and M2-GPT on their tiny presets: forward/backward, the direction of
information flow, decoding from cached state, save/load, and the paper sizes' parameter counts."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import max_err
from subq.models import M2GPT, M2BertForMaskedLM, M2BertModel, M2ViT

F64 = torch.float64
VOCAB = 256  # the tiny presets' (byte-level, as subq.train's corpus)


def param_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # a tied weight counts once


def assert_all_grads_finite(model: torch.nn.Module) -> None:
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def mlm_batch(batch: int, seqlen: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, VOCAB, (batch, seqlen))
    labels = torch.full_like(ids, -100)
    picked = torch.rand(batch, seqlen) < 0.3
    picked[:, 0] = True
    labels[picked] = ids[picked]
    return ids, labels


@pytest.mark.parametrize("mixer_residual", [True, False], ids=["post-norm", "hazy-layout"])
def test_bert_mlm_forward_backward(mixer_residual):
    model = M2BertForMaskedLM.from_preset("tiny", mixer_residual=mixer_residual)
    ids, labels = mlm_batch(2, 50)
    token_types = (torch.arange(50) >= 20).long().expand(2, 50)
    logits, loss = model(ids, labels=labels, token_type_ids=token_types)
    assert logits.shape == (2, 50, VOCAB)
    picked = labels != -100
    assert torch.allclose(loss, F.cross_entropy(logits[picked], labels[picked]))
    loss.backward()
    assert_all_grads_finite(model)
    assert model.decoder.weight is model.bert.word_embeddings.weight
    out = model(ids)
    assert out.loss is None and out.logits.shape == (2, 50, VOCAB)


def test_vit_forward_backward():
    model = M2ViT.from_preset("tiny")
    images = torch.randn(3, 3, 32, 32)
    logits = model(images)
    assert logits.shape == (3, 10)
    F.cross_entropy(logits, torch.tensor([1, 4, 9])).backward()
    assert_all_grads_finite(model)


def test_gpt_forward_backward():
    model = M2GPT.from_preset("tiny")
    ids = torch.randint(0, VOCAB, (2, 60))
    logits = model(ids)
    assert logits.shape == (2, 60, VOCAB)
    F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1)).backward()
    assert_all_grads_finite(model)


@pytest.mark.parametrize("model_cls, name, size", [
    (M2BertForMaskedLM, "80m", 80e6), (M2BertForMaskedLM, "110m", 110e6), (M2GPT, "360m", 360e6),
])
def test_paper_sizes_parameter_counts(model_cls, name, size):
    with torch.device("meta"):
        model = model_cls.from_preset(name)
    assert abs(param_count(model) - size) <= 0.1 * size


def test_bert_sees_both_directions_and_gpt_only_the_past():
    """Change the token at t: M2-BERT's outputs before t move, M2-GPT's do not (up to float64 FFT round-off)."""
    t = 30
    ids = torch.randint(0, VOCAB, (2, 50))
    changed = ids.clone()
    changed[:, t] = (changed[:, t] + 1) % VOCAB
    bert = M2BertModel.from_preset("tiny").to(F64).eval()
    h, h2 = bert(ids), bert(changed)
    assert max_err(h[:, :t], h2[:, :t]) > 1e-3 and max_err(h[:, t:], h2[:, t:]) > 1e-3
    gpt = M2GPT.from_preset("tiny").to(F64)
    y, y2 = gpt(ids), gpt(changed)
    assert max_err(y[:, :t], y2[:, :t]) < 1e-12 * y.abs().max().item()
    assert max_err(y[:, t:], y2[:, t:]) > 1e-3


def test_gpt_stepping_equals_forward():
    model = M2GPT.from_preset("tiny", n_layer=3).to(F64)
    ids = torch.randint(0, VOCAB, (2, 40))
    full = model(ids)
    caches = model.allocate_inference_cache(2, 40)
    prefix = [model(ids[:, :15], caches=caches), model(ids[:, 15:25], caches=caches)]
    steps = torch.stack([model.step(ids[:, t], caches) for t in range(25, 40)], dim=1)
    assert max_err(torch.cat([*prefix, steps], dim=1), full) < 1e-9


def test_gpt_greedy_generation_is_consistent():
    model = M2GPT.from_preset("tiny").to(F64)
    prompt = torch.randint(0, VOCAB, (2, 10))
    out = model.generate(prompt, max_new_tokens=8)
    assert out.shape == (2, 18) and torch.equal(out[:, :10], prompt)
    logits = model(out[:, :-1])
    assert torch.equal(logits[:, 9:].argmax(-1), out[:, 10:])
    generator = torch.Generator().manual_seed(0)
    sampled = model.generate(prompt, max_new_tokens=4, temperature=1.0, top_k=5, generator=generator)
    assert sampled.shape == (2, 14) and ((sampled >= 0) & (sampled < VOCAB)).all()


@pytest.mark.parametrize("model_cls", [M2BertForMaskedLM, M2BertModel, M2ViT, M2GPT])
def test_save_load_round_trip(model_cls, tmp_path):
    model = model_cls.from_preset("tiny").eval()
    model.save_pretrained(tmp_path / "m")
    loaded = model_cls.from_pretrained(tmp_path / "m").eval()
    assert loaded.config == model.config
    x = torch.randn(2, 3, 32, 32) if model_cls is M2ViT else torch.randint(0, VOCAB, (2, 30))
    out, out_loaded = model(x), loaded(x)
    if model_cls is M2BertForMaskedLM:
        out, out_loaded = out.logits, out_loaded.logits
        assert loaded.decoder.weight is loaded.bert.word_embeddings.weight
    assert torch.equal(out, out_loaded)


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown preset"):
        M2BertForMaskedLM.from_preset("huge")
    bert = M2BertForMaskedLM.from_preset("tiny")
    with pytest.raises(ValueError, match="max_seq_len=64"):
        bert(torch.zeros(1, 65, dtype=torch.long))
    with pytest.raises(ValueError, match="labels must have input_ids' shape"):
        bert(torch.zeros(2, 8, dtype=torch.long), labels=torch.zeros(2, 7, dtype=torch.long))
    with pytest.raises(ValueError, match="token_type_ids must have"):
        bert(torch.zeros(2, 8, dtype=torch.long), token_type_ids=torch.zeros(8, dtype=torch.long))
    with pytest.raises(ValueError, match="images must be"):
        M2ViT.from_preset("tiny")(torch.randn(1, 3, 16, 16))
    with pytest.raises(ValueError, match="multiple of patch_size"):
        M2ViT.from_preset("tiny", image_size=30)
    gpt = M2GPT.from_preset("tiny")
    with pytest.raises(ValueError, match="max_seqlen must be in 1..max_seq_len=64"):
        gpt.generate(torch.zeros(1, 60, dtype=torch.long), max_new_tokens=5)
    with pytest.raises(ValueError, match="one cache per layer"):
        gpt(torch.zeros(1, 4, dtype=torch.long), caches=gpt.allocate_inference_cache(1, 8)[:1])
