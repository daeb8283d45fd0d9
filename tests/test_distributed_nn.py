"""Parallel layers and models on gloo equal one process: tensor-parallel Mamba-2 (2 and 4 ranks), TP × CP, and
context-parallel Mamba-2 / FLASH layers and their LMs. float64, ≤ 1e-12 relative (max |a - b| / max |b|).

Each rank builds the single-process module from the same seed, runs it as the reference, then the parallel one
with the same weights (sharded for TP) and compares outputs, input gradients and every parameter gradient: TP
slices gathered back to the full layout, CP gradients summed over the CP ranks. One spawn per world size (process
start-up dominates on 2 cores) runs every part; the tests read its results.
"""

import functools
import traceback

import pytest
import torch
import torch.distributed as dist

from dist_support import run_ranks
from subq.distributed import counting_bytes
from subq.distributed import tensor_parallel as tp
from subq.models import FlashLM, FlashLMConfig, Mamba2Config, Mamba2LM
from subq.nn import FLASH, Mamba2

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
    full = Mamba2(**kwargs).to(F64)
    u = torch.randn(2, seqlen, kwargs["d_model"], dtype=F64, requires_grad=True)
    w = torch.randn(2, seqlen, kwargs["d_model"], dtype=F64)
    y_ref = full(u)
    (y_ref * w).sum().backward()

    torch.manual_seed(0)
    layer = Mamba2(**kwargs, tp_group=group).to(F64)
    # Built from the same seed, the TP layer is the shard of the single-process one (its init cut to this rank).
    shard = tp.shard_mamba2_state_dict(full.state_dict(), full, rank, size)
    errors = {"init is the shard": max(_rel(v, shard[k]) for k, v in layer.state_dict().items())}
    errors["A_log keeps _no_weight_decay"] = float(not getattr(layer.A_log, "_no_weight_decay", False))
    layer.load_state_dict(shard)
    u_tp = u.detach().clone().requires_grad_()
    with counting_bytes() as sent:
        y = layer(u_tp)
        (y * w).sum().backward()
    errors.update({"out": _rel(y, y_ref), "du": _rel(u_tp.grad, u.grad)})
    # One all-reduce of (batch, seqlen, d_model) forward and one backward: 2 · 2(T-1)/T · n · 8 bytes (ring).
    errors["bytes vs formula"] = abs(sent() - 2 * (2 * (size - 1) * u.numel() * 8 // size))
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
    torch.manual_seed(1)
    model = Mamba2LM(config, tp_group=group).to(F64)
    shard = tp.shard_mamba2_lm_state_dict(full.state_dict(), config, rank, world)
    errors["lm init is the shard"] = max(_rel(v, shard[k]) for k, v in model.state_dict().items())
    model.load_state_dict(shard)
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


def _all_parts(rank, world):
    parts = {"tp": _tp_world, "cp": _cp_world} | ({"tp x cp": _tp_cp_world} if world == 4 else {})
    results = {}
    for name, part in parts.items():
        try:
            results[name] = part(rank, world)
        except Exception:  # noqa: BLE001 - reported by the test of that part; the other parts still run
            results[name] = traceback.format_exc()
    return results


@functools.cache
def _spawn(world):
    return run_ranks(_all_parts, world)


def _part(world, name):
    results = [ranks[name] for ranks in _spawn(world)]
    for rank, result in enumerate(results):
        assert not isinstance(result, str), f"rank {rank} of {world} failed in {name}:\n{result}"
    return results


@pytest.mark.parametrize("world", [2, 4])
def test_tensor_parallel_mamba2_equals_one_process(world):
    for rank, (errors, messages) in enumerate(_part(world, "tp")):
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



# ---- context parallelism --------------------------------------------------------------------------------------

# Shard lengths: Mamba-2's need not be chunk multiples (all but the last need d_conv - 1 positions); FLASH's are
# cut at chunk boundaries (64), all but the last.
MAMBA_SHARDS = {2: [70, 83], 4: [30, 45, 3, 75]}
FLASH_SHARDS = {2: [128, 84], 4: [64, 128, 64, 20]}
FLASH_LM_CONFIG = dict(d_model=16, n_layer=2, vocab_size=32, s=8, chunk_size=64, max_seq_len=512)


def _shard(t: torch.Tensor, lengths: list[int], rank: int) -> torch.Tensor:
    start = sum(lengths[:rank])
    return t[:, start:start + lengths[rank]]


def _summed_grads(module: torch.nn.Module, group) -> dict[str, torch.Tensor]:
    grads = _grads(module)
    for g in grads.values():
        dist.all_reduce(g, group=group)
    return grads


def _cp_compare(module, full, x, w, lengths, rank, cp_group, tp_split=None, **kw):
    """Errors of ``module`` on this rank's shard of x against ``full`` on all of it: the output shard, the input's
    gradient shard and every parameter gradient (summed over the CP group; with ``tp_split = (tp_group, tp_rank,
    shard, gather)`` the weights are sharded and the gradient slices gathered back)."""
    x_ref = x.detach().clone().requires_grad_(x.is_floating_point())
    shard_kw = {k: _shard(v, lengths, rank) for k, v in kw.items()}
    y_ref = full(x_ref, **kw)
    (y_ref * w).sum().backward()
    state = full.state_dict()
    if tp_split is not None:
        tp_group, tp_rank, shard, gather = tp_split
        state = shard(state, full_config(full), tp_rank, dist.get_world_size(tp_group))
    module.load_state_dict(state)
    x_cp = _shard(x, lengths, rank).detach().clone().requires_grad_(x.is_floating_point())
    y = module(x_cp, **shard_kw)
    (y * _shard(w, lengths, rank)).sum().backward()
    errors = {"out": _rel(y, _shard(y_ref, lengths, rank))}
    if x.is_floating_point():
        errors["dx"] = _rel(x_cp.grad, _shard(x_ref.grad, lengths, rank))
    grads = _summed_grads(module, cp_group)
    if tp_split is not None:
        grads = gather(_gather(grads, tp_group), full_config(full))
    errors.update({f"d{name}": _rel(grads[name], g) for name, g in _grads(full).items()})
    return errors


def full_config(module):
    return getattr(module, "config", module)


def _cp_world(rank, world):
    group = dist.group.WORLD
    errors = {}

    def record(name, errs):
        errors.update({f"{name} {k}": v for k, v in errs.items()})

    lengths = MAMBA_SHARDS[world]
    seqlen = sum(lengths)
    for i, kwargs in enumerate(LAYER_CASES[:2]):
        torch.manual_seed(10 + i)
        full = Mamba2(**kwargs).to(F64)
        u = torch.randn(2, seqlen, kwargs["d_model"], dtype=F64)
        w = torch.randn_like(u)
        record(f"mamba2 case {i}", _cp_compare(Mamba2(**kwargs, cp_group=group).to(F64),
                                               full, u, w, lengths, rank, group))
    # Packed sequences whose boundaries fall inside and on the shard boundaries.
    seq_idx = torch.zeros(2, seqlen, dtype=torch.int32)
    seq_idx[:, lengths[0]:] += 1
    seq_idx[:, seqlen // 2:] += 1
    seq_idx[1, 7:] += 1
    full.zero_grad()
    record("mamba2 seq_idx", _cp_compare(Mamba2(**kwargs, cp_group=group).to(F64), full, u, w, lengths,
                                         rank, group, seq_idx=seq_idx))

    lengths = FLASH_SHARDS[world]
    seqlen = sum(lengths)
    for causal, lin_scale in ((True, None), (False, None), (True, 1 / 512)):
        kwargs = dict(d_model=16, chunk_size=64, s=8, causal=causal, lin_scale=lin_scale)
        torch.manual_seed(20)
        full = FLASH(**kwargs, dtype=F64)
        torch.nn.init.normal_(full.rel_bias, std=0.1)  # zero-initialised: make it count
        x = torch.randn(2, seqlen, 16, dtype=F64)
        record(f"flash causal={causal} lin_scale={lin_scale}",
               _cp_compare(FLASH(**kwargs, cp_group=group, dtype=F64), full, x, torch.randn_like(x),
                           lengths, rank, group))

    torch.manual_seed(30)
    config = Mamba2Config(**{**LM_CONFIG, "attn_layer_idx": ()})
    full = Mamba2LM(config).to(F64)
    lengths = MAMBA_SHARDS[world]
    ids = torch.randint(0, 32, (2, sum(lengths)))
    w = torch.randn(2, sum(lengths), 32, dtype=F64)
    record("mamba2 lm", _cp_compare(Mamba2LM(config, cp_group=group).to(F64), full, ids, w, lengths, rank,
                                    group))
    flash_config = FlashLMConfig(**FLASH_LM_CONFIG)
    full = FlashLM(flash_config).to(F64)
    lengths = FLASH_SHARDS[world]
    ids = torch.randint(0, 32, (2, sum(lengths)))
    w = torch.randn(2, sum(lengths), 32, dtype=F64)
    record("flash lm", _cp_compare(FlashLM(flash_config, cp_group=group).to(F64), full, ids, w, lengths,
                                   rank, group))

    # The bytes a rank sends (forward + backward) do not grow with the shard length.
    for name, layer, chunk in (("mamba2", Mamba2(**LAYER_CASES[0], cp_group=group).to(F64), 3),
                               ("flash", FLASH(16, chunk_size=64, s=8, causal=True, cp_group=group, dtype=F64), 64)):
        sent_bytes = []
        for length in (chunk, 4 * chunk):
            x = torch.randn(2, length, 16, dtype=F64, requires_grad=True)
            with counting_bytes() as sent:
                layer(x).square().sum().backward()
            sent_bytes.append(sent())
        errors[f"{name} bytes at 4x the length - at 1x"] = (
            float(sent_bytes[1] - sent_bytes[0]) if sent_bytes[0] > 0 else float("inf"))

    messages = []
    for make in (lambda: FlashLM(FlashLMConfig(**{**FLASH_LM_CONFIG, "layer": "flash-quad"}), cp_group=group),
                 lambda: Mamba2LM(Mamba2Config(**LM_CONFIG), cp_group=group),
                 lambda: Mamba2(16, headdim=4, cp_group=group).allocate_inference_cache(1),
                 lambda: FLASH(16, causal=True, cp_group=group).allocate_inference_cache(1, 8)):
        try:
            make()
        except ValueError as error:
            messages.append(str(error))
    return errors, messages


@pytest.mark.parametrize("world", [2, 4])
def test_context_parallel_layers_and_models_equal_one_process(world):
    for rank, (errors, messages) in enumerate(_part(world, "cp")):
        bad = {k: v for k, v in errors.items() if not v <= TOL}
        assert not bad, f"rank {rank} of {world}: {bad}"
        assert len(errors) > 60
        assert [m.split(":")[0].split(" (")[0] for m in messages] == [
            "context parallelism", "context parallelism", "an inference cache is not supported on a "
            "context-parallel Mamba2", "an inference cache is not supported on a context-parallel FLASH layer"]


def _tp_cp_world(rank, world):
    # Ranks (cp, tp): 0 = (0, 0), 1 = (0, 1), 2 = (1, 0), 3 = (1, 1). Every rank creates every group, in order.
    tp_groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    cp_groups = [dist.new_group([0, 2]), dist.new_group([1, 3])]
    tp_group, cp_group = tp_groups[rank // 2], cp_groups[rank % 2]
    tp_rank, cp_rank = rank % 2, rank // 2
    lengths = [61, 90]
    errors = {}
    for i, kwargs in enumerate(LAYER_CASES):
        torch.manual_seed(40 + i)
        full = Mamba2(**kwargs).to(F64)
        u = torch.randn(2, sum(lengths), kwargs["d_model"], dtype=F64)
        errs = _cp_compare(Mamba2(**kwargs, cp_group=cp_group, tp_group=tp_group).to(F64), full, u,
                           torch.randn_like(u), lengths, cp_rank, cp_group,
                           (tp_group, tp_rank, tp.shard_mamba2_state_dict, tp.gather_mamba2_state_dict))
        errors.update({f"layer {i} {k}": v for k, v in errs.items()})
    torch.manual_seed(50)
    config = Mamba2Config(**{**LM_CONFIG, "attn_layer_idx": ()})
    full = Mamba2LM(config).to(F64)
    ids = torch.randint(0, 32, (2, sum(lengths)))
    errs = _cp_compare(Mamba2LM(config, cp_group=cp_group, tp_group=tp_group).to(F64), full, ids,
                       torch.randn(2, sum(lengths), 32, dtype=F64), lengths, cp_rank, cp_group,
                       (tp_group, tp_rank, tp.shard_mamba2_lm_state_dict, tp.gather_mamba2_lm_state_dict))
    errors.update({f"lm {k}": v for k, v in errs.items()})
    return errors


def test_tensor_and_context_parallel_together():
    for rank, errors in enumerate(_part(4, "tp x cp")):
        bad = {k: v for k, v in errors.items() if not v <= TOL}
        assert not bad, f"rank {rank} (cp {rank // 2}, tp {rank % 2}): {bad}"
        assert len(errors) > 40
