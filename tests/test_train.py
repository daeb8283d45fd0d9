"""python -m subq.train: the generated corpus, the two objectives, the schedule, --override, the CLI end to end
(causal with Mamba2LM, masked with a stand-in model defined here), exact resume, and bad requests."""

from __future__ import annotations

import collections
import json
import math
import shutil
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from subq.models import Mamba2Config, Mamba2LM
from subq.models._common import load_pretrained, preset, save_pretrained
from subq.train import checkpoint, memory
from subq.train.cli import main
from subq.train.config import TrainConfig
from subq.train.corpus import MASK_ID, VOCAB_SIZE, Corpus, blocks, decode, encode
from subq.train.grammar import generate_text
from subq.train.loop import MIN_LR_RATIO, lr_factor
from subq.train.objectives import IGNORE_INDEX, mask_tokens, next_token
from subq.train.overrides import parse_overrides
from subq.train.registry import MODELS, ModelEntry, build_model

# A few steps of the tiny presets on short blocks: each run takes about a second on a CPU.
SMALL = ["--batch-size", "2", "--seq-len", "32", "--corpus-chars", "20000", "--eval-batches", "2", "--warmup", "1",
         "--lr", "1e-2", "--no-progress"]


# ---- a masked LM stand-in: the real ones (M2-BERT) register themselves the same way --------------------------------


@dataclass
class TinyMaskedLMConfig:
    vocab_size: int = 256
    d_model: int = 32
    max_seqlen: int = 64
    dropout: float = 0.1  # so the resume test also covers the global RNG


