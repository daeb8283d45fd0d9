"""The training text as token ids: the grammar's sentences, byte-level tokens, a train/val split and contiguous
fixed-length blocks. Nothing is downloaded or stored; the same seed gives the same corpus."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from subq.train.errors import TrainError
from subq.train.grammar import generate_text

VOCAB_SIZE = 256  # one token per byte
MASK_ID = 0  # the NUL byte, which the grammar never writes, stands for [MASK] in the masked-LM objective
VAL_FRACTION = 0.1


def encode(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8)


def decode(ids: list[int] | torch.Tensor) -> str:
    # 0xFF is never valid UTF-8, so ids past the byte range (models with larger vocabularies) show as U+FFFD.
    ids = ids.tolist() if isinstance(ids, torch.Tensor) else ids
    return bytes(i if 0 <= i < VOCAB_SIZE else 0xFF for i in ids).decode("utf-8", errors="replace")


def blocks(tokens: torch.Tensor, block_len: int) -> torch.Tensor:
    """``tokens`` cut into contiguous, non-overlapping rows of ``block_len``; the remainder is dropped."""
    n = tokens.numel() // block_len
    return tokens[: n * block_len].view(n, block_len)


@dataclass
class Corpus:
    train: torch.Tensor  # uint8 token ids
    val: torch.Tensor

    @classmethod
    def generate(cls, n_chars: int, seed: int) -> Corpus:
        tokens = encode(generate_text(n_chars, seed))
        split = int(tokens.numel() * (1 - VAL_FRACTION))
        return cls(tokens[:split], tokens[split:])

    def blocks(self, block_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(train, val) blocks of ``block_len`` tokens; an error when a split cannot fill one."""
        for name, tokens in (("train", self.train), ("val", self.val)):
            if tokens.numel() < block_len:
                raise TrainError(f"the {name} split has {tokens.numel()} tokens, fewer than one block of "
                                 f"{block_len}: raise --corpus-chars or lower --seq-len")
        return blocks(self.train, block_len), blocks(self.val, block_len)
