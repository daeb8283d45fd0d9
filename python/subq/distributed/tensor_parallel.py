"""Tensor parallelism for Mamba-2, the paper's design (Dao and Gu 2024, §8.1): heads and groups split across ranks.

Rank r of T holds heads ``[r·H/T, (r+1)·H/T)`` and the groups they read, ``[r·G/T, (r+1)·G/T)``, so G must be a
multiple of T (and H, a multiple of G, is then one too). Everything between the two projections is local::

    u ──f──> in_proj (column-parallel: this rank's rows of the z, x, B, C and dt blocks)
          ──> conv1d over this rank's x, B, C channels ──> SSD over this rank's heads (A_log, D, dt_bias sliced)
          ──> gated RMSNorm over this rank's groups ──> out_proj (row-parallel: its columns) ──g──> + bias

``f`` is :func:`~subq.distributed._comm.copy_to_parallel` (identity forward, all-reduce backward) and ``g``
:func:`~subq.distributed._comm.reduce_from_parallel` (all-reduce forward, identity backward): one all-reduce of
``(batch, seqlen, d_model)`` in the forward and one in the backward per layer. The normaliser of the grouped
RMSNorm is per group, which is why groups, not only heads, are split: no statistic crosses ranks.

A single-process checkpoint maps onto the ranks with :func:`shard_mamba2_state_dict` and back with
:func:`gather_mamba2_state_dict`; the ``*_lm_*`` pair does a whole :class:`~subq.models.Mamba2LM`, whose embedding,
norms, head (and any attention layers) are replicated. In a running job, gather the ranks' state dicts with
``torch.distributed.all_gather_object(shards, model.state_dict(), group=tp_group)`` first.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from subq.distributed._comm import rank_and_size, reduce_from_parallel

# Marks a parameter as this rank's slice: sync_replicated_ leaves it alone.
SHARDED_ATTR = "_tp_sharded"


def split_heads(nheads: int, ngroups: int, group) -> tuple[int, int]:
    """(rank, size) of ``group`` after checking that the heads and groups split evenly over it."""
    rank, size = rank_and_size(group)
    _check_divides(nheads, ngroups, size)
    return rank, size


def _check_divides(nheads: int, ngroups: int, size: int) -> None:
    if ngroups % size:
        raise ValueError(f"ngroups ({ngroups}) must be a multiple of the tensor-parallel size ({size}): each rank "
                         "normalises and scans whole groups")
    if nheads % size:
        raise ValueError(f"the number of heads ({nheads}) must be a multiple of the tensor-parallel size ({size})")


def row_parallel_linear(x: torch.Tensor, linear: nn.Linear, group) -> torch.Tensor:
    """``linear`` holding this rank's input columns: the partial products summed over ``group``, then the bias once."""
    out = reduce_from_parallel(F.linear(x, linear.weight), group)
    return out if linear.bias is None else out + linear.bias


@torch.no_grad()
def keep_shard_(layer: nn.Module, group) -> None:
    """Cut a whole :class:`~subq.nn.Mamba2`, initialised as one process initialises it, to this rank's heads and
    groups in place. Initialising whole and slicing (Megatron's "master weight" init) gives every rank distinct
    heads even where the ranks share a seed, the same init as one process, and equal replicated parameters."""
    rank, size = rank_and_size(group)
    shape = Mamba2Shape(layer.d_inner, layer.nheads, layer.ngroups, layer.d_state)
    for name, whole in list(layer.named_parameters()):
        rule = shape._rule(name, layer.D.shape[0])
        if rule is None:
            continue
        blocks, dim = rule
        piece = nn.Parameter(whole.index_select(dim, shape.index(blocks, rank, size)),
                             requires_grad=whole.requires_grad)
        piece.__dict__.update(whole.__dict__)  # markers such as _no_weight_decay
        setattr(piece, SHARDED_ATTR, True)
        owner, _, leaf = name.rpartition(".")
        setattr(layer.get_submodule(owner), leaf, piece)
    layer.d_inner, layer.nheads, layer.ngroups = shape.d_inner // size, shape.nheads // size, shape.ngroups // size
    layer.conv_dim = layer.d_inner + 2 * layer.ngroups * layer.d_state
    layer.in_proj.out_features = layer.in_proj.weight.shape[0]
    layer.conv1d.in_channels = layer.conv1d.out_channels = layer.conv1d.groups = layer.conv_dim
    layer.out_proj.in_features = layer.d_inner
    sync_replicated_(layer, group)


