"""Distributed layers per rank count: time per forward + backward, bytes each rank sends, and the communication's
share of the local compute.

    PYTHONPATH=python python bench/bench_distributed.py                 # 1, 2, 4 ranks on gloo (CPU)
    PYTHONPATH=python python bench/bench_distributed.py --ranks 1 2 --repeats 9

For each rank count W (spawned processes joined by gloo on the CPU; NCCL, one GPU a rank, when there are at least
W CUDA devices) and each case that this build has (the others are skipped with the reason):

    ssd_cp     subq.distributed.ssd_chunk_scan, the sequence split in W contiguous shards (state passing)
    flash_cp   subq.distributed.flash_chunk_attention (causal), shards of whole chunks
    conv_cp    subq.distributed.causal_conv1d, a (W-1)-token halo from the previous rank
    mamba2_tp  subq.nn.Mamba2(tp_group=...), heads split, the whole sequence on every rank
    mamba2_cp  subq.nn.Mamba2(cp_group=...), the sequence split

it reports the median wall time of a forward + backward on each rank (the slowest rank's), the bytes this rank sent
(``subq.distributed.counting_bytes``, the largest over the ranks) next to the formula of the README, the time of
the same collectives alone (recorded during one step, then replayed with tensors of the same shapes), and that time
as a fraction of the local compute (the same layer on the same local shapes with no group: what one rank computes).
Strong scaling: the global sequence is fixed, a rank's shard is 1/W of it. On this 2-core machine W = 4 runs two
processes a core, so its times say little; bytes and formulas are exact. Each rank runs one thread. Writes
bench/results/distributed_<cpu|gpu>.json and .txt.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import socket
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

FLOAT = 4  # bytes of a float32 element: every case runs in float32


class Skip(Exception):
    """A case this build cannot run (the op or the layer's group argument does not exist yet)."""


@dataclass
class Case:
    step: Callable[[dist.ProcessGroup | None], None]  # one forward + backward, with the group or (None) alone
    formula: Callable[[int, int], float]  # (world, rank) -> bytes this rank sends, the README's formula
    shape: str  # what is computed, for the table


# ---- the cases ----------------------------------------------------------------------------------------------------
# Sizes: global sequence L, batch 1, float32; big enough that a CPU step takes milliseconds, small enough that the
# whole run takes a minute or two on 2 cores.

L = 2048
SSD = dict(heads=8, headdim=64, dstate=64, chunk=256)
FLASH = dict(s=64, e=256, chunk=256)
CONV = dict(dim=512, width=4)
LAYER = dict(d_model=256, d_state=64, headdim=64, chunk=256)


def _shard_len(world: int) -> int:
    return L // world


def _leaf(*shape) -> torch.Tensor:
    return torch.randn(*shape).requires_grad_()


def _distributed(name: str):
    import subq.distributed as sd

    fn = getattr(sd, name, None)
    if fn is None:
        raise Skip(f"subq.distributed.{name} does not exist in this build")
    return fn


def ssd_cp(world: int, rank: int) -> Case:
    op = _distributed("ssd_chunk_scan")
    b, h, p, n = 1, SSD["heads"], SSD["headdim"], SSD["dstate"]
    lr = _shard_len(world)
    x, B, C = _leaf(b, lr, h, p), _leaf(b, lr, 1, n), _leaf(b, lr, 1, n)
    dt = torch.rand(b, lr, h).requires_grad_()
    A = (-torch.rand(h)).requires_grad_()

    def step(group):
        y = op(x, dt, A, B, C, chunk_size=SSD["chunk"], dt_softplus=True, group=group)
        y.sum().backward()

    # all_gather of (S_local (B,H,P,N), a (B,H)): (W-1)·n sent; its backward all-reduces the stacked (W, n)
    # gradients: 2(W-1)/W · W·n.
    summary = (b * h * p * n + b * h) * FLOAT
    return Case(step, lambda w, r: 3 * (w - 1) * summary, f"B=1 L={L} H={h} P={p} N={n} chunk={SSD['chunk']}")


def flash_cp(world: int, rank: int) -> Case:
    op = _distributed("flash_chunk_attention")
    s, e, chunk = FLASH["s"], FLASH["e"], FLASH["chunk"]
    lr = _shard_len(world)
    if lr % chunk:
        raise Skip(f"shard {lr} is not a multiple of chunk {chunk}")
    qq, kq, ql, kl = (_leaf(1, lr, s) for _ in range(4))
    v, u = _leaf(1, lr, e), _leaf(1, lr, e)

    def step(group):
        op(qq, kq, ql, kl, v, u, chunk_size=chunk, causal=True, lin_scale=1.0 / L, group=group).sum().backward()

    # causal: all_gather of each rank's Σ K_linᵀV (B, S, E), (W-1)·B·S·E, and the all-reduce of its gradient.
    kv = 1 * s * e * FLOAT
    return Case(step, lambda w, r: 3 * (w - 1) * kv, f"B=1 L={L} S={s} E={e} chunk={chunk} causal")


def conv_cp(world: int, rank: int) -> Case:
    op = _distributed("causal_conv1d")
    d, width = CONV["dim"], CONV["width"]
    x, weight, bias = _leaf(1, d, _shard_len(world)), _leaf(d, width), _leaf(d)

    def step(group):
        op(x, weight, bias, activation="silu", group=group).sum().backward()

    # forward: the last W-1 columns to the next rank; backward: their gradient back to the previous one.
    halo = 1 * d * (width - 1) * FLOAT
    return Case(step, lambda w, r: halo * ((r < w - 1) + (r > 0)), f"B=1 L={L} D={d} W={width}")


def _mamba2(kwarg: str, group, **extra):
    from subq.nn import Mamba2

    if kwarg not in inspect.signature(Mamba2.__init__).parameters:
        raise Skip(f"subq.nn.Mamba2 takes no {kwarg} in this build")
    return Mamba2(LAYER["d_model"], d_state=LAYER["d_state"], headdim=LAYER["headdim"], chunk_size=LAYER["chunk"],
                  **extra, **{kwarg: group})


def mamba2_tp(world: int, rank: int, group) -> Case:
    ngroups = 4  # TP splits the groups: a multiple of every rank count here
    layer = _mamba2("tp_group", group, ngroups=ngroups)
    u = _leaf(1, L, LAYER["d_model"])

    def step(g):
        if g is None:  # this rank's compute alone: its 1/W of the heads, the all-reduces skipped
            with _no_all_reduce():
                layer(u).sum().backward()
        else:
            layer(u).sum().backward()

    # one all-reduce of the output (B, L, d_model) forward, one of the input's gradient backward
    act = 1 * L * LAYER["d_model"] * FLOAT
    return Case(step, lambda w, r: 2 * 2 * (w - 1) / w * act, f"B=1 L={L} d_model={LAYER['d_model']} ngroups=4")


class _no_all_reduce:
    """torch.distributed.all_reduce as a no-op: a tensor-parallel layer's local compute alone."""

    def __enter__(self):
        self.original = dist.all_reduce
        dist.all_reduce = lambda *args, **kwargs: None

    def __exit__(self, *exc):
        dist.all_reduce = self.original


def mamba2_cp(world: int, rank: int, group) -> Case:
    layer = _mamba2("cp_group", group)
    alone = _mamba2("cp_group", None)
    alone.load_state_dict(layer.state_dict())
    u = _leaf(1, _shard_len(world), LAYER["d_model"])

    def step(g):
        (layer if g is not None else alone)(u).sum().backward()

    d_inner = 2 * LAYER["d_model"]
    heads = d_inner // LAYER["headdim"]
    conv_dim = d_inner + 2 * LAYER["d_state"]
    summary = (heads * LAYER["headdim"] * LAYER["d_state"] + heads) * FLOAT
    halo = conv_dim * 3 * FLOAT
    return Case(step, lambda w, r: 3 * (w - 1) * summary + halo * ((r < w - 1) + (r > 0)),
                f"B=1 L={L} d_model={LAYER['d_model']} (conv halo + SSD summary)")


CASES = {"ssd_cp": ssd_cp, "flash_cp": flash_cp, "conv_cp": conv_cp, "mamba2_tp": mamba2_tp,
         "mamba2_cp": mamba2_cp}
LAYER_CASES = ("mamba2_tp", "mamba2_cp")


# ---- timing, and the collectives replayed alone -------------------------------------------------------------------

RECORDED = ("all_gather", "all_reduce", "all_gather_into_tensor", "reduce_scatter_tensor", "broadcast",
            "batch_isend_irecv", "all_gather_object")


class Recorder:
    """Wraps torch.distributed's collectives while active, keeping each call's arguments (tensors cloned), so the
    same sequence can be replayed alone, on every rank in the same order."""

    def __init__(self):
        self.calls: list[tuple[str, tuple, dict]] = []
        self.originals = {name: getattr(dist, name) for name in RECORDED}

    def __enter__(self):
        for name, fn in self.originals.items():
            setattr(dist, name, self._wrap(name, fn))
        return self

    def __exit__(self, *exc):
        for name, fn in self.originals.items():
            setattr(dist, name, fn)

    def _wrap(self, name, fn):
        def recorded(*args, **kwargs):
            self.calls.append((name, _clone(args), _clone(kwargs)))
            return fn(*args, **kwargs)
        return recorded

    def replay(self) -> None:
        for name, args, kwargs in self.calls:
            works = self.originals[name](*_clone(args), **_clone(kwargs))
            for work in works if isinstance(works, list) else [works]:
                if hasattr(work, "wait"):
                    work.wait()


def _clone(value):
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, dist.P2POp):
        return dist.P2POp(value.op, value.tensor.detach().clone(), value.peer, value.group, value.tag)
    if isinstance(value, list | tuple):
        return type(value)(_clone(v) for v in value)
    if isinstance(value, dict):
        return {k: _clone(v) for k, v in value.items()}
    return value


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def _median_ms(fn, repeats: int, group_sync: bool) -> float:
    times = []
    for _ in range(repeats):
        if group_sync:
            dist.barrier()
        _sync()
        start = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def measure(name: str, world: int, rank: int, repeats: int) -> dict:
    from subq.distributed import counting_bytes

    group = dist.new_group(list(range(world))) if world > 1 else None
    torch.manual_seed(0)
    try:
        builder = CASES[name]
        case = builder(world, rank, group) if name in LAYER_CASES else builder(world, rank)
    except Skip as why:
        return {"skipped": str(why)}
    case.step(group)  # warm-up
    with counting_bytes() as sent:
        case.step(group)
    sent = sent()
    step_ms = _median_ms(lambda: case.step(group), repeats, world > 1)
    local_ms = _median_ms(lambda: case.step(None), repeats, world > 1)
    comm_ms = 0.0
    if world > 1:
        with Recorder() as recorder:
            case.step(group)
        recorder.replay()  # warm-up
        comm_ms = _median_ms(recorder.replay, repeats, True)
    formula = case.formula(world, rank)
    return {"shape": case.shape, "step_ms": step_ms, "local_ms": local_ms, "comm_ms": comm_ms,
            "bytes_sent": sent, "formula_bytes": formula, "collectives": len(recorder.calls) if world > 1 else 0}