class TinyMaskedLM(nn.Module):
    """Token and position embeddings, one bidirectional Transformer layer, an LM head; returns a dict with the
    logits and an auxiliary loss, as models with routers do."""

    config_class = TinyMaskedLMConfig

    def __init__(self, config: TinyMaskedLMConfig):
        super().__init__()
        self.config = config
        self.embedding = nn.Embedding(config.vocab_size, config.d_model)
        self.position = nn.Embedding(config.max_seqlen, config.d_model)
        self.layer = nn.TransformerEncoderLayer(config.d_model, nhead=2, dim_feedforward=2 * config.d_model,
                                                dropout=config.dropout, batch_first=True)
        self.head = nn.Linear(config.d_model, config.vocab_size)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> TinyMaskedLM:
        return cls(preset(TinyMaskedLMConfig, {"tiny": {}}, name, **overrides))

    def forward(self, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.embedding(input_ids) + self.position(torch.arange(input_ids.shape[1]))
        logits = self.head(self.layer(h))
        return {"logits": logits, "aux": 1e-3 * logits.pow(2).mean()}

    def save_pretrained(self, path):
        return save_pretrained(self, path)

    @classmethod
    def from_pretrained(cls, path, device="cpu") -> TinyMaskedLM:
        return load_pretrained(cls, path, device)


@pytest.fixture
def masked_model(monkeypatch):
    monkeypatch.setitem(MODELS, "tiny-mlm", ModelEntry(TinyMaskedLM, "masked", lambda out: (out["logits"], out["aux"])))
    return "tiny-mlm"


def run_cli(*argv) -> int:
    return main([str(a) for a in argv])


def history(out) -> dict:
    return json.loads((out / "history.json").read_text())


# ---- corpus --------------------------------------------------------------------------------------------------------


def test_corpus_is_deterministic_ascii_text():
    text = generate_text(5000, seed=3)
    assert len(text) >= 5000 and text == generate_text(5000, seed=3) and text != generate_text(5000, seed=4)
    assert text.isascii() and chr(MASK_ID) not in text
    assert decode(encode(text)) == text
    assert decode([72, 105, VOCAB_SIZE + 5]) == "Hi\ufffd"  # ids past the bytes of a larger vocabulary
    corpus = Corpus.generate(5000, seed=3)
    assert torch.equal(torch.cat([corpus.train, corpus.val]), encode(text))
    assert 0.05 < corpus.val.numel() / encode(text).numel() < 0.15


def test_corpus_is_learnable():
    """A byte trigram model counted on the train split predicts the val split in well under half the unigram
    entropy: the sentences repeat a structure a model can pick up quickly."""
    corpus = Corpus.generate(200_000, seed=0)
    train, val = corpus.train.tolist(), corpus.val.tolist()

    def cross_entropy_bits(order: int) -> float:
        contexts, counts = collections.Counter(), collections.Counter()
        for i in range(order, len(train)):
            contexts[tuple(train[i - order:i])] += 1
            counts[tuple(train[i - order:i + 1])] += 1
        bits = [-math.log2((counts[tuple(val[i - order:i + 1])] + 0.01) / (contexts[tuple(val[i - order:i])] + 2.56))
                for i in range(order, len(val))]
        return sum(bits) / len(bits)

    unigram, trigram = cross_entropy_bits(0), cross_entropy_bits(2)
    assert 3.5 < unigram < 5  # bytes of a few dozen words, far from uniform's 8 bits
    assert trigram < 0.5 * unigram, (unigram, trigram)


def test_blocks_are_contiguous():
    tokens = torch.arange(103, dtype=torch.uint8)
    rows = blocks(tokens, 10)
    assert rows.shape == (10, 10) and torch.equal(rows.flatten(), tokens[:100])
    train, val = Corpus(tokens[:90], tokens[90:]).blocks(5)
    assert train.shape == (18, 5) and val.shape == (2, 5)
    with pytest.raises(ValueError, match="val split has 13 tokens, fewer than one block of 20"):
        Corpus(tokens[:90], tokens[90:]).blocks(20)


# ---- objectives, schedule, overrides ---------------------------------------------------------------------------------


def test_next_token_shifts_by_one():
    rows = torch.randint(1, 256, (3, 9), dtype=torch.uint8)
    inputs, labels = next_token(rows)
    assert torch.equal(inputs, rows[:, :-1].long()) and torch.equal(labels, rows[:, 1:].long())


def test_masking_statistics():
    rows = torch.randint(1, 256, (128, 200), dtype=torch.uint8)  # no MASK_ID in the input
    inputs, labels = mask_tokens(rows, torch.Generator().manual_seed(0))
    ids = rows.long()
    chosen = labels != IGNORE_INDEX
    assert (chosen.sum(1) == 30).all()  # 15% of every row
    assert torch.equal(labels[chosen], ids[chosen])
    assert torch.equal(inputs[~chosen], ids[~chosen])
    n = chosen.sum().item()
    masked = (inputs[chosen] == MASK_ID).sum().item() / n
    kept = (inputs[chosen] == ids[chosen]).sum().item() / n
    replaced = 1 - masked - kept
    assert abs(masked - 0.8) < 0.025 and abs(kept - 0.1) < 0.02 and abs(replaced - 0.1) < 0.02, (masked, kept)
    again = mask_tokens(rows, torch.Generator().manual_seed(0))
    assert torch.equal(again[0], inputs) and torch.equal(again[1], labels)
    _, short = mask_tokens(rows[:, :3])
    assert ((short != IGNORE_INDEX).sum(1) == 1).all()  # never a row without a target


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    factors = [lr_factor(step, warmup=10, steps=100) for step in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[9:], factors[10:], strict=False))
    assert factors[-1] == pytest.approx(MIN_LR_RATIO, abs=1e-3)
    assert lr_factor(150, warmup=10, steps=100) == pytest.approx(MIN_LR_RATIO)


def test_overrides_are_typed_by_the_config():
    parsed = parse_overrides(Mamba2Config, ["d_model=128", "attn_layer_idx=(1, 3)", "norm_eps=1", "headdim = 32",
                                           "tie_embeddings=False"])
    assert parsed == {"d_model": 128, "attn_layer_idx": (1, 3), "norm_eps": 1.0, "headdim": 32,
                      "tie_embeddings": False}
    assert type(parsed["norm_eps"]) is float
    assert parse_overrides(Mamba2Config, ["attn_layer_idx=1"]) == {"attn_layer_idx": (1,)}
    for item, message in [("d_model", "expected KEY=VALUE"), ("=3", "expected KEY=VALUE"),
                          ("width=3", "Mamba2Config has no field 'width'"), ("d_model=abc", "d_model expects int"),
                          ("d_model=1.5", "d_model expects int"), ("d_model=True", "d_model expects int"),
                          ("tie_embeddings=1", "tie_embeddings expects bool")]:
        with pytest.raises(ValueError, match=message):
            parse_overrides(Mamba2Config, [item])


