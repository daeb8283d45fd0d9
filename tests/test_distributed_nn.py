"""Parallel layers and models on gloo equal one process: tensor-parallel Mamba-2 (2 and 4 ranks), TP × CP, and
context-parallel Mamba-2 / FLASH layers and their LMs. float64, ≤ 1e-12 relative (max |a - b| / max |b|).

Each rank builds the single-process module from the same seed, runs it as the reference, then the parallel one
with the same weights (sharded for TP) and compares outputs, input gradients and every parameter gradient: TP
slices gathered back to the full layout, CP gradients summed over the CP ranks. One spawn per world size.
"""

import pytest
import torch
import torch.distributed as dist

from dist_support import run_ranks
from subq.distributed import tensor_parallel as tp
from subq.models import Mamba2Config, Mamba2LM
from subq.nn import Mamba2

F64 = torch.float64
TOL = 1e-12

# Sizes small enough for 2 cores; every variant of the layer's parameters (D per channel, biases, z-gating).
LAYER_CASES = [
    dict(d_model=16, d_state=8, headdim=4, ngroups=4, chunk_size=64),
    dict(d_model=16, d_state=8, headdim=8, ngroups=4, chunk_size=64, D_has_hdim=True, bias=True, d_conv=3),
    dict(d_model=16, d_state=4, headdim=4, ngroups=4, chunk_size=64, rmsnorm=False, conv_bias=False),
]
LM_CONFIG = dict(d_model=16, n_layer=3, vocab_size=32, d_state=8, headdim=4, ngroups=4, chunk_size=64,
                 attn_layer_idx=(1,), attn_num_heads=2)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-300)).item()


def _grads(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in module.named_parameters()}


def _gather(obj, group):
    out = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def _run_tp_layer(rank, group, kwargs, seqlen=70):
    """Errors of the TP layer (this group) against one process: output, input grad, gathered parameter grads."""
    size = dist.get_world_size(group)
    torch.manual_seed(0)
    full = Mamba2(**kwargs, dtype=F64)
    u = torch.randn(2, seqlen, kwargs["d_model"], dtype=F64, requires_grad=True)
    w = torch.randn(2, seqlen, kwargs["d_model"], dtype=F64)
    y_ref = full(u)
    (y_ref * w).sum().backward()

    layer = Mamba2(**kwargs, tp_group=group, dtype=F64)
    layer.load_state_dict(tp.shard_mamba2_state_dict(full.state_dict(), full, rank, size))
    u_tp = u.detach().clone().requires_grad_()
    y = layer(u_tp)
    (y * w).sum().backward()
    errors = {"out": _rel(y, y_ref), "du": _rel(u_tp.grad, u.grad)}
    grads = tp.gather_mamba2_state_dict(_gather(_grads(layer), group), layer)
    errors.update({f"d{name}": _rel(grads[name], g) for name, g in _grads(full).items()})
    state = tp.gather_mamba2_state_dict(_gather(layer.state_dict(), group), full)
    errors["state round trip"] = max(_rel(state[k], v) for k, v in full.state_dict().items())

    # Decoding per rank: a prefill of 5 tokens then 3 steps equals the full forward's positions.
    with torch.no_grad():
        cache = layer.allocate_inference_cache(2, dtype=F64)
        outs = [layer(u[:, :5], cache=cache)] + [layer.step(u[:, t], cache)[:, None] for t in range(5, 8)]
        errors["decode"] = _rel(torch.cat(outs, 1), y_ref[:, :8])
    return errors


def _tp_world(rank, world):
    group = dist.group.WORLD
    errors = {}
    for i, kwargs in enumerate(LAYER_CASES):
        errors.update({f"case {i} {k}": v for k, v in _run_tp_layer(rank, group, kwargs).items()})

    config = Mamba2Config(**LM_CONFIG)
    torch.manual_seed(1)
    full = Mamba2LM(config).to(F64)
    ids = torch.randint(0, config.vocab_size, (2, 70))
    w = torch.randn(2, 70, config.vocab_size, dtype=F64)
    logits_ref = full(ids)
    (logits_ref * w).sum().backward()
    model = Mamba2LM(config, tp_group=group).to(F64)
    model.load_state_dict(tp.shard_mamba2_lm_state_dict(full.state_dict(), config, rank, world))
    logits = model(ids)
    (logits * w).sum().backward()
    errors["lm logits"] = _rel(logits, logits_ref)
    grads = tp.gather_mamba2_lm_state_dict(_gather(_grads(model), group), config)
    errors.update({f"lm d{name}": _rel(grads[name], g) for name, g in _grads(full).items()})
    state = tp.gather_mamba2_lm_state_dict(_gather(model.state_dict(), group), config)
    errors["lm state round trip"] = max(_rel(state[k], v) for k, v in full.state_dict().items())

    messages = []
    for ngroups in (1, 2, 3):
        try:
            Mamba2(24, d_state=8, headdim=4, chunk_size=64, ngroups=ngroups, tp_group=group)
        except ValueError as error:
            messages.append(str(error))
    return errors, messages