# ---- processes ------------------------------------------------------------------------------------------------------

def _rank_main(rank, world, port, out_dir, cases, repeats, backend, seq_len):
    global L
    L = seq_len
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)  # one thread a rank at every W, so a rank's compute compares across W
    try:
        if backend == "nccl":  # one GPU a rank; every tensor and layer of the cases is made there
            torch.cuda.set_device(rank)
            torch.set_default_device(f"cuda:{rank}")
        if world > 1:
            dist.init_process_group(backend, rank=rank, world_size=world)
        results = {name: measure(name, world, rank, repeats) for name in cases}
        if world > 1:
            dist.destroy_process_group()
        torch.save({"ok": results}, Path(out_dir) / f"{rank}.pt")
    except BaseException:  # noqa: BLE001 - back to the parent with the traceback
        torch.save({"error": traceback.format_exc()}, Path(out_dir) / f"{rank}.pt")


def run_world(world: int, cases: list[str], repeats: int, backend: str, seq_len: int) -> list[dict]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as out_dir:
        procs = [ctx.Process(target=_rank_main, args=(r, world, port, out_dir, cases, repeats, backend, seq_len))
                 for r in range(world)]
        for proc in procs:
            proc.start()
        for proc in procs:
            proc.join(900)
        results = []
        for r in range(world):
            got = torch.load(Path(out_dir) / f"{r}.pt", weights_only=False)
            if "error" in got:
                raise RuntimeError(f"rank {r} of {world} failed:\n{got['error']}")
            results.append(got["ok"])
        return results


