"""Every model trains under bfloat16 autocast (as subq.train does on CUDA): float32 parameters meet bfloat16
activations inside the subq ops, which must cast like torch.matmul instead of rejecting mixed dtypes."""

from __future__ import annotations

import pytest
import torch

from subq import models

MODELS = {
    "mamba2": lambda: models.Mamba2LM.from_preset("tiny", attn_layer_idx=(1,)),
    "m2_gpt": lambda: models.M2GPT.from_preset("tiny"),
    "m2_bert": lambda: models.M2BertForMaskedLM.from_preset("tiny"),
    "flash": lambda: models.FlashLM.from_preset("tiny", layer="flash"),
    "flash_quad": lambda: models.FlashLM.from_preset("tiny", layer="flash-quad"),
    "mom": lambda: models.MoM.from_preset("tiny"),
}


def logits_of(output) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output.logits


@pytest.mark.parametrize("name", sorted(MODELS))
def test_forward_backward_under_bf16_autocast(name):
    model = MODELS[name]()
    ids = torch.randint(0, 256, (2, 48))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = logits_of(model(ids))
    assert logits.dtype == torch.bfloat16
    assert torch.isfinite(logits).all()
    logits.float().logsumexp(-1).mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