# ---- the CLI end to end ----------------------------------------------------------------------------------------------


def test_causal_run_writes_checkpoints_history_plot_and_a_sample(tmp_path, capsys):
    out = tmp_path / "run"
    assert run_cli("--model", "mamba2", "--steps", 4, "--eval-every", 2, "--save-every", 2, "--generate", 12,
                   "--out", out, *SMALL) == 0
    printed = capsys.readouterr().out
    assert "sample: 'The" in printed and "done: mamba2 (tiny) step 4" in printed
    for step in (2, 4):
        folder = out / "checkpoints" / f"step_{step:07d}"
        assert {p.name for p in folder.iterdir()} == {"config.json", "model.safetensors", "trainer.pt"}
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = history(out)
    assert [r["step"] for r in saved["train"]] == [1, 2, 3, 4]
    assert [r["step"] for r in saved["val"]] == [0, 2, 4]
    assert saved["val"][-1]["ppl"] == pytest.approx(math.exp(saved["val"][-1]["loss"]))
    assert saved["config"]["model"] == "mamba2" and saved["config"]["steps"] == 4
    assert saved["val"][-1]["loss"] < saved["val"][0]["loss"]
    model = Mamba2LM.from_pretrained(out / "checkpoints" / "step_0000004")
    assert model.config == Mamba2LM.from_preset("tiny").config


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_registered_model_trains_saves_and_reloads(tmp_path, capsys, name):
    out = tmp_path / name
    entry = MODELS[name]
    sample = ["--generate", 8] if entry.objective == "causal" else []
    assert run_cli("--model", name, "--steps", 3, "--eval-every", 3, "--out", out, *sample, *SMALL) == 0
    assert f"done: {name} (tiny) step 3" in capsys.readouterr().out
    saved = history(out)
    assert all(math.isfinite(r["loss"]) for r in saved["train"] + saved["val"])
    model = entry.model_class.from_pretrained(out / "checkpoints" / "step_0000003")
    assert all(getattr(model.config, k) == v for k, v in entry.config.items())


def test_masked_run_with_a_stand_in_model(tmp_path, masked_model):
    out = tmp_path / "run"
    assert run_cli("--model", masked_model, "--steps", 4, "--eval-every", 2, "--out", out, *SMALL) == 0
    saved = history(out)
    assert all("aux_loss" in r for r in saved["train"])
    assert saved["val"][-1]["loss"] < saved["val"][0]["loss"]
    assert (out / "checkpoints" / "step_0000004" / "trainer.pt").is_file() and (out / "loss.png").is_file()


@pytest.mark.parametrize("model", ["mamba2", "masked"])
def test_resume_continues_exactly(tmp_path, model, masked_model):
    name = masked_model if model == "masked" else model
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    assert run_cli("--model", name, "--steps", 4, "--eval-every", 2, "--save-every", 2, "--out", whole, *SMALL) == 0
    assert run_cli("--resume", whole / "checkpoints" / "step_0000002", "--out", resumed, "--no-progress") == 0
    assert history(resumed) == history(whole)
    final = "checkpoints/step_0000004/model.safetensors"
    a, b = load_file(whole / final), load_file(resumed / final)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_from_an_output_folder_trains_longer(tmp_path, capsys):
    out = tmp_path / "run"
    assert run_cli("--steps", 2, "--eval-every", 2, "--out", out, *SMALL) == 0
    assert checkpoint.find(out) == out / "checkpoints" / "step_0000002"
    assert run_cli("--resume", "--out", out, "--steps", 3, "--no-progress") == 0
    assert "resuming" in capsys.readouterr().out
    assert [r["step"] for r in history(out)["train"]] == [1, 2, 3]
    assert checkpoint.find(out) == out / "checkpoints" / "step_0000003"


# ---- bad requests: one line on stderr, exit status 2 ----------------------------------------------------------------


