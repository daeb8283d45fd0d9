"""The models of issue 7 against the dense models they replace, side by side in one process.

    python bench/bench_models.py                                  # every section at the device's default sizes
    python bench/bench_models.py --section bert --device cpu      # M2-BERT vs Hugging Face BERT, batch 1, 512..8K
    python bench/bench_models.py --quick --device cpu             # tiny presets, smoke run

Sections:
- ``bert``: forward latency of M2-BERT-base (preset "110m") against Hugging Face ``BertModel`` (BERT-base, SDPA
  attention), untrained weights, inference mode. CPU: batch 1 in float32, L 512..8K (the M2 paper's CPU latency
  table). GPU: bf16, about ``--bert-tokens`` tokens per call (batch = tokens / L), L 512..32K, reported in tokens/ms
  (the paper's throughput table). Needs ``transformers``; skipped with a message without it.
- ``lm``: the causal LMs (Mamba-2 "130m", FLASH and FLASH-Quad "110m", M2-GPT at d=768) against a GPT-style
  Transformer (SDPA attention, bench/_transformer_lm.py) of the same width, its depth chosen to match each model's
  parameter count. Training: one AdamW step (forward, backward, update; bf16 autocast on CUDA) in tokens/s.
  Generation: prefill a prompt, then decode token by token from each model's recurrent state (KV cache for the
  Transformer), greedy, in tokens/s of the decode phase.
- ``mom``: Mixture-of-Modules against the dense GPT-2 (Hugging Face ``GPT2LMHeadModel``, GPT-2 small, SDPA) it is
  built from, same width and sequence length: ``MoM.from_gpt2`` with as many steps as layers (top-1) and the
  efficient presets' H = 4 (top-1, top-1 with 50 % SKIP forced, top-2). FLOPs per token (analytic over the routed
  modules only, and FlopCounterMode), activation memory of a training step (profiler allocation records; bytes
  autograd saves), interleaved median wall times of forward and forward + backward, all as ratios to GPT-2.
Ratios are subq model / Transformer throughput (higher is better) and Transformer / M2-BERT latency.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

import _harness as h
from _transformer_lm import TransformerLM, loss
from subq.models import M2GPT, FlashLM, M2BertModel, Mamba2LM

BERT_VOCAB = 30522


def parameter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ---- M2-BERT vs BERT -------------------------------------------------------------------------------------------------


def bert_rows(args, device: torch.device) -> list[dict]:
    try:
        from transformers import BertConfig, BertModel
    except ImportError:
        print("bert: skipped (transformers is not installed)")
        return []
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rows = []
    print(f"{'L':>6} {'batch':>5} {'m2 ms':>10} {'bert ms':>10} {'m2 tok/ms':>10} {'bert tok/ms':>11} {'speedup':>8}")
    for seqlen in args.bert_seqlen:
        batch = 1 if device.type != "cuda" else max(1, args.bert_tokens // seqlen)
        overrides = {"max_seq_len": seqlen} | (dict(d_model=64, n_layer=2, vocab_size=BERT_VOCAB) if args.quick else {})
        m2 = M2BertModel.from_preset(args.bert_preset, **overrides).to(device, dtype).eval()
        config = BertConfig(max_position_embeddings=seqlen)
        if args.quick:
            config = BertConfig(max_position_embeddings=seqlen, hidden_size=64, num_hidden_layers=2,
                                num_attention_heads=4, intermediate_size=256)
        config._attn_implementation = "sdpa"
        bert = BertModel(config).to(device, dtype).eval()
        ids = torch.randint(0, BERT_VOCAB, (batch, seqlen), device=device)

        with torch.inference_mode():
            timed = {name: h.timed_or_error(functools.partial(model, input_ids=ids), device, args.repeats)
                     for name, model in (("m2_bert", m2), ("hf_bert", bert))}
        ms = {k: v[0] for k, v in timed.items()}
        tokens_per_ms = {k: None if v is None else batch * seqlen / v for k, v in ms.items()}
        speedup = None if None in ms.values() else ms["hf_bert"] / ms["m2_bert"]
        rows.append({"seqlen": seqlen, "batch": batch, "dtype": str(dtype).removeprefix("torch."), "ms": ms,
                     "tokens_per_ms": tokens_per_ms, "speedup_m2_vs_hf": speedup,
                     "params": {"m2_bert": parameter_count(m2), "hf_bert": parameter_count(bert)},
                     "errors": {k: v[1] for k, v in timed.items() if v[1]}})
        print(f"{seqlen:>6} {batch:>5} {h.fmt(ms['m2_bert'], '.2f'):>10} {h.fmt(ms['hf_bert'], '.2f'):>10} "
              f"{h.fmt(tokens_per_ms['m2_bert'], '.2f'):>10} {h.fmt(tokens_per_ms['hf_bert'], '.2f'):>11} "
              f"{h.fmt(speedup, '.2f'):>7}x", flush=True)
        del m2, bert
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


# ---- causal LMs vs a Transformer -------------------------------------------------------------------------------------


def lm_factories(args) -> dict[str, Callable[[int], torch.nn.Module]]:
    """name -> (max_seqlen -> model). --quick swaps every preset for its tiny one."""
    def preset(name):
        return "tiny" if args.quick else name

    return {
        "mamba2": lambda L: Mamba2LM.from_preset(preset("130m")),
        "flash": lambda L: FlashLM.from_preset(preset("110m"), layer="flash", max_seq_len=L),
        "flash_quad": lambda L: FlashLM.from_preset(preset("110m"), layer="flash-quad", max_seq_len=L),
        "m2_gpt": lambda L: M2GPT.from_preset(preset("360m"), max_seq_len=L,
                                              **({} if args.quick else dict(d_model=768, n_layer=12))),
    }


def matched_transformer(model: torch.nn.Module) -> TransformerLM:
    """A Transformer of the model's width and vocabulary whose depth best matches its parameter count."""
    vocab, d_model = model.lm_head.weight.shape
    heads = max(1, d_model // 64)
    target = parameter_count(model)
    per_layer = parameter_count(TransformerLM(vocab, d_model, 1, heads)) - parameter_count(
        TransformerLM(vocab, d_model, 0, heads))
    base = parameter_count(TransformerLM(vocab, d_model, 0, heads))
    n_layer = max(1, round((target - base) / per_layer))
    return TransformerLM(vocab, d_model, n_layer, heads)


def train_step_call(model, batch: int, seqlen: int, device: torch.device) -> Callable[[], None]:
    vocab = model.lm_head.weight.shape[0]
    ids = torch.randint(0, vocab, (batch, seqlen), device=device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else contextlib.nullcontext())

    def step():
        with autocast:
            out = loss(model(ids), ids)
        out.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def decode_tokens_per_s(model, batch: int, prompt_len: int, new_tokens: int, device: torch.device,
                        repeats: int) -> tuple[float | None, str | None]:
    """Median decode rate: each repeat prefills a fresh cache untimed, then times ``new_tokens`` greedy steps
    (host clock around a synchronised loop: hundreds of steps, so the clock's resolution does not matter)."""
    vocab = model.lm_head.weight.shape[0]
    prompt = torch.randint(0, vocab, (batch, prompt_len), device=device)
    rates = []
    try:
        with torch.inference_mode():
            for _ in range(repeats + 1):  # the first is a warm-up
                caches = model.allocate_inference_cache(batch, prompt_len + new_tokens)
                next_ids = model(prompt, caches=caches)[:, -1].argmax(-1)
                h.synchronize(device)
                start = time.perf_counter()
                for _ in range(new_tokens):
                    next_ids = model.step(next_ids, caches).argmax(-1)
                h.synchronize(device)
                rates.append(batch * new_tokens / (time.perf_counter() - start))
    except (RuntimeError, torch.OutOfMemoryError) as err:
        return None, str(err).splitlines()[0][:200]
    return statistics.median(rates[1:]), None


def lm_rows(args, device: torch.device) -> list[dict]:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rows = []
    for name, factory in lm_factories(args).items():
        if args.lm_models and name not in args.lm_models:
            continue
        for seqlen in args.lm_seqlen:
            model = factory(max(seqlen, args.prompt_len + args.new_tokens)).to(device)
            baseline = matched_transformer(model).to(device)
            params = {name: parameter_count(model), "transformer": parameter_count(baseline)}
            train = {k: h.timed_or_error(train_step_call(m, args.lm_batch, seqlen, device), device, args.repeats)
                     for k, m in ((name, model), ("transformer", baseline))}
            model.to(dtype)
            baseline.to(dtype)
            decode = {k: decode_tokens_per_s(m, args.gen_batch, args.prompt_len, args.new_tokens, device,
                                             max(1, args.repeats // 2))
                      for k, m in ((name, model), ("transformer", baseline))}
            train_tps = {k: None if v[0] is None else args.lm_batch * seqlen / (v[0] * 1e-3) for k, v in train.items()}
            decode_tps = {k: v[0] for k, v in decode.items()}

            def ratio(values, name=name):
                return None if None in values.values() else values[name] / values["transformer"]
            row = {"model": name, "seqlen": seqlen, "batch": args.lm_batch, "params": params,
                   "train_tokens_per_s": train_tps, "train_ratio": ratio(train_tps),
                   "generation": {"batch": args.gen_batch, "prompt_len": args.prompt_len,
                                  "new_tokens": args.new_tokens, "dtype": str(dtype).removeprefix("torch.")},
                   "decode_tokens_per_s": decode_tps, "decode_ratio": ratio(decode_tps),
                   "errors": {f"{phase}:{k}": v[1] for phase, timed in (("train", train), ("decode", decode))
                              for k, v in timed.items() if v[1]}}
            rows.append(row)
            print(f"{name:<11} L={seqlen:<6} params {params[name] / 1e6:6.1f}M vs {params['transformer'] / 1e6:6.1f}M"
                  f" | train tok/s {h.fmt(train_tps[name], '.0f'):>9} vs {h.fmt(train_tps['transformer'], '.0f'):>9}"
                  f" ({h.fmt(row['train_ratio'], '.2f')}x) | decode tok/s {h.fmt(decode_tps[name], '.0f'):>8} vs "
                  f"{h.fmt(decode_tps['transformer'], '.0f'):>8} ({h.fmt(row['decode_ratio'], '.2f')}x)", flush=True)
            del model, baseline
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


# ---- Mixture-of-Modules vs GPT-2 -------------------------------------------------------------------------------------


def grouped_matmul_flops(x, w, group_sizes, bias=None, out_val=None) -> int:
    """FlopCounterMode formula for subq's grouped GEMM: only the routed rows are multiplied (a host read of the
    sizes, fine while counting)."""
    return 2 * int(group_sizes.sum()) * w.shape[1] * w.shape[2]


grouped_matmul_flops._get_raw = True  # FlopCounterMode passes the raw arguments, not their shapes


def counted_forward_flops(call) -> int:
    """FlopCounterMode's count of one forward. It has no formula for the CPU flash attention
    (aten::_scaled_dot_product_flash_attention_for_cpu), so on CPU it counts the matmuls only."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False,
                              custom_mapping={torch.ops.subq.grouped_matmul_fwd: grouped_matmul_flops})
    with counter, torch.no_grad():
        call()
    return counter.get_total_flops()


def analytic_flops_per_token(config, seqlen: int, route: torch.Tensor | None) -> dict[str, float]:
    """Forward FLOPs per token, counted from the shapes: projections 2·in·out per row, attention 4·L·d per query
    (QKᵀ and AV over all L keys, the convention FlopCounterMode uses for attention), the GRU/MLP routers, the LM
    head. ``route (batch, L, H, 2, K)``: only the (token, slot) rows routed to a module count (SKIP is free);
    None: a dense GPT-2 of ``config``'s depth (a GPT2Config). Returns the matmul part and the total."""
    if route is None:  # GPT-2
        d, f, layers = config.n_embd, config.n_inner or 4 * config.n_embd, config.n_layer
        matmul = layers * (8 * d * d + 4 * d * f) + 2 * d * config.vocab_size
        return {"matmul": matmul, "total": matmul + layers * 4 * seqlen * d}
    c = config
    d, f, r = c.d_model, c.d_ffn, c.router_dim
    attn_rows = (route[..., 0, :] < c.n_attn_modules).float().sum(-1).mean().item() * c.assembly_steps
    ffn_rows = (route[..., 1, :] < c.n_ffn_modules).float().sum(-1).mean().item() * c.assembly_steps
    options = (c.n_attn_modules + 1, c.n_ffn_modules + 1)
    if c.router == "gru":
        router = sum(2 * d * 3 * r + 2 * r * 3 * r + 2 * r * n for n in options) * c.assembly_steps
    else:
        router = sum(2 * d * r + 2 * r * n for n in options) * c.assembly_steps
    plain = c.n_bottom + c.n_top
    matmul = (plain * (8 * d * d + 4 * d * f) + attn_rows * 8 * d * d + ffn_rows * 4 * d * f + router
              + 2 * d * c.vocab_size)
    return {"matmul": matmul, "total": matmul + (plain + attn_rows) * 4 * seqlen * d,
            "attn_modules_per_token": attn_rows, "ffn_modules_per_token": ffn_rows}


def training_memory(call) -> dict[str, int]:
    """Activation memory of one training step (forward, then backward of a scalar loss), parameters and their
    gradients excluded (the gradients exist already: a warm-up step allocated them). ``saved``: the bytes autograd
    keeps for the backward (saved-tensor hooks; parameters excluded). ``peak``: the peak of CPU allocations above
    the starting point during forward + backward, from torch.profiler's allocation records in time order."""
    from torch.profiler import ProfilerActivity, profile

    call().backward()  # gradients allocated
    saved = 0
    seen = set()

    def pack(t):
        nonlocal saved
        if not isinstance(t, torch.nn.Parameter) and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            saved += t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = call()
    loss.backward()
    del loss
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        call().backward()
    # Each op's own allocations minus its own frees (self_cpu_memory_usage; frees outside any op are "[memory]"
    # events), in start order: the level after each op. A transient inside one op is not seen.
    events = sorted((e for e in prof.events() if e.self_cpu_memory_usage), key=lambda e: e.time_range.start)
    level = peak = 0
    for event in events:
        level += event.self_cpu_memory_usage
        peak = max(peak, level)
    return {"saved": saved, "peak": peak}


def interleaved_medians(calls: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median ms of each call, the calls taken in turn each round so that the machine's load (shared, noisy)
    falls on all of them alike. One warm-up round first."""
    times = {name: [] for name in calls}
    for round_ in range(repeats + 1):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            if round_:
                times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


def skip_share_route(config, batch: int, seqlen: int, skip: float, generator: torch.Generator) -> torch.Tensor:
    """A forced routing ``(batch, L, H, 2, K)``: each (token, step, type) picks SKIP with probability ``skip`` and
    otherwise K distinct modules uniformly."""
    c = config
    shape = (batch, seqlen, c.assembly_steps)
    parts = []
    for n_modules in (c.n_attn_modules, c.n_ffn_modules):
        modules = torch.rand(*shape, n_modules, generator=generator).argsort(-1)[..., :c.top_k]
        skipped = torch.rand(*shape, c.top_k, generator=generator) < skip
        parts.append(torch.where(skipped, n_modules, modules))
    return torch.stack(parts, dim=3)


def mom_rows(args, device: torch.device) -> list[dict]:
    """MoM built from GPT-2 small (``MoM.from_gpt2``) against that GPT-2 (Hugging Face, SDPA attention), same width
    and sequence length, batch ``--mom-batch``, float32, eval mode (no dropout in either): FLOPs per token
    (analytic, only routed modules; and FlopCounterMode), activation memory of a training step, and wall time of a
    forward (no_grad) and a forward + backward, interleaved medians over ``--repeats`` rounds, as ratios to GPT-2.
    Routing: the fresh routers' own choice (``routers``), or forced with a SKIP share (``skip=s``)."""
    try:
        from transformers import GPT2Config, GPT2LMHeadModel
    except ImportError:
        print("mom: skipped (transformers is not installed)")
        return []
    from subq.models import MoM

    size = dict(n_embd=64, n_layer=6, n_head=4, vocab_size=256, bos_token_id=0, eos_token_id=0) if args.quick else {}
    gpt2_config = GPT2Config(n_positions=max(args.mom_seqlen), **size)
    gpt2_config._attn_implementation = "sdpa"
    gpt2 = GPT2LMHeadModel(gpt2_config).to(device).eval()
    steps_efficient = max(1, round(0.4 * (gpt2_config.n_layer - 2)))  # the preset's 60 % fewer steps
    variants = {  # name -> (from_gpt2 arguments, SKIP share or None for the routers' choice)
        "mom_depth_top1": (dict(top_k=1), None),
        "mom_e_top1": (dict(assembly_steps=steps_efficient, top_k=1), None),
        "mom_e_top1_skip50": (dict(assembly_steps=steps_efficient, top_k=1), 0.5),
        "mom_e_top2": (dict(assembly_steps=steps_efficient, top_k=2), None),
    }
    generator = torch.Generator().manual_seed(0)
    rows = []
    print(f"{'model':<18} {'L':>5} {'H':>3} {'K':>2} {'attn/ffn per tok':>16} {'GFLOP/tok':>9} {'x':>5} "
          f"{'counted':>8} {'x':>5} {'peak MB':>8} {'x':>5} {'saved MB':>8} {'x':>5} {'fwd ms':>8} {'x':>5} "
          f"{'fwdbwd ms':>9} {'x':>5}")
    for seqlen in args.mom_seqlen:
        ids = torch.randint(0, gpt2_config.vocab_size, (args.mom_batch, seqlen), device=device)
        models = {"gpt2": (gpt2, None)}
        for name, (kwargs, skip) in variants.items():
            mom = MoM.from_gpt2(gpt2, **kwargs).to(device)
            route = None
            if skip is not None:
                route = skip_share_route(mom.config, args.mom_batch, seqlen, skip, generator).to(device)
            models[name] = (mom, route)

        def forward(model, route, ids=ids):
            if isinstance(model, MoM):
                return lambda: model(ids, route=route).logits
            return lambda: model(ids).logits

        def training_loss(model, route):
            def call():
                model.zero_grad(set_to_none=False)
                return forward(model, route)().float().logsumexp(-1).mean()
            return call

        def fwd_bwd(model, route):
            return lambda: training_loss(model, route)().backward()

        measured = {}
        for name, (model, route) in models.items():
            if isinstance(model, MoM):
                with torch.no_grad():
                    route = model(ids, route=route).route if route is None else route
                models[name] = (model, route)
                analytic = analytic_flops_per_token(model.config, seqlen, route)
            else:
                analytic = analytic_flops_per_token(gpt2_config, seqlen, None)
            counted = counted_forward_flops(forward(model, route)) / (args.mom_batch * seqlen)
            memory = training_memory(training_loss(model, route))
            measured[name] = {"analytic": analytic, "counted": counted, "memory": memory}
        with torch.no_grad():
            fwd = interleaved_medians({name: forward(*m) for name, m in models.items()}, args.repeats)
        train = interleaved_medians({name: fwd_bwd(*m) for name, m in models.items()}, args.repeats)
        base = measured["gpt2"]
        for name, m in measured.items():
            model = models[name][0]
            tokens = args.mom_batch * seqlen
            c = model.config if isinstance(model, MoM) else None
            row = {
                "model": name, "seqlen": seqlen, "batch": args.mom_batch, "params": parameter_count(model),
                "assembly_steps": c.assembly_steps if c else None, "top_k": c.top_k if c else None,
                "skip_share_forced": variants[name][1] if c else None,
                "attn_modules_per_token": m["analytic"].get("attn_modules_per_token"),
                "ffn_modules_per_token": m["analytic"].get("ffn_modules_per_token"),
                "forward_flops_per_token": m["analytic"]["total"],
                "forward_matmul_flops_per_token": m["analytic"]["matmul"],
                "flop_counter_per_token": m["counted"],
                "activation_peak_bytes_per_token": m["memory"]["peak"] / tokens,
                "activation_saved_bytes_per_token": m["memory"]["saved"] / tokens,
                "forward_ms": fwd[name], "fwd_bwd_ms": train[name],
                "ratio_vs_gpt2": {
                    "flops": m["analytic"]["total"] / base["analytic"]["total"],
                    "flop_counter": m["counted"] / base["counted"],
                    "activation_peak": m["memory"]["peak"] / base["memory"]["peak"],
                    "activation_saved": m["memory"]["saved"] / base["memory"]["saved"],
                    "forward_time": fwd[name] / fwd["gpt2"], "fwd_bwd_time": train[name] / train["gpt2"],
                },
                "errors": {},
            }
            rows.append(row)
            x = row["ratio_vs_gpt2"]
            per_tok = ("-" if c is None else
                       f"{row['attn_modules_per_token']:.2f}/{row['ffn_modules_per_token']:.2f}")
            print(f"{name:<18} {seqlen:>5} {c.assembly_steps if c else '-':>3} {c.top_k if c else '-':>2} "
                  f"{per_tok:>16} {row['forward_flops_per_token'] / 1e9:9.3f} {x['flops']:5.2f} "
                  f"{row['flop_counter_per_token'] / 1e9:8.3f} {x['flop_counter']:5.2f} "
                  f"{m['memory']['peak'] / 2**20:8.0f} {x['activation_peak']:5.2f} "
                  f"{m['memory']['saved'] / 2**20:8.0f} {x['activation_saved']:5.2f} "
                  f"{fwd[name]:8.0f} {x['forward_time']:5.2f} {train[name]:9.0f} {x['fwd_bwd_time']:5.2f}",
                  flush=True)
    return rows


# ---- main ------------------------------------------------------------------------------------------------------------

SECTIONS = {"bert": bert_rows, "lm": lm_rows, "mom": mom_rows}


def main() -> None:
    args = parse_args()
    torch.manual_seed(0)
    device = args.device
    env = h.environment(device)
    print(f"{env['device_name']} | torch {env['torch']} | subq cuda_built={env['subq_cuda_built']} | {env['timer']}")
    results = {}
    for section in args.section:
        print(f"== {section}")
        results[section] = SECTIONS[section](args, device)
    for section, rows in results.items():
        for row in rows:
            for what, err in row["errors"].items():
                print(f"!!! {section} {what} failed at L={row['seqlen']}: {err}")
    h.write_json(args.out, {
        "benchmark": "models", "env": env,
        "config": {k: getattr(args, k) for k in ("section", "bert_preset", "bert_seqlen", "bert_tokens", "lm_seqlen",
                                                  "lm_batch", "gen_batch", "prompt_len", "new_tokens", "mom_seqlen",
                                                  "mom_batch",
                                                  "repeats", "quick")},
        **results,
    })
    print(f"wrote {args.out}")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--section", nargs="+", choices=list(SECTIONS), default=list(SECTIONS))
    parser.add_argument("--bert-preset", default="110m")
    parser.add_argument("--bert-seqlen", type=int, nargs="+")
    parser.add_argument("--bert-tokens", type=int, default=32768, help="GPU: tokens per call (batch = tokens / L)")
    parser.add_argument("--lm-models", nargs="+", help="subset of the causal LMs (default all)")
    parser.add_argument("--lm-seqlen", type=int, nargs="+")
    parser.add_argument("--lm-batch", type=int)
    parser.add_argument("--gen-batch", type=int)
    parser.add_argument("--prompt-len", type=int)
    parser.add_argument("--new-tokens", type=int)
    parser.add_argument("--mom-seqlen", type=int, nargs="+")
    parser.add_argument("--mom-batch", type=int, default=1)
    parser.add_argument("--device", default=h.default_device())
    parser.add_argument("--repeats", type=int, help="minimum timed calls (default 10 on GPU, 3 on CPU)")
    parser.add_argument("--out", type=Path, help="JSON path (default bench/results/models_<device>.json)")
    parser.add_argument("--quick", action="store_true", help="tiny models and sizes, for a smoke run")
    args = parser.parse_args()
    args.device = torch.device(args.device)
    gpu = args.device.type == "cuda"
    defaults = {
        "bert_seqlen": [128, 256] if args.quick else ([512, 1024, 2048, 4096, 8192, 16384, 32768] if gpu
                                                     else [512, 1024, 2048, 4096, 8192]),
        "mom_seqlen": [64] if args.quick else [1024],
        "lm_seqlen": [64] if args.quick else ([2048, 8192] if gpu else [512]),
        "lm_batch": 2 if args.quick else (8 if gpu else 1),
        "gen_batch": 2 if args.quick else (16 if gpu else 1),
        "prompt_len": 16 if args.quick else 128,
        "new_tokens": 8 if args.quick else (256 if gpu else 32),
    }
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.repeats = args.repeats or (10 if gpu else 3)
    args.out = args.out or h.default_out("models" + ("_quick" if args.quick else ""), args.device)
    return args


if __name__ == "__main__":
    main()
