"""The checkpoint converters' round-trip table: for each format and direction, the largest logit error of the
loaded model and whether greedy generation gives the same tokens. Random small models (nothing downloaded).

    PYTHONPATH=python:tests python bench/convert_roundtrip.py      # table on stdout, JSON in bench/results/

Errors are max |a - b| / max |b| over the logits, against the float64 reference of the other project's equations
(float64 rows) or the other project's own model (float32 rows).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
import transformers

from subq.models import M2BertForMaskedLM, Mamba2LM, MoM
from test_checkpoint_convert import (
    M2_SMALL,
    full_hf_config,
    hf_mamba2,
    m2_folder,
    m2_reference,
    m2_state_dict,
    mamba2_reference,
    mamba_ssm_folder,
    rel_err,
)

RESULTS = Path(__file__).parent / "results" / "convert_roundtrip.json"


def row(fmt, direction, dtype, against, err, generation=None):
    return dict(format=fmt, direction=direction, dtype=str(dtype).removeprefix("torch."), against=against,
                max_rel_logit_err=err, generation_equal=generation)


def same_tensors(a: dict, b: dict) -> float:
    """Largest absolute difference over the tensors of two state dicts with the same keys (inf when the keys differ)."""
    if a.keys() != b.keys():
        return float("inf")
    return max((x.double() - y.double()).abs().max().item() for x, y in ((a[k], b[k]) for k in a))


@torch.no_grad()
def mamba2_rows(tmp: Path) -> list[dict]:
    rows = []
    ids = torch.randint(0, 67, (2, 23))
    prompt = ids[:, :6]
    # transformers -> subq
    hf64 = hf_mamba2(torch.float64)
    hf64.save_pretrained(tmp / "hf64")
    ours = Mamba2LM.from_pretrained(tmp / "hf64").eval()
    rows.append(row("hf", "hf -> subq", torch.float64, "float64 reference",
                    rel_err(ours(ids), mamba2_reference(hf64.state_dict(), full_hf_config(hf64), ids))))
    hf32 = hf_mamba2(torch.float32)
    hf32.save_pretrained(tmp / "hf32")
    ours = Mamba2LM.from_pretrained(tmp / "hf32").eval()
    rows.append(row("hf", "hf -> subq", torch.float32, "transformers Mamba2ForCausalLM",
                    rel_err(ours(ids), hf32(ids).logits),
                    torch.equal(ours.generate(prompt, 16), hf32.generate(prompt, max_new_tokens=16, do_sample=False))))
    # subq -> transformers
    for dtype in (torch.float64, torch.float32):
        ours = Mamba2LM.from_preset("tiny", vocab_size=67, ngroups=2, chunk_size=64).to(dtype).eval()
        for param in ours.parameters():
            param.add_(0.2 * torch.randn_like(param))
        path = ours.save_pretrained(tmp / f"out-{dtype}", format="hf")
        theirs = transformers.Mamba2ForCausalLM.from_pretrained(path, dtype=dtype).eval()
        if dtype == torch.float64:
            rows.append(row("hf", "subq -> hf", dtype, "float64 reference on the tensors transformers loaded",
                            rel_err(ours(ids), mamba2_reference(theirs.state_dict(), full_hf_config(theirs), ids))))
        else:
            rows.append(row("hf", "subq -> hf", dtype, "transformers Mamba2ForCausalLM",
                            rel_err(theirs(ids).logits, ours(ids)),
                            torch.equal(theirs.generate(prompt, max_new_tokens=16, do_sample=False),
                                        ours.generate(prompt, 16))))
    # mamba_ssm -> subq -> mamba_ssm
    hf = hf_mamba2(torch.float64, vocab_size=64, tie_word_embeddings=True)
    folder = mamba_ssm_folder(tmp / "ms", hf, vocab_size=61, pad_multiple=8)
    ours = Mamba2LM.from_pretrained(folder).eval()
    rows.append(row("mamba_ssm", "mamba_ssm -> subq", torch.float64, "float64 reference",
                    rel_err(ours(ids % 61), mamba2_reference(hf.state_dict(), full_hf_config(hf), ids % 61))))
    hf32 = hf.float()
    ours32 = Mamba2LM.from_pretrained(folder).float().eval()
    rows.append(row("mamba_ssm", "mamba_ssm -> subq", torch.float32, "transformers on the same tensors",
                    rel_err(ours32(ids % 61), hf32(ids % 61).logits),
                    torch.equal(ours32.generate(prompt % 61, 16),
                                hf32.generate(prompt % 61, max_new_tokens=16, do_sample=False))))
    back = ours.save_pretrained(tmp / "ms-back", format="mamba_ssm")
    rows.append(row("mamba_ssm", "subq -> mamba_ssm", torch.float64,
                    "largest abs. tensor difference vs the original file",
                    same_tensors(torch.load(back / "pytorch_model.bin", weights_only=True),
                                 torch.load(folder / "pytorch_model.bin", weights_only=True))))
    return rows


@torch.no_grad()
def m2_rows(tmp: Path) -> list[dict]:
    sd = m2_state_dict(M2_SMALL)
    ours = M2BertForMaskedLM.from_pretrained(m2_folder(tmp / "m2", M2_SMALL, sd)).eval()
    ids = torch.randint(0, M2_SMALL["vocab_size"], (2, 29))
    expected = m2_reference(sd, M2_SMALL, ids)
    rows = [row("m2", "m2 -> subq", torch.float64, "float64 reference (m2's equations and names)",
                rel_err(ours(ids).logits, expected))]
    back = ours.save_pretrained(tmp / "m2-back", format="m2")
    saved = torch.load(back / "pytorch_model.bin", weights_only=True)
    rows.append(row("m2", "subq -> m2", torch.float64, "largest abs. tensor difference vs the original state dict",
                    same_tensors(saved, {k: v for k, v in sd.items() if k != "bert.embeddings.position_ids"})))
    rows.append(row("m2", "m2 -> subq", torch.float32, "float64 reference (m2's own code in float32: "
                    f"{rel_err(m2_reference(sd, M2_SMALL, ids, torch.float32), expected):.1e})",
                    rel_err(ours.float()(ids).logits, expected)))
    return rows


@torch.no_grad()
def mom_rows(tmp: Path) -> list[dict]:
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=32, n_layer=4, n_head=4, vocab_size=97,
                                                                n_positions=64))
    model = MoM.from_gpt2(gpt2, top_k=2, router_dim=16).eval()
    for param in model.attn_router.parameters():   # a router away from its initial values
        param.add_(0.3 * torch.randn_like(param))
    model.save_pretrained(tmp / "mom")
    loaded = MoM.from_pretrained(tmp / "mom").eval()
    ids = torch.randint(0, 97, (3, 30))
    a, b = model(ids), loaded(ids)
    return [row("subq (MoM)", "subq -> subq", torch.float32, f"the saved model; routes equal: "
                f"{torch.equal(a.route, b.route)}", rel_err(b.logits, a.logits),
                torch.equal(model.generate(ids[:, :4], 12), loaded.generate(ids[:, :4], 12)))]


def main() -> None:
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        rows = mamba2_rows(Path(tmp)) + m2_rows(Path(tmp)) + mom_rows(Path(tmp))
    print("| format | direction | dtype | against | max rel. logit error | greedy generation equal |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        gen = "" if r["generation_equal"] is None else ("yes" if r["generation_equal"] else "NO")
        print(f"| {r['format']} | {r['direction']} | {r['dtype']} | {r['against']} | {r['max_rel_logit_err']:.1e} "
              f"| {gen} |")
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps({"torch": torch.__version__, "transformers": transformers.__version__,
                                   "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
