"""The size axes the FLASH entries share (ops/flash.py, ops/gau.py, ops/flash_step.py): b ``batch``, L ``seqlen``,
S ``qk_dim``, E ``value_dim``, C ``chunk_size``, ``causal`` (0 or 1), t ``position``; and subq.ops.flash's limits
on them."""

from __future__ import annotations

from subq.ops.flash import CHUNK_SIZES, MAX_QK_DIM, MAX_VALUE_DIM
from subq.profile.ops.base import Size

ABBREV = {"batch": "b", "seqlen": "L", "qk_dim": "S", "value_dim": "E", "chunk_size": "C", "causal": "causal",
          "position": "t"}
_FROM_ZERO = ("causal", "position")  # a flag, and the first token's position


def invalid(size: Size) -> str | None:
    """What subq.ops.flash rejects among the axes ``size`` has."""
    for axis, value in size.items():
        if value < (0 if axis in _FROM_ZERO else 1):
            return f"{axis} must be at least {0 if axis in _FROM_ZERO else 1}, got {value}"
    if size.get("causal", 0) > 1:
        return f"causal must be 0 or 1, got {size['causal']}"
    if "chunk_size" in size and size["chunk_size"] not in CHUNK_SIZES:
        return f"chunk_size must be one of {CHUNK_SIZES}, got {size['chunk_size']}"
    if size["qk_dim"] > MAX_QK_DIM:
        return f"qk_dim must be at most {MAX_QK_DIM}, got {size['qk_dim']}"
    if size["value_dim"] > MAX_VALUE_DIM:
        return f"value_dim must be at most {MAX_VALUE_DIM}, got {size['value_dim']}"
    return None


def invalid_with_sdpa(size: Size) -> str | None:
    """``invalid``, and the softmax-attention baseline's heads: value_dim / qk_dim heads of qk_dim features."""
    reason = invalid(size)
    if reason is None and size["value_dim"] % size["qk_dim"]:
        return f"qk_dim={size['qk_dim']} must divide value_dim={size['value_dim']} (the attention baseline's heads)"
    return reason
