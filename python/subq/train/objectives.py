"""What a model learns to predict from a batch of token blocks: the next token (causal LM) or the masked-out
tokens (BERT's masked LM). Each objective turns blocks into ``(inputs, labels)``, labels -100 where no loss is
taken (``torch.nn.functional.cross_entropy``'s ``ignore_index``)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from subq.train.corpus import MASK_ID, VOCAB_SIZE

IGNORE_INDEX = -100
MASK_PROB = 0.15
# BERT's split of the chosen positions: 80% become [MASK], 10% a random token, 10% stay, so the model cannot
# rely on seeing [MASK] exactly where a prediction is asked for (Devlin et al., 2019, section 3.1).
REPLACE_MASK, REPLACE_RANDOM = 0.8, 0.1


def next_token(blocks: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal LM: position t is trained to predict token t + 1 (a block holds one token past the inputs)."""
    blocks = blocks.long()
    return blocks[:, :-1], blocks[:, 1:]


def mask_tokens(blocks: torch.Tensor, generator: torch.Generator | None = None, mask_prob: float = MASK_PROB,
                mask_id: int = MASK_ID, vocab_size: int = VOCAB_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked LM: ``round(mask_prob * seqlen)`` positions (at least one) per row are chosen, the 80/10/10 rule is
    applied to them, and only they carry labels (the original tokens)."""
    ids = blocks.long()
    batch, seqlen = ids.shape
    # A fixed count per row rather than a coin per token, so a short row never ends up with no target at all.
    count = max(1, round(mask_prob * seqlen))
    chosen_pos = torch.rand(batch, seqlen, generator=generator).argsort(dim=1)[:, :count]
    chosen = torch.zeros_like(ids, dtype=torch.bool).scatter_(1, chosen_pos, True)
    roll = torch.rand(batch, seqlen, generator=generator)
    random_ids = torch.randint(vocab_size, (batch, seqlen), generator=generator)
    inputs = torch.where(chosen & (roll < REPLACE_MASK), mask_id, ids)
    inputs = torch.where(chosen & (roll >= REPLACE_MASK) & (roll < REPLACE_MASK + REPLACE_RANDOM), random_ids, inputs)
    return inputs, torch.where(chosen, ids, IGNORE_INDEX)


@dataclass(frozen=True)
class Objective:
    extra_tokens: int  # tokens a block holds beyond the model's sequence length
    make_batch: Callable[[torch.Tensor, torch.Generator], tuple[torch.Tensor, torch.Tensor]]


OBJECTIVES = {
    "causal": Objective(extra_tokens=1, make_batch=next_token),
    "masked": Objective(extra_tokens=0, make_batch=mask_tokens),
}
