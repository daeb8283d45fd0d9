"""``--generate N``: a sample from a trained causal model, to read what it learnt."""

from __future__ import annotations

import torch
from torch import nn

from subq.train.corpus import decode, encode

TEMPERATURE = 0.8  # a little below 1: fewer misspelt words than plain sampling, less looping than greedy


@torch.no_grad()
def sample(model: nn.Module, prompt: str, new_tokens: int, seed: int, device: torch.device) -> str:
    model.eval()
    ids = encode(prompt).long()[None].to(device)
    generator = torch.Generator(device=device).manual_seed(seed)
    return decode(model.generate(ids, new_tokens, temperature=TEMPERATURE, generator=generator)[0])
