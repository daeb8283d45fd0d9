"""subq.distributed's context-parallel ops on gloo: each rank's shard of the output, and every gradient, equal the
single-process op on the whole sequence; causality across ranks; communication that does not grow with L.

One spawn per world size (1, 2, 4) runs every case (a module-scoped fixture); the tests then compare what the ranks
returned with the single-process op computed here. Replicated inputs (A, D, dt_bias, initial_states, weight, bias,
rel_bias) get a partial gradient on each rank: their sum over the ranks must be the single-process gradient.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch
import torch.distributed as dist

import subq.distributed as sd
from dist_support import run_ranks
from subq import ops
from subq.reference.causal_conv1d import causal_conv1d_ref
from subq.reference.flash import flash_chunked_ref
from subq.reference.ssd import ssd_chunked_ref

WORLDS = (1, 2, 4)
# Shard lengths for 4 ranks; 2 ranks merge neighbours, 1 rank holds all. SSD: not chunk multiples, one of length 1.
# FLASH: chunk multiples (64) but the last. Conv (width 4): the last shorter than the halo (3).
SHARDS4 = {"ssd": [1, 69, 40, 41], "flash": [64, 128, 64, 37], "conv": [3, 7, 4, 2]}
SINGLE = {"ssd": ops.ssd_chunk_scan, "flash": ops.flash_chunk_attention, "conv": ops.causal_conv1d}
DISTRIBUTED = {"ssd": sd.ssd_chunk_scan, "flash": sd.flash_chunk_attention, "conv": sd.causal_conv1d}
SEQ_DIM = {"ssd": 1, "flash": 1, "conv": 2}  # conv's x is (batch, dim, seqlen)
SHARDED = {"ssd": ("x", "dt", "B", "C", "z", "seq_idx"), "flash": ("q_quad", "k_quad", "q_lin", "k_lin", "v", "u"),
           "conv": ("x", "seq_idx")}


def shard_lengths(op: str, world: int) -> list[int]:
    four = SHARDS4[op]
    return [sum(four[i:i + 4 // world]) for i in range(0, 4, 4 // world)]


@dataclass
class Case:
    op: str
    name: str
    tensors: dict[str, torch.Tensor]
    options: dict = field(default_factory=dict)
    final: bool = False
    budget: str = "exact"  # exact (float64, 1e-12 relative) | float32 | bfloat16 (the error-budget rule)

    def seq_dim(self, name: str) -> int:
        return 1 if name == "seq_idx" else SEQ_DIM[self.op]


def _seq_idx(seqlen: int, *rows: list[int]) -> torch.Tensor:
    """(len(rows), seqlen) int32 packed-sequence indices: each row's sequences start at its listed boundaries."""
    idx = torch.zeros(len(rows), seqlen, dtype=torch.int32)
    for row, boundaries in enumerate(rows):
        for b in boundaries:
            idx[row, b:] += 1
    return idx


def _ssd_inputs(gen, seqlen, *, batch=2, nheads=4, headdim=8, ngroups=2, dstate=16, dtype=torch.float64,
                param_dtype=None, D=False, D_per_channel=False, z=False, dt_bias=False, init=False):
    param_dtype = param_dtype or dtype

    def rnd(*shape, dt=dtype):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dt)

    t = {"x": rnd(batch, seqlen, nheads, headdim),
         "dt": (torch.rand(batch, seqlen, nheads, generator=gen, dtype=torch.float64) * 0.3 + 0.02).to(dtype),
         "A": -(torch.rand(nheads, generator=gen, dtype=torch.float64) + 0.2).to(param_dtype),
         "B": rnd(batch, seqlen, ngroups, dstate), "C": rnd(batch, seqlen, ngroups, dstate)}
    if D:
        t["D"] = rnd(*((nheads, headdim) if D_per_channel else (nheads,)), dt=param_dtype)
    if z:
        t["z"] = rnd(batch, seqlen, nheads, headdim)
    if dt_bias:
        t["dt_bias"] = rnd(nheads, dt=param_dtype) * 0.5
        t["dt"] = rnd(batch, seqlen, nheads) - 1.0
    if init:
        t["initial_states"] = rnd(batch, nheads, headdim, dstate, dt=param_dtype)
    return t