@pytest.mark.parametrize("argv, message", [
    (["--model", "gpt5"], "unknown model 'gpt5'; known models: flash, flash-quad, m2-bert, m2-gpt, mamba2, mom"),
    (["--preset", "huge"], "unknown preset 'huge' for Mamba2Config"),
    (["--override", "d_model"], "--override 'd_model': expected KEY=VALUE"),
    (["--override", "width=3"], "Mamba2Config has no field 'width'"),
    (["--override", "d_model=big"], "d_model expects int, got 'big'"),
    (["--override", "headdim=48"], "must be a multiple of headdim"),
    (["--override", "vocab_size=100"], "vocab_size 100 is smaller than the byte-level tokenizer's 256"),
    (["--steps", "0"], "--steps must be positive, got 0"),
    (["--lr", "fast"], "argument --lr: invalid float value: 'fast'"),
    (["--seq-len", "5000"], "fewer than one block of 5001: raise --corpus-chars or lower --seq-len"),
    (["--device", "tpu"], "--device 'tpu': expected auto, cpu, cuda or cuda:N"),
    (["--generate", "5", "--model", "tiny-mlm"], "tiny-mlm is a masked model without generation"),
    (["--resume"], "not a checkpoint (no trainer.pt) nor an output folder holding any"),
    # found by an outside fuzz: tracebacks, some only at the first forward after the corpus was built
    (["--lr", "nan"], "--lr must be positive, got nan"),
    (["--grad-clip", "inf"], "--grad-clip must be a finite number, got inf"),
    (["--override", "d_model=-1"], "d_model must be a positive int, got -1"),
    (["--override", "chunk_size=100"], "chunk_size must be one of (64, 128, 256), got 100"),
    (["--override", "d_state=100000"], "d_state must be at most 256"),
    (["--model", "m2-gpt", "--seq-len", "128"], "--seq-len 128 is longer than m2-gpt (tiny)'s max_seq_len 64"),
    (["--model", "flash", "--seq-len", "300"], "--seq-len 300 is longer than flash (tiny)'s max_seq_len 256"),
    (["--model", "mom", "--seq-len", "200"], "--seq-len 200 is longer than mom (tiny)'s n_positions 128"),
    # silently accepted
    (["--override", "attn_layer_idx=(5,)"], "attn_layer_idx's entries (layers of n_layer = 2) must be an int in"),
    (["--override", "attn_layer_idx=abc"], "attn_layer_idx expects a tuple of int, got 'abc'"),
    (["--override", "n_layer=0"], "n_layer must be a positive int, got 0"),
    (["--override", "tie_embeddings=1"], "tie_embeddings expects bool"),
    # memory: an allocator failure after 34 s, or an OOM kill after 265 s
    (["--batch-size", "10000000"], "GiB activations for --batch-size 10000000 x --seq-len 128), more than the"),
    (["--preset", "130m", "--batch-size", "100000"], "GiB parameters and optimizer state"),
])
def test_bad_arguments(tmp_path, capsys, masked_model, argv, message):
    assert run_cli("--out", tmp_path / "run", "--steps", 2, "--corpus-chars", "5000", "--no-progress", *argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("subq.train: error: ") and message in err and err.count("\n") == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given without a CUDA device")
def test_cuda_without_a_device_errors(tmp_path, capsys):
    assert run_cli("--device", "cuda", "--out", tmp_path, "--no-progress") == 2
    assert "no CUDA device is available here" in capsys.readouterr().err


def test_bad_resumes(tmp_path, capsys):
    out = tmp_path / "run"
    assert run_cli("--steps", 2, "--eval-every", 2, "--out", out, *SMALL) == 0
    capsys.readouterr()
    assert run_cli("--steps", 2, "--out", out, *SMALL) == 2
    assert "already holds checkpoints: add --resume" in capsys.readouterr().err
    assert run_cli("--resume", "--out", out, "--no-progress") == 2
    assert "is at step 2, --steps is 2: nothing to train" in capsys.readouterr().err
    assert run_cli("--resume", "--out", out, "--steps", 4, "--lr", 0.5) == 2
    assert "--lr 0.5 differs from the checkpoint's 0.01: a resumed run can change only --steps" in \
        capsys.readouterr().err


def test_resume_never_overwrites_a_later_checkpoint(tmp_path, capsys):
    """Resuming an earlier checkpoint in place once rewrote the later ones without a word."""
    out = tmp_path / "run"
    assert run_cli("--steps", 4, "--eval-every", 2, "--save-every", 1, "--out", out, *SMALL) == 0
    later = {step: load_file(out / f"checkpoints/step_{step:07d}/model.safetensors") for step in (3, 4)}
    capsys.readouterr()
    assert run_cli("--resume", out / "checkpoints" / "step_0000002", "--steps", 6, "--no-progress") == 2
    err = capsys.readouterr().err
    assert "is at step 2, but" in err and "later checkpoints (step_0000003, step_0000004) that this run would " \
        "overwrite: resume from the latest" in err and "or branch into a new folder with --out" in err
    for step, weights in later.items():
        now = load_file(out / f"checkpoints/step_{step:07d}/model.safetensors")
        assert all(torch.equal(weights[k], now[k]) for k in weights)
    branch = tmp_path / "branch"
    assert run_cli("--resume", out / "checkpoints" / "step_0000002", "--steps", 3, "--out", branch,
                   "--no-progress") == 0
    assert [p.name for p in checkpoint.listed(branch)] == ["step_0000003"]


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _rename_model(path):
    path.write_text(path.read_text().replace('"model": "Mamba2LM"', '"model": "FlashLM"'))


DAMAGES = {
    "trainer.pt truncated": ("trainer.pt", _truncate, "trainer.pt does not load"),
    "trainer.pt empty": ("trainer.pt", lambda p: p.write_bytes(b""), "trainer.pt does not load"),
    "trainer.pt garbage": ("trainer.pt", lambda p: p.write_bytes(b"not a checkpoint" * 10), "trainer.pt does not load"),
    "trainer.pt missing": ("trainer.pt", lambda p: p.unlink(), "trainer.pt is missing"),
    "weights truncated": ("model.safetensors", _truncate, "model.safetensors does not load"),
    "weights missing": ("model.safetensors", lambda p: p.unlink(), "model.safetensors is missing"),
    "config unparsable": ("config.json", lambda p: p.write_text("{d_model: 64"), "config.json is not valid JSON"),
    "config names another model": ("config.json", _rename_model, "config.json names the model 'FlashLM', but "
                                                                 "trainer.pt trained a Mamba2LM"),
}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("finished") / "run"
    assert run_cli("--steps", 4, "--eval-every", 2, "--save-every", 2, "--out", out, *SMALL) == 0
    return out


@pytest.mark.parametrize("damage", DAMAGES, ids=list(DAMAGES))
def test_resume_onto_a_damaged_checkpoint(tmp_path, capsys, finished_run, damage):
    """Once a traceback for each: now the damaged file, and the newest intact checkpoint to resume instead."""
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    file, spoil, message = DAMAGES[damage]
    spoil(out / "checkpoints" / "step_0000004" / file)
    capsys.readouterr()
    assert run_cli("--resume", "--out", out, "--steps", 6, "--no-progress") == 2
    err = capsys.readouterr().err
    intact = out / "checkpoints" / "step_0000002"
    assert err.count("\n") == 1 and "step_0000004: damaged checkpoint: " + message in err
    assert f"the newest intact checkpoint there is {intact} (--resume {intact})" in err


@pytest.mark.parametrize("name", sorted(MODELS))
def test_memory_estimate_is_near_what_autograd_keeps(name):
    """The activation estimate against the bytes autograd actually saves for the backward of the tiny preset."""
    config = TrainConfig(model=name, batch_size=2, seq_len=32)
    model = build_model(name, "tiny", [])
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel() * t.element_size()) or t,
                                                  lambda t: t):
        logits, _ = MODELS[name].outputs(model(torch.zeros(2, 32, dtype=torch.long)))
        F.cross_entropy(logits.float().flatten(0, 1), torch.zeros(64, dtype=torch.long))
    parameters, activations = memory.estimate_bytes(model, config)
    assert parameters == 16 * sum(p.numel() for p in model.parameters())
    assert sum(saved) / 2 < activations < 2 * sum(saved)