@pytest.mark.parametrize("world", [2, 4])
def test_tensor_parallel_mamba2_equals_one_process(world):
    for rank, (errors, messages) in enumerate(run_ranks(_tp_world, world)):
        bad = {k: v for k, v in errors.items() if not v <= TOL}
        assert not bad, f"rank {rank} of {world}: {bad}"
        assert len(errors) > 40
        # 12 heads: ngroups 1 and 3 do not split 2 ways; 1, 2 and 3 do not split 4 ways.
        bad_groups = (1, 3) if world == 2 else (1, 2, 3)
        assert messages == [f"ngroups ({g}) must be a multiple of the tensor-parallel size ({world}): each rank "
                            "normalises and scans whole groups" for g in bad_groups]


def test_shard_gather_round_trip_and_errors():
    torch.manual_seed(0)
    layer = Mamba2(16, d_state=8, headdim=4, ngroups=4, chunk_size=64, bias=True, D_has_hdim=True)
    state = layer.state_dict()
    for size in (1, 2, 4):
        shards = [tp.shard_mamba2_state_dict(state, layer, r, size) for r in range(size)]
        assert shards[0]["in_proj.weight"].shape[0] == layer.in_proj.weight.shape[0] // size
        back = tp.gather_mamba2_state_dict(shards, layer)
        assert back.keys() == state.keys()
        assert all(torch.equal(back[k], v) for k, v in state.items())
    # The layout: rank 1 of 2 holds the second half of each of the z, x, B, C and dt blocks of in_proj.
    rows = tp.Mamba2Shape.of(layer).index("in_proj", 1, 2)
    assert rows[:16].tolist() == list(range(16, 32)) and rows[-4:].tolist() == list(range(132, 136))

    config = Mamba2Config(**LM_CONFIG)
    model = Mamba2LM(config)
    state = model.state_dict()
    shards = [tp.shard_mamba2_lm_state_dict(state, config, r, 2) for r in range(2)]
    assert torch.equal(shards[1]["embedding.weight"], state["embedding.weight"])          # replicated
    assert torch.equal(shards[1]["layers.1.mixer.qkv.weight"], state["layers.1.mixer.qkv.weight"])  # attention
    assert shards[1]["layers.2.mixer.A_log"].shape == (4,)
    back = tp.gather_mamba2_lm_state_dict(shards, config)
    assert all(torch.equal(back[k], v) for k, v in state.items())

    with pytest.raises(ValueError, match=r"ngroups \(4\) must be a multiple of the tensor-parallel size \(3\)"):
        tp.shard_mamba2_state_dict(state, config, 0, 3)
    with pytest.raises(ValueError, match=r"rank must be an int in \[0, 2\)"):
        tp.shard_mamba2_lm_state_dict(state, config, 2, 2)
    shards[1]["embedding.weight"] = shards[1]["embedding.weight"] + 1
    with pytest.raises(ValueError, match="embedding.weight is replicated .* rank 1's differs"):
        tp.gather_mamba2_lm_state_dict(shards, config)
    with pytest.raises(ValueError, match="in_proj.weight has 104 entries along dim 0, but a Mamba2 layer"):
        tp.shard_mamba2_state_dict(Mamba2(16, d_state=8, headdim=4, ngroups=2).state_dict(), layer, 0, 2)
    with pytest.raises(TypeError, match="tp_group must be a torch.distributed ProcessGroup"):
        Mamba2(16, headdim=4, tp_group="world")
    with pytest.raises(TypeError, match="cp_group must be a torch.distributed ProcessGroup"):
        Mamba2LM(config, cp_group=2)