def _flash_inputs(gen, seqlen, *, batch=2, qk_dim=16, value_dim=24, dtype=torch.float64, u=False, rel_bias=False,
                  chunk_size=64):
    def rnd(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)

    t = {name: rnd(batch, seqlen, qk_dim) for name in ("q_quad", "k_quad", "q_lin", "k_lin")}
    t["v"] = rnd(batch, seqlen, value_dim)
    if u:
        t["u"] = rnd(batch, seqlen, value_dim)
    if rel_bias:
        t["rel_bias"] = rnd(2 * chunk_size - 1) * 0.3
    return t


def _conv_inputs(gen, seqlen, *, batch=2, dim=6, width=4, dtype=torch.float64, bias=False, init=False):
    def rnd(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)

    t = {"x": rnd(batch, dim, seqlen), "weight": rnd(dim, width)}
    if bias:
        t["bias"] = rnd(dim)
    if init:
        t["initial_states"] = rnd(batch, dim, width - 1)
    return t


def _channels_last(t: dict) -> dict:
    """x as Mamba-2 holds it: a (batch, seqlen, dim) tensor seen as (batch, dim, seqlen)."""
    return {**t, "x": t["x"].transpose(1, 2).contiguous().transpose(1, 2)}


def make_cases(world: int) -> list[Case]:
    """Every equality case, the same in the test process and in each rank (fixed seeds)."""
    gen = torch.Generator().manual_seed(1234)
    # seq_idx rows: boundaries inside shards, on shard starts (70 for 2 and 4 ranks; 3, 10 for conv) and
    # sequences spanning three shards (the second rows on 4 ranks).
    L = {op: sum(SHARDS4[op]) for op in SHARDS4}
    ssd_opts = {"chunk_size": 64}
    dt_opts = {"dt_softplus": True, "dt_limit": (0.01, 0.4)}
    cases = [
        Case("ssd", "plain", _ssd_inputs(gen, L["ssd"], ngroups=1), ssd_opts),
        Case("ssd", "all_options", _ssd_inputs(gen, L["ssd"], D=True, D_per_channel=True, z=True, dt_bias=True,
                                               init=True), {**ssd_opts, **dt_opts}, final=True),
        Case("ssd", "seq_idx", {**_ssd_inputs(gen, L["ssd"], D=True, z=True, init=True),
                                "seq_idx": _seq_idx(L["ssd"], [30, 70, 120], [50, 140])}, ssd_opts, final=True),
        Case("ssd", "float32", _ssd_inputs(gen, L["ssd"], dtype=torch.float32, D=True, z=True, dt_bias=True,
                                           init=True), {**ssd_opts, **dt_opts}, final=True, budget="float32"),
        Case("ssd", "bfloat16", _ssd_inputs(gen, L["ssd"], dtype=torch.bfloat16, param_dtype=torch.float32, D=True,
                                            z=True, dt_bias=True), {**ssd_opts, **dt_opts}, budget="bfloat16"),
        Case("flash", "causal", _flash_inputs(gen, L["flash"], u=True, rel_bias=True),
             {"chunk_size": 64, "causal": True}),
        Case("flash", "causal_plain", _flash_inputs(gen, L["flash"]), {"chunk_size": 64, "causal": True}),
        Case("flash", "bidirectional", _flash_inputs(gen, L["flash"], u=True, rel_bias=True),
             {"chunk_size": 64, "causal": False, "quad_scale": 0.05, "lin_scale": 0.01}),
        Case("flash", "bidirectional_default_scale", _flash_inputs(gen, L["flash"], u=True),
             {"chunk_size": 64, "causal": False}),
        Case("flash", "float32", _flash_inputs(gen, L["flash"], dtype=torch.float32, u=True, rel_bias=True),
             {"chunk_size": 64, "causal": True}, budget="float32"),
        Case("flash", "bfloat16", _flash_inputs(gen, L["flash"], dtype=torch.bfloat16, u=True, rel_bias=True),
             {"chunk_size": 64, "causal": True}, budget="bfloat16"),
        Case("conv", "silu_bias_init", _conv_inputs(gen, L["conv"], bias=True, init=True), {"activation": "silu"},
             final=True),
        Case("conv", "seq_idx", {**_conv_inputs(gen, L["conv"], bias=True),
                                 "seq_idx": _seq_idx(L["conv"], [3, 5, 10, 12], [8])}, {"activation": "silu"},
             final=True),
        Case("conv", "width2", _conv_inputs(gen, L["conv"], width=2)),
        Case("conv", "channels_last", _channels_last(_conv_inputs(gen, L["conv"], width=3, init=True)),
             final=True),
        Case("conv", "float32", _conv_inputs(gen, L["conv"], dtype=torch.float32, bias=True, init=True),
             {"activation": "silu"}, final=True, budget="float32"),
        Case("conv", "bfloat16", _conv_inputs(gen, L["conv"], dtype=torch.bfloat16, bias=True),
             {"activation": "silu"}, budget="bfloat16"),
    ]
    return cases