@torch.no_grad()
def sync_replicated_(module: nn.Module, group) -> None:
    """Broadcast from the group's rank 0 every parameter and buffer of ``module`` that is not a tensor-parallel
    slice. Ranks that share a seed hold equal ones already; this makes it so whatever the seeds (DDP does it only
    across its own group)."""
    rank, size = rank_and_size(group)
    if size == 1:
        return
    src = dist.get_global_rank(group, 0)
    # NCCL moves CUDA tensors only, and a model is often built on the CPU before .cuda().
    stage = (torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else None)
    for t in list(module.parameters()) + list(module.buffers()):
        if getattr(t, SHARDED_ATTR, False):
            continue
        staged = t.data if stage is None or t.device == stage else t.data.to(stage)
        dist.broadcast(staged, src=src, group=group)
        if staged is not t.data:
            t.data.copy_(staged)


# ---- checkpoints ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Mamba2Shape:
    """The full (single-process) sizes of a Mamba-2 layer that decide how its parameters split."""

    d_inner: int
    nheads: int
    ngroups: int
    d_state: int

    @classmethod
    def of(cls, spec) -> Mamba2Shape:
        """From a :class:`~subq.nn.Mamba2` (of any tensor-parallel size) or a :class:`~subq.models.Mamba2Config`."""
        if isinstance(spec, Mamba2Shape):
            return spec
        if hasattr(spec, "tp_size") and hasattr(spec, "nheads"):      # a layer: its sizes are this rank's
            t = spec.tp_size
            return cls(spec.d_inner * t, spec.nheads * t, spec.ngroups * t, spec.d_state)
        if all(hasattr(spec, name) for name in ("d_model", "expand", "headdim", "ngroups", "d_state")):
            d_inner = spec.expand * spec.d_model
            return cls(d_inner, d_inner // spec.headdim, spec.ngroups, spec.d_state)
        raise TypeError(f"expected a Mamba2 layer, a Mamba2Config or a Mamba2Shape, got {type(spec).__name__}")

    def _blocks(self, name: str) -> list[tuple[int, int]]:
        """(start, width) of the blocks along the split dim of parameter ``name``; each block splits evenly."""
        di, gn, h = self.d_inner, self.ngroups * self.d_state, self.nheads
        return {
            "in_proj": [(0, di), (di, di), (2 * di, gn), (2 * di + gn, gn), (2 * di + 2 * gn, h)],  # z, x, B, C, dt
            "conv1d": [(0, di), (di, gn), (di + gn, gn)],                                           # x, B, C
            "heads": [(0, h)],
            "inner": [(0, di)],
        }[name]

    def _rule(self, key: str, d_length: int) -> tuple[str, int] | None:
        """(blocks, dim) that split the layer's parameter ``key``, or None for a replicated one. ``d_length``: the
        whole layer's length of D, per head or per channel."""
        if key in ("in_proj.weight", "in_proj.bias"):
            return "in_proj", 0
        if key in ("conv1d.weight", "conv1d.bias"):
            return "conv1d", 0
        if key in ("dt_bias", "A_log"):
            return "heads", 0
        if key == "D":
            return ("heads" if d_length == self.nheads else "inner"), 0
        if key == "norm.weight":
            return "inner", 0
        if key == "out_proj.weight":
            return "inner", 1
        if key == "out_proj.bias":
            return None
        raise KeyError(f"{key!r} is not a parameter of a Mamba2 layer")

    def index(self, blocks: str, rank: int, size: int) -> torch.Tensor:
        """Rows (along the split dim) that rank ``rank`` of ``size`` holds: its share of every block, in order."""
        parts = [torch.arange(start + rank * width // size, start + (rank + 1) * width // size)
                 for start, width in self._blocks(blocks)]
        return torch.cat(parts)

    def full_length(self, blocks: str) -> int:
        return sum(width for _, width in self._blocks(blocks))


def _check_split(shape: Mamba2Shape, rank: int, size: int) -> None:
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"size must be a positive int, got {size!r}")
    if not isinstance(rank, int) or not 0 <= rank < size:
        raise ValueError(f"rank must be an int in [0, {size}), got {rank!r}")
    _check_divides(shape.nheads, shape.ngroups, size)


def _layer_keys(state_dict: Mapping[str, torch.Tensor], prefix: str) -> list[str]:
    return [k for k in state_dict if k.startswith(prefix)]


def _shard_layer(state_dict, out: dict, prefix: str, shape: Mamba2Shape, rank: int, size: int) -> None:
    for key in _layer_keys(state_dict, prefix):
        tensor = state_dict[key]
        rule = shape._rule(key[len(prefix):], state_dict[prefix + "D"].shape[0])
        if rule is None:
            out[key] = tensor.clone()
            continue
        blocks, dim = rule
        if tensor.shape[dim] != shape.full_length(blocks):
            raise ValueError(f"{key} has {tensor.shape[dim]} entries along dim {dim}, but a Mamba2 layer with "
                             f"{shape} has {shape.full_length(blocks)}")
        out[key] = tensor.index_select(dim, shape.index(blocks, rank, size)).clone()


def _gather_layer(shards: Sequence[Mapping[str, torch.Tensor]], out: dict, prefix: str, shape: Mamba2Shape) -> None:
    size = len(shards)
    for key in _layer_keys(shards[0], prefix):
        pieces = [shard[key] for shard in shards]
        rule = shape._rule(key[len(prefix):], size * shards[0][prefix + "D"].shape[0])
        if rule is None:
            out[key] = _replicated(key, pieces)
            continue
        blocks, dim = rule
        full_shape = list(pieces[0].shape)
        full_shape[dim] = shape.full_length(blocks)
        full = pieces[0].new_empty(full_shape)
        for rank, piece in enumerate(pieces):
            index = shape.index(blocks, rank, size)
            if piece.shape[dim] != index.numel():
                raise ValueError(f"{key} of rank {rank} has {piece.shape[dim]} entries along dim {dim}; a "
                                 f"{size}-way shard of a Mamba2 layer with {shape} has {index.numel()}")
            full.index_copy_(dim, index, piece)
        out[key] = full


def _replicated(key: str, pieces: Sequence[torch.Tensor]) -> torch.Tensor:
    for rank, piece in enumerate(pieces[1:], 1):
        if piece.shape != pieces[0].shape or not torch.equal(piece, pieces[0]):
            raise ValueError(f"{key} is replicated across tensor-parallel ranks, but rank {rank}'s differs from "
                             "rank 0's")
    return pieces[0].clone()


def _check_shards(shards) -> None:
    if not isinstance(shards, Sequence) or not shards:
        raise ValueError("shards must be a non-empty list of the ranks' state dicts, in rank order")
    keys = set(shards[0])
    for rank, shard in enumerate(shards[1:], 1):
        if set(shard) != keys:
            raise ValueError(f"rank {rank}'s state dict has other keys than rank 0's: "
                             f"{sorted(set(shard) ^ keys)[:5]}")


def shard_mamba2_state_dict(state_dict: Mapping[str, torch.Tensor], layer, rank: int, size: int
                            ) -> dict[str, torch.Tensor]:
    """Rank ``rank`` of ``size``'s part of a single-process :class:`~subq.nn.Mamba2` state dict, for the layer
    ``Mamba2(..., tp_group=<a group of that size>)``. ``layer``: the layer (any TP size), its config or sizes."""
    shape = Mamba2Shape.of(layer)
    _check_split(shape, rank, size)
    out: dict[str, torch.Tensor] = {}
    _shard_layer(state_dict, out, "", shape, rank, size)
    return out


def gather_mamba2_state_dict(shards: Sequence[Mapping[str, torch.Tensor]], layer) -> dict[str, torch.Tensor]:
    """The single-process state dict from every rank's (``shards[r]`` from rank r); the inverse of the above."""
    _check_shards(shards)
    shape = Mamba2Shape.of(layer)
    _check_split(shape, 0, len(shards))
    out: dict[str, torch.Tensor] = {}
    _gather_layer(shards, out, "", shape)
    return out


def _mixer_prefixes(config) -> list[str]:
    return [f"layers.{i}.mixer." for i in range(config.n_layer) if i not in config.attn_layer_idx]


def shard_mamba2_lm_state_dict(state_dict: Mapping[str, torch.Tensor], config, rank: int, size: int
                               ) -> dict[str, torch.Tensor]:
    """Rank ``rank`` of ``size``'s part of a single-process :class:`~subq.models.Mamba2LM` state dict: each
    Mamba-2 mixer sharded, everything else (embedding, norms, head, attention layers) copied."""
    shape = Mamba2Shape.of(config)
    _check_split(shape, rank, size)
    prefixes = _mixer_prefixes(config)
    out = {key: tensor.clone() for key, tensor in state_dict.items() if not key.startswith(tuple(prefixes))}
    for prefix in prefixes:
        _shard_layer(state_dict, out, prefix, shape, rank, size)
    return {key: out[key] for key in state_dict}


def gather_mamba2_lm_state_dict(shards: Sequence[Mapping[str, torch.Tensor]], config) -> dict[str, torch.Tensor]:
    """The single-process :class:`~subq.models.Mamba2LM` state dict from every rank's, in rank order."""
    _check_shards(shards)
    shape = Mamba2Shape.of(config)
    _check_split(shape, 0, len(shards))
    prefixes = _mixer_prefixes(config)
    out = {key: _replicated(key, [shard[key] for shard in shards]) for key in shards[0]
           if not key.startswith(tuple(prefixes))}
    for prefix in prefixes:
        _gather_layer(shards, out, prefix, shape)
    return {key: out[key] for key in shards[0]}


__all__ = [
    "Mamba2Shape",
    "gather_mamba2_lm_state_dict",
    "gather_mamba2_state_dict",
    "row_parallel_linear",
    "shard_mamba2_lm_state_dict",
    "shard_mamba2_state_dict",
    "split_heads",
    "sync_replicated_",
]