def summarize(world: int, per_rank: list[dict]) -> dict:
    out = {}
    for name in per_rank[0]:
        rows = [r[name] for r in per_rank]
        if "skipped" in rows[0]:
            out[name] = rows[0]
            continue
        worst = max(range(world), key=lambda r: rows[r]["bytes_sent"])
        step, local, comm = (max(row[k] for row in rows) for k in ("step_ms", "local_ms", "comm_ms"))
        out[name] = {"shape": rows[0]["shape"], "step_ms": step, "local_ms": local, "comm_ms": comm,
                     "comm_fraction_of_local": comm / local if local else None,
                     "bytes_sent_max_rank": rows[worst]["bytes_sent"],
                     "formula_bytes_same_rank": rows[worst]["formula_bytes"],
                     "bytes_sent_per_rank": [row["bytes_sent"] for row in rows],
                     "collectives_per_step": rows[0]["collectives"]}
    return out


def table(results: dict) -> str:
    lines = [f"{'case':10} {'W':>2} {'step ms':>9} {'local ms':>9} {'comm ms':>8} {'comm/local':>10} "
             f"{'bytes sent':>11} {'formula':>11}  shape"]
    for world, cases in results.items():
        for name, row in cases.items():
            if "skipped" in row:
                lines.append(f"{name:10} {world:>2}  skipped: {row['skipped']}")
                continue
            frac = row["comm_fraction_of_local"]
            lines.append(f"{name:10} {world:>2} {row['step_ms']:9.2f} {row['local_ms']:9.2f} {row['comm_ms']:8.2f} "
                         f"{frac:10.2%} {row['bytes_sent_max_rank']:11,} {int(row['formula_bytes_same_rank']):11,}  "
                         f"{row['shape']}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per measurement (the median is kept)")
    parser.add_argument("--seq-len", type=int, default=L, help=f"the whole sequence, split over the CP ranks "
                        f"(default {L}; a multiple of 256 times the largest rank count)")
    parser.add_argument("--out", type=Path, help="JSON path (default bench/results/distributed_<cpu|gpu>.json)")
    args = parser.parse_args(argv)
    gpus = torch.cuda.device_count()
    backend = "nccl" if gpus >= max(args.ranks) else "gloo"
    results = {}
    for world in args.ranks:
        print(f"{world} rank(s) on {backend}...", file=sys.stderr)
        results[world] = summarize(world, run_world(world, args.cases, args.repeats, backend, args.seq_len))
    text = table(results)
    print(text)
    kind = "gpu" if backend == "nccl" else "cpu"
    out = args.out or Path(__file__).resolve().parent / "results" / f"distributed_{kind}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"backend": backend, "torch": torch.__version__, "cpu_count": os.cpu_count(), "repeats": args.repeats,
            "seq_len": args.seq_len, "gpus": gpus,
            "note": "medians of --repeats calls on a shared machine; times are noisy, bytes exact",
            "command": "python bench/bench_distributed.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    out.write_text(json.dumps({"meta": meta, "results": {str(k): v for k, v in results.items()}}, indent=1) + "\n")
    out.with_suffix(".txt").write_text(text + "\n")
    print(f"wrote {out} and {out.with_suffix('.txt')}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