def upstream(case: Case, y: torch.Tensor, final: torch.Tensor | None, world: int):
    """Fixed upstream gradients: one for the whole y, one per rank for final_states (each rank's use counts)."""
    gen = torch.Generator().manual_seed(99)
    gy = torch.randn(y.shape, generator=gen, dtype=torch.float64)
    gfs = [torch.randn(final.shape, generator=gen, dtype=torch.float64) for _ in range(world)] if case.final else []
    return gy, gfs


def _call(op: str, tensors: dict, options: dict, final: bool, group):
    fn = DISTRIBUTED[op] if group is not None else SINGLE[op]
    kwargs = {"return_final_states": True} if final else {}
    if group is not None:
        kwargs["group"] = group
    out = fn(**tensors, **options, **kwargs)
    return out if final else (out, None)


def _shard(case: Case, name: str, t: torch.Tensor, lengths: list[int], rank: int) -> torch.Tensor:
    start = sum(lengths[:rank])
    return t.narrow(case.seq_dim(name), start, lengths[rank])


def run_case_on_rank(case: Case, rank: int, world: int, group) -> dict:
    lengths = shard_lengths(case.op, world)
    leaves = {}
    for name, t in case.tensors.items():
        if name in SHARDED[case.op]:
            t = _shard(case, name, t, lengths, rank)
        leaves[name] = t.clone().requires_grad_(t.is_floating_point())
    y, final = _call(case.op, leaves, case.options, case.final, group)
    full_y_shape = list(y.shape)
    full_y_shape[SEQ_DIM[case.op]] = sum(lengths)
    gy, gfs = upstream(case, torch.empty(full_y_shape), final, world)
    loss = (y.double() * _shard(case, "y", gy, lengths, rank)).sum()
    if final is not None:
        loss = loss + (final.double() * gfs[rank]).sum()
    loss.backward()
    grads = {n: t.grad for n, t in leaves.items() if t.is_floating_point()}
    return {"y": y.detach(), "final": None if final is None else final.detach(), "grads": grads}


def run_case_single(case: Case, world: int, dtype: torch.dtype | None = None, fn=None) -> dict:
    """The single-process op (or ``fn``, a plain reference) on the whole sequence; dtype: cast floats first."""
    leaves = {}
    for name, t in case.tensors.items():
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        leaves[name] = t.clone().requires_grad_(t.is_floating_point())
    if fn is None:
        y, final = _call(case.op, leaves, case.options, case.final, None)
    else:
        y, final = fn(leaves)
    gy, gfs = upstream(case, y, final, world)
    loss = (y.double() * gy).sum()
    if final is not None:
        loss = loss + (final.double() * sum(gfs)).sum()
    loss.backward()
    return {"y": y.detach(), "final": None if final is None else final.detach(),
            "grads": {n: t.grad for n, t in leaves.items() if t.is_floating_point()}}


def plain_pytorch(case: Case):
    """The plain PyTorch implementation of the case's op in the inputs' dtypes: the error-budget baseline."""
    opts = case.options

    def ssd(t):
        keys = ("D", "z", "dt_bias", "initial_states", "seq_idx")
        kw = {k: t.get(k) for k in keys}
        return ssd_chunked_ref(t["x"], t["dt"], t["A"], t["B"], t["C"], opts["chunk_size"], dt_softplus=opts.get(
            "dt_softplus", False), dt_limit=opts.get("dt_limit", (0.0, float("inf"))), **kw)[0], None

    def flash(t):
        return flash_chunked_ref(**t, **opts), None

    def conv(t):
        return causal_conv1d_ref(**t, **opts), None

    return {"ssd": ssd, "flash": flash, "conv": conv}[case.op]


# ---- what each rank runs ---------------------------------------------------------------------------------------------


def _causality(rank, world, group) -> dict:
    """Perturb rank p's inputs, for each p: the outputs of ranks < p must not move (bitwise), rank p's must."""
    gen = torch.Generator().manual_seed(7)
    inputs = {"ssd": ({**_ssd_inputs(gen, sum(SHARDS4["ssd"]), D=True, z=True, init=True)}, {"chunk_size": 64}),
              "flash": (_flash_inputs(gen, sum(SHARDS4["flash"]), u=True, rel_bias=True),
                        {"chunk_size": 64, "causal": True}),
              "conv": (_conv_inputs(gen, sum(SHARDS4["conv"]), bias=True, init=True), {"activation": "silu"})}
    out = {}
    for op, (tensors, options) in inputs.items():
        case = Case(op, "causality", tensors, options)
        lengths = shard_lengths(op, world)
        mine = {n: (_shard(case, n, t, lengths, rank) if n in SHARDED[op] else t) for n, t in tensors.items()}
        with torch.no_grad():
            base = _call(op, mine, options, False, group)[0]
            for p in range(1, world):
                moved = dict(mine)
                if rank == p:
                    for n in SHARDED[op]:
                        if n in moved and moved[n].is_floating_point():
                            moved[n] = moved[n] + torch.randn(moved[n].shape, generator=gen, dtype=moved[n].dtype)
                y = _call(op, moved, options, False, group)[0]
                out[(op, p)] = bool(torch.equal(y, base))
    return out


def _bytes(rank, world, group) -> dict:
    """Bytes this rank sends (forward and backward) for shards of length L_r and 4·L_r."""
    out = {}
    for scale in (1, 4):
        gen = torch.Generator().manual_seed(5)
        # Each op at shard lengths scaled by `scale` (SSD and conv: any length; FLASH: chunk multiples but the last)
        shards = {op: [n * scale for n in shard_lengths(op, world)] for op in SHARDS4}
        inputs = {
            "ssd": (_ssd_inputs(gen, sum(shards["ssd"]), D=True, z=True, init=True), {"chunk_size": 64}, True),
            "flash": (_flash_inputs(gen, sum(shards["flash"]), u=True, rel_bias=True),
                      {"chunk_size": 64, "causal": True}, False),
            "conv": (_conv_inputs(gen, sum(shards["conv"]), bias=True), {"activation": "silu"}, True),
        }
        for op, (tensors, options, final) in inputs.items():
            case = Case(op, "bytes", tensors, options, final)
            start = sum(shards[op][:rank])
            mine = {n: (t.narrow(case.seq_dim(n), start, shards[op][rank]) if n in SHARDED[op] else t)
                    .clone().requires_grad_(t.is_floating_point()) for n, t in tensors.items()}
            with sd.counting_bytes() as sent:
                y, fin = _call(op, mine, options, final, group)
                (y.sum() + (fin.sum() if fin is not None else 0)).backward()
            out[(op, scale)] = sent()
    return out


def _errors(rank, world, group) -> dict:
    """Bad layouts raise the same ValueError on every rank (no hang)."""
    gen = torch.Generator().manual_seed(3)
    out = {}

    def attempt(key, fn):
        try:
            fn()
            out[key] = None
        except ValueError as e:
            out[key] = str(e)

    bad = _flash_inputs(gen, 65 if rank == 0 else 64)
    attempt("flash_not_chunk_multiple", lambda: sd.flash_chunk_attention(**bad, chunk_size=64, group=group))
    ssd = _ssd_inputs(gen, 5, headdim=8 if rank == 0 else 4)
    attempt("ssd_shapes_differ", lambda: sd.ssd_chunk_scan(**ssd, chunk_size=64, group=group))
    empty = _ssd_inputs(gen, 0 if rank == 0 else 3)
    attempt("ssd_empty_shard", lambda: sd.ssd_chunk_scan(**empty, chunk_size=64, group=group))
    conv = _conv_inputs(gen, 2 if rank == 0 else 6)
    attempt("conv_short_shard", lambda: sd.causal_conv1d(**conv, group=group))
    cu = torch.tensor([0, 2, 5])
    attempt("ssd_cu_seqlens", lambda: sd.ssd_chunk_scan(**_ssd_inputs(gen, 5, batch=1), chunk_size=64,
                                                        cu_seqlens=cu, group=group))
    return out


def _every_case(rank, world):
    group = dist.group.WORLD
    torch.manual_seed(rank)
    results = {"cases": {(c.op, c.name): run_case_on_rank(c, rank, world, group) for c in make_cases(world)},
               "causality": _causality(rank, world, group), "bytes": _bytes(rank, world, group)}
    if world > 1:
        results["errors"] = _errors(rank, world, group)
    return results


# ---- the tests -------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=WORLDS, ids=[f"{w}ranks" for w in WORLDS])
def ranks(request):
    return request.param, run_ranks(_every_case, request.param)


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want.double()).abs().max() / want.double().abs().max().clamp_min(1e-300)).item()


def _gathered(case: Case, results: list[dict], world: int) -> dict:
    """The ranks' results as the whole sequence's: outputs and sharded gradients concatenated, replicated summed."""
    per_rank = [r["cases"][(case.op, case.name)] for r in results]
    out = {"y": torch.cat([r["y"] for r in per_rank], dim=SEQ_DIM[case.op]), "grads": {}}
    if case.final:
        for r in per_rank:  # every rank returns the whole sequence's final state
            torch.testing.assert_close(r["final"], per_rank[-1]["final"], rtol=0, atol=0)
        out["final"] = per_rank[-1]["final"]
    for name in per_rank[0]["grads"]:
        grads = [r["grads"][name] for r in per_rank]
        if name in SHARDED[case.op]:
            out["grads"][name] = torch.cat(grads, dim=case.seq_dim(name))
        else:
            out["grads"][name] = sum(g if g is not None else torch.zeros_like(case.tensors[name]) for g in grads)
    return out


def _pairs(a: dict, b: dict):
    yield "y", a["y"], b["y"]
    if a.get("final") is not None:
        yield "final_states", a["final"], b["final"]
    for name in b["grads"]:
        yield f"d{name}", a["grads"][name], b["grads"][name]


MAX_ERR: dict = {}  # (op, world, dtype) -> the largest error seen, for the report


def _record(op, world, dtype, err):
    key = (op, world, str(dtype).replace("torch.", ""))
    MAX_ERR[key] = max(MAX_ERR.get(key, 0.0), err)


@pytest.mark.parametrize("op", ["ssd", "flash", "conv"])
def test_outputs_and_gradients_equal_single_process(ranks, op):
    world, results = ranks
    for case in make_cases(world):
        if case.op != op:
            continue
        got = _gathered(case, results, world)
        if case.budget == "exact":
            want = run_case_single(case, world)
            for what, g, w in _pairs(got, want):
                err = _rel_err(g, w)
                _record(op, world, torch.float64, err)
                assert err <= 1e-12, f"{op}/{case.name} on {world} ranks: {what} relative error {err:.3g}"
            continue
        # Error budget: the distributed result's error against the float64 single-process result is at most 2x
        # that of a baseline in the same dtype (float32: the single-process op; bfloat16: plain PyTorch), plus atol.
        want = run_case_single(case, world, torch.float64)
        base = run_case_single(case, world) if case.budget == "float32" else \
            run_case_single(case, world, fn=plain_pytorch(case))
        atol = 1e-6 if case.budget == "float32" else 1e-3
        for (what, g, w), (_, b, _) in zip(_pairs(got, want), _pairs(base, want), strict=True):
            err, base_err = _rel_err(g, w), _rel_err(b, w)
            _record(op, world, case.tensors["x" if "x" in case.tensors else "v"].dtype, err)
            assert err <= 2 * base_err + atol, (f"{op}/{case.name} on {world} ranks: {what} relative error {err:.3g} "
                                                f"over the budget 2 x {base_err:.3g} + {atol}")


def test_causal_ops_do_not_look_ahead_across_ranks(ranks):
    world, results = ranks
    for op in ("ssd", "flash", "conv"):
        for p in range(1, world):
            for rank, r in enumerate(results):
                unchanged = r["causality"][(op, p)]
                if rank < p:
                    assert unchanged, f"{op}: perturbing rank {p}'s inputs moved rank {rank}'s outputs"
                elif rank == p:
                    assert not unchanged, f"{op}: perturbing rank {p}'s inputs left its own outputs unchanged"


def test_bytes_sent_do_not_grow_with_length(ranks):
    world, results = ranks
    for rank, r in enumerate(results):
        for op in ("ssd", "flash", "conv"):
            short, long = r["bytes"][(op, 1)], r["bytes"][(op, 4)]
            assert short == long, f"{op} on {world} ranks: rank {rank} sent {short} bytes at L and {long} at 4L"
            if world > 1:
                assert short > 0


def test_bad_layouts_raise_on_every_rank(ranks):
    world, results = ranks
    if world == 1:
        return
    expected = {"flash_not_chunk_multiple": "rank 0's shard has length 65",
                "ssd_shapes_differ": "must agree across the ranks",
                "ssd_empty_shard": "rank 0's x has seqlen 0",
                "conv_short_shard": "rank 0's x has seqlen 2",
                "ssd_cu_seqlens": "not supported by the context-parallel"}
    for r in results:
        for key, text in expected.items():
            assert r["errors"][key] is not None and text in r["errors"][key], (key, r["errors"][key])


def test_group_argument_is_checked():
    t = _ssd_inputs(torch.Generator().manual_seed(0), 4)
    with pytest.raises(TypeError, match="group must be a torch.distributed ProcessGroup"):
        sd.ssd_chunk_scan(**t, group="world")
    with pytest.raises(TypeError, match="group must be a torch.distributed ProcessGroup"):
        sd.flash_chunk_attention(*_flash_inputs(torch.Generator(), 4).values(), group=0)
    with pytest.raises(TypeError, match="group must be a torch.distributed ProcessGroup"):
        sd.causal_conv1d(*_conv_inputs(torch.Generator(), 4).values(), group=[0, 1])


def test_no_group_is_the_single_process_op():
    gen = torch.Generator().manual_seed(2)
    t = _ssd_inputs(gen, 9, D=True, init=True)
    y, final = sd.ssd_chunk_scan(**t, chunk_size=64, return_final_states=True)
    y_ref, final_ref = ops.ssd_chunk_scan(**t, chunk_size=64, return_final_states=True)
    assert torch.equal(y, y_ref) and torch.equal(final, final_ref)
